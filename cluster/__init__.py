"""rayhorde's cluster side: validator-core, miner agents, identities and the local stack."""

from cluster.api import *  # noqa: F401,F403
from cluster.api import __all__  # noqa: F401
