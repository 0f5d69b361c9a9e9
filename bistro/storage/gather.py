"""Fetch many keys from many buckets at once: what arrived, and why the rest did not.

A validator downloads one delta per uid each window. Each fetch runs in a worker thread with its own
deadline (`timeout` seconds from when it starts) and size limit; one slow, huge or missing object
never stops the others. A fetch that passes its deadline is reported as `TimeoutError` and left to
finish in its (daemon) thread, which the store's own socket timeouts end.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

from .base import Store


def gather(
    items: Sequence[tuple[Store, str]], *, max_bytes: int, timeout: float, workers: int = 16
) -> list[bytes | BaseException]:
    """One entry per (store, key), in order: the bytes, or NotFound, TooLarge, StorageError,
    TimeoutError (or whatever else that one fetch raised). Never raises for one item."""
    n = len(items)
    results: list[bytes | BaseException | None] = [None] * n
    started: list[float | None] = [None] * n
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    done = threading.Condition()

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            with done:
                started[i] = time.monotonic()
            store, key = items[i]
            try:
                out: bytes | BaseException = store.get(key, max_bytes=max_bytes)
            except Exception as e:  # noqa: BLE001 -- not hidden: it is this item's answer to the caller
                out = e
            with done:
                if results[i] is None:  # not already timed out
                    results[i] = out
                done.notify_all()

    for _ in range(min(workers, n)):
        threading.Thread(target=work, daemon=True, name="gather").start()
    with done:
        while any(r is None for r in results):
            now = time.monotonic()
            for i, t0 in enumerate(started):
                if results[i] is None and t0 is not None and now - t0 >= timeout:
                    store, key = items[i]
                    results[i] = TimeoutError(f"{store.bucket}/{key}: no answer in {timeout:g} s")
            done.wait(0.05)
    return [r for r in results if r is not None]
