"""The public surface of ``cluster``: running validators and miners, identities, settings."""

from cluster import errors
from cluster.chain import LocalChain
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.identity import Hotkey, load_wallet
from cluster.devstack.local_stack import LocalStack
from cluster.settings import ExecutorClass, MinerSettings, ValidatorSettings, load_settings
from cluster.protocol.user import request_capability

__all__ = [
    "ExecutorClass",
    "Hotkey",
    "LocalChain",
    "LocalStack",
    "MinerSettings",
    "SignedEnvelope",
    "ValidatorSettings",
    "errors",
    "load_settings",
    "load_wallet",
    "open_envelope",
    "request_capability",
    "seal",
]
