"""The public surface of ``cluster``: running validators and miners, identities, settings."""

from cluster import errors
from cluster._private.chain import LocalChain
from cluster._private.envelope import SignedEnvelope, open_envelope, seal
from cluster._private.identity import Hotkey, load_or_create_wallet
from cluster._private.local_stack import LocalStack
from cluster._private.settings import ExecutorClass, MinerSettings, ValidatorSettings, load_settings
from cluster._private.user import request_capability

__all__ = [
    "ExecutorClass",
    "Hotkey",
    "LocalChain",
    "LocalStack",
    "MinerSettings",
    "SignedEnvelope",
    "ValidatorSettings",
    "errors",
    "load_or_create_wallet",
    "load_settings",
    "open_envelope",
    "request_capability",
    "seal",
]
