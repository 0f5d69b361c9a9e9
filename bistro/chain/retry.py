"""Retry transient chain failures with exponential backoff and jitter; never retry a refusal.

Transient: a busy SQLite file, a dropped connection, a timeout, or a ChainError marked
`transient`. A refusal (rate limit, unregistered hotkey, bad input) is raised at once: retrying
would only repeat it. A write that timed out may still have landed; retrying it is then refused
by the chain (for set_weights, by the rate limit), which the caller sees as a plain ChainError.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .base import Chain, ChainError, Metagraph

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """Whether a failure is worth retrying."""
    if isinstance(error, ChainError):
        return error.transient
    if isinstance(error, sqlite3.OperationalError):
        text = str(error)
        return "locked" in text or "busy" in text
    return isinstance(error, ConnectionError | TimeoutError)


class RetryingChain(Chain):
    """Wraps any Chain; other attributes (add_stake, wait_for_block, …) pass through, retried too."""

    def __init__(
        self, inner: Chain, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.netuid = inner.netuid

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except (ChainError, sqlite3.OperationalError, ConnectionError, TimeoutError) as e:
                if not is_transient(e):
                    raise
                if attempt == self.attempts - 1:
                    raise ChainError(
                        f"{getattr(fn, '__name__', 'call')} failed {self.attempts} times: {e}", transient=True
                    ) from e
                delay = min(self.max_delay, self.base_delay * 2**attempt) * (0.5 + random.random())
                log.warning("chain %s failed (%s); retry in %.2fs", getattr(fn, "__name__", "call"), e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    @property
    def block_time(self) -> float:  # type: ignore[override] - the inner chain's, not the default
        return float(self.inner.block_time)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if not callable(value):
            return value
        return lambda *a, **k: self._call(value, *a, **k)

    def block(self) -> int:
        return self._call(self.inner.block)

    def block_hash(self, block: int) -> str:
        return self._call(self.inner.block_hash, block)

    def metagraph(self) -> Metagraph:
        return self._call(self.inner.metagraph)

    def top_validator_at(self, block: int) -> str | None:
        return self._call(self.inner.top_validator_at, block)

    def commit(self, wallet: Any, data: str) -> None:
        self._call(self.inner.commit, wallet, data)

    def commitments(self) -> dict[int, str]:
        return self._call(self.inner.commitments)

    def set_weights(self, wallet: Any, uids: Sequence[int], weights: Sequence[float]) -> None:
        self._call(self.inner.set_weights, wallet, uids, weights)

    def register(self, wallet: Any) -> int:
        return self._call(self.inner.register, wallet)
