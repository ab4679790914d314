"""rayhorde organic jobs for driver scripts: ``submit(spec).result()``."""

from jobs.api import *  # noqa: F401,F403
from jobs.api import __all__  # noqa: F401
