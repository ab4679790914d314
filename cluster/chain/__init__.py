"""Chain backends: one interface (:mod:`.base`), one module per implementation."""

from cluster.chain.base import U16_MAX, ChainBackend, ChainFeature, Metagraph, Neuron
from cluster.chain.local import LocalChain, WeightsSet

__all__ = ["U16_MAX", "ChainBackend", "ChainFeature", "LocalChain", "Metagraph", "Neuron", "WeightsSet"]
