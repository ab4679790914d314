"""The miner agent (trusted by its miner, outside Ray): ticket checks and stages (:mod:`.agent`), the
container runtime interface and its docker implementation, volumes and uploads, the executor API
Ray tasks poke, the streaming proxy, and the process entry (:mod:`.main`)."""
