"""The chain interface rayhorde needs: read the metagraph, (later) set weights.

The default backend is a local file (:mod:`.local`); a bittensor-SDK backend implements the
same interface. What a backend cannot do is stated with :class:`ChainFeature`, not isinstance.
"""

from __future__ import annotations

import abc
import enum

from pydantic import BaseModel, Field


class ChainFeature(enum.Flag):
    READ_METAGRAPH = enum.auto()
    SET_WEIGHTS = enum.auto()


class Neuron(BaseModel):
    uid: int = Field(ge=0)
    hotkey: str
    stake_rao: int = Field(ge=0, default=0)
    validator_permit: bool = False


class Metagraph(BaseModel):
    netuid: int = Field(ge=0)
    block: int = Field(ge=0, default=0)
    neurons: list[Neuron]

    def neuron(self, hotkey: str) -> Neuron | None:
        return next((n for n in self.neurons if n.hotkey == hotkey), None)


class ChainBackend(abc.ABC):
    features: ChainFeature

    @abc.abstractmethod
    def metagraph(self, netuid: int) -> Metagraph:
        """The current metagraph of subnet ``netuid``."""

    def set_weights(self, netuid: int, weights: dict[int, int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot set weights (features: {self.features})")
