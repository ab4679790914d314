"""The one-machine development stack behind ``rayhorde up`` / ``down`` and ``make demo``."""
