"""Everything a miner or validator asks of the chain. Miners and validators import only this.

Two implementations sit beside it: `local.py` (the embedded SQLite chain every demo and test uses)
and `subtensor.py` (the real Bittensor network through the SDK).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class ChainError(Exception):
    """The chain refused a call (with the reason) or could not be reached.

    `transient` is True for failures worth retrying (a busy database, a dropped connection) and
    False for refusals (rate limit, bad input), which a retry would only repeat.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class Metagraph:
    """The subnet's state at one block; arrays are indexed by position, `uids[k]` is the uid."""

    netuid: int
    block: int
    uids: np.ndarray
    """int64 uids."""
    hotkeys: list[str]
    """ss58 hotkey at each position."""
    S: np.ndarray
    """Stake (float64)."""
    I: np.ndarray  # noqa: E741 - Bittensor's name
    """Incentive, summing to 1 over the subnet (float64)."""
    D: np.ndarray
    """Dividends (float64)."""
    validator_permit: np.ndarray
    """bool."""
    last_update: np.ndarray
    """Block of each uid's last set_weights (int64)."""
    weights: dict[int, dict[int, float]] | None = None
    """Last weights each validator uid set, when the chain exposes them (uid -> {uid: w})."""
    validator_trust: np.ndarray | None = None
    """Validator trust from the last epoch (float64): the sum of the validator's normalized
    weights, each clipped at the consensus of its column. 1 means it agrees with consensus."""

    @property
    def n(self) -> int:
        return len(self.uids)

    def uid_of(self, hotkey: str) -> int | None:
        """The uid registered to `hotkey`, or None."""
        try:
            return int(self.uids[self.hotkeys.index(hotkey)])
        except ValueError:
            return None

    def hotkey_of(self, uid: int) -> str | None:
        idx = np.flatnonzero(self.uids == uid)
        return self.hotkeys[int(idx[0])] if len(idx) else None

    def incentive_of(self, uid: int) -> float:
        idx = np.flatnonzero(self.uids == uid)
        return float(self.I[int(idx[0])]) if len(idx) else 0.0

    def validator_trust_of(self, uid: int) -> float:
        idx = np.flatnonzero(self.uids == uid)
        if self.validator_trust is None or not len(idx):
            return 0.0
        return float(self.validator_trust[int(idx[0])])

    def top_validator(self) -> str | None:
        """The hotkey with the most stake among permitted validators (ties: lowest uid)."""
        if self.n == 0:
            return None
        order = sorted(range(self.n), key=lambda k: (-float(self.S[k]), int(self.uids[k])))
        for k in order:
            if self.validator_permit[k] and self.S[k] > 0:
                return self.hotkeys[k]
        return None


class Chain(ABC):
    """One subnet on one chain."""

    netuid: int
    block_time: float = 12.0
    """Seconds per block, as the chain reports it."""

    @abstractmethod
    def block(self) -> int:
        """The current block number."""

    @abstractmethod
    def block_hash(self, block: int) -> str:
        """Hex hash of a block at or before the current one, from the finalized chain: every node
        gets the same hash, and nobody can know it before the block exists."""

    @abstractmethod
    def metagraph(self) -> Metagraph:
        """The subnet's uids, hotkeys, stake, incentive, dividends, permits and last updates."""

    def top_validator_at(self, block: int) -> str | None:
        """The top-stake validator's hotkey at `block` (a block already past), so that every node
        asking about the same block gets the same answer whenever it asks. This default reads the
        current metagraph: exact only while stake has not moved since `block`; adapters that can
        read past state override it."""
        return self.metagraph().top_validator()

    @abstractmethod
    def commit(self, wallet: Any, data: str) -> None:
        """Store `data` (at most 128 bytes: the bucket) as the wallet hotkey's commitment."""

    @abstractmethod
    def commitments(self) -> dict[int, str]:
        """The latest commitment of every uid that has one."""

    @abstractmethod
    def set_weights(self, wallet: Any, uids: Sequence[int], weights: Sequence[float]) -> None:
        """Set the wallet hotkey's weights over `uids`. Raises ChainError with the reason."""

    @abstractmethod
    def register(self, wallet: Any) -> int:
        """Register the wallet's hotkey and return its uid (the same uid if already registered)."""
