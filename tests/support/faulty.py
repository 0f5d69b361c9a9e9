"""A store that fails on purpose: wraps a real one and, on a seeded fraction of calls, raises
`StorageError` or waits first. Reliability tests put it under a miner or validator to check that
one bad bucket costs that uid its score and nothing more (hivemind injects faults the same way, by
wrapping the real part)."""

from __future__ import annotations

import random
import threading
import time

from bistro.storage.base import ObjectInfo, StorageError, Store, check_deadline


class FaultyStore(Store):
    """`inner`, with `fail_rate` of calls raising StorageError and `delay_rate` of calls (all, by
    default) sleeping `delay` seconds first. The same seed gives the same faults in the same order."""

    def __init__(
        self, inner: Store, *, fail_rate: float, delay: float = 0.0, seed: int = 0, delay_rate: float = 1.0
    ) -> None:
        if not (0.0 <= fail_rate <= 1.0 and 0.0 <= delay_rate <= 1.0) or delay < 0:
            raise ValueError("fail_rate and delay_rate must be in [0, 1], delay >= 0")
        self.inner, self.bucket = inner, inner.bucket
        self.fail_rate, self.delay, self.delay_rate = fail_rate, delay, delay_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = self.failures = 0

    def _maybe_fail(self, op: str, key: str, deadline: float | None = None) -> None:
        with self._lock:
            self.calls += 1
            fail = self._rng.random() < self.fail_rate
            wait = self.delay > 0 and self._rng.random() < self.delay_rate
            self.failures += fail
        if wait:
            # a real store's bounded read: it waits no longer than the caller's deadline
            left = check_deadline(deadline, f"{op} {self.bucket}/{key}")
            time.sleep(self.delay if left is None else min(self.delay, left))
            check_deadline(deadline, f"{op} {self.bucket}/{key}")
        if fail:
            raise StorageError(f"{op} {self.bucket}/{key}: injected fault")

    def put(self, key: str, data: bytes) -> None:
        self._maybe_fail("put", key)
        self.inner.put(key, data)

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        self._maybe_fail("get", key, deadline)
        return self.inner.get(key, max_bytes=max_bytes, deadline=deadline)

    def head(self, key: str) -> ObjectInfo | None:
        self._maybe_fail("head", key)
        return self.inner.head(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._maybe_fail("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._maybe_fail("delete", key)
        self.inner.delete(key)
