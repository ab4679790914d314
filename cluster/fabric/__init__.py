"""The machinery under every rayhorde process tree: launching and stopping Ray nodes
(:mod:`.ray_node`), blocks of explicit ports and who listens on them (:mod:`.ports`), and the
process table that decides what is ours and stops it by PID (:mod:`.processes`). The roles and
the dev stack use it; it imports neither."""
