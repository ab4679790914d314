"""The chain interface rayhorde needs: read the metagraph, set weights.

The default backend is a local file (:mod:`.local`); a bittensor-SDK backend implements the
same interface. What a backend cannot do is stated with :class:`ChainFeature`, not isinstance.
"""

from __future__ import annotations

import abc
import enum

from pydantic import BaseModel, Field


U16_MAX = 65_535  # weights travel as u16; the largest score maps to this (bittensor's max-normalisation)


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

    def set_weights(self, netuid: int, weights: dict[int, int]) -> str:
        """Set this validator's weights (uid -> u16) on ``netuid``; returns a reference to the
        record (a log position, an extrinsic hash). Uids left out get weight 0. Raises
        :class:`~cluster.errors.ChainError` when refused. Only with ``ChainFeature.SET_WEIGHTS``."""
        raise NotImplementedError(f"{type(self).__name__} cannot set weights (features: {self.features})")
