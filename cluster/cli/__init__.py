"""The ``rayhorde`` command line (:mod:`.main`) and its command groups."""
