"""Chain backends: one interface (:mod:`.base`), one module per implementation."""

from cluster._private.chain.base import ChainBackend, ChainFeature, Metagraph, Neuron
from cluster._private.chain.local import LocalChain

__all__ = ["ChainBackend", "ChainFeature", "LocalChain", "Metagraph", "Neuron"]
