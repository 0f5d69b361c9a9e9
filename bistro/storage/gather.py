"""Fetch many keys from many buckets at once, all under one deadline: what arrived, and why not.

(The validator's window uses `fetch.fetch_ordered`: the same bounded reads in a seeded order, a few
at a time, through one shared link limit, telling our link's `unfetched` from a slow peer's
`timeout`. `gather` stays for tools and measurements that want every read started at once.)

A validator downloads one delta per uid each window. Every fetch starts at once, in its own thread,
and all share ONE absolute deadline (`time.monotonic()`), whatever their number or order: a slow
peer cannot make a fast one wait for a free worker, and 64 peers that trickle bytes or hang cost
the window the deadline, not 64 timeouts. `gather` returns by the deadline (plus `GRACE`); what has
not arrived by then is `PeerTimeout`.

Abandoning a thread is not a deadline (a blocked read cannot be cancelled), so each store's `get`
bounds its own reads by the same deadline (the peer reader in `peer.py` sets every connect and recv
to the time left): the threads end with the deadline too, none keeps reading after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from .base import PeerTimeout, Store

GRACE = 0.25
"""Seconds past the deadline that `gather` waits for reads finishing at the deadline itself."""


def gather(
    items: Sequence[tuple[Store, str]], *, max_bytes: int, deadline: float
) -> list[bytes | BaseException]:
    """One entry per (store, key), in order: the bytes, or NotFound, TooLarge, StorageError,
    PeerTimeout, BadCommitment (or whatever else that one fetch raised). Never raises for one item.
    `deadline` is absolute (`time.monotonic()`), shared by every item."""
    n = len(items)
    results: list[bytes | BaseException | None] = [None] * n
    done = threading.Condition()

    def work(i: int) -> None:
        store, key = items[i]
        try:
            out: bytes | BaseException = store.get(key, max_bytes=max_bytes, deadline=deadline)
        except Exception as e:  # noqa: BLE001 -- not hidden: it is this item's answer to the caller
            out = e
        with done:
            if results[i] is None:  # not already timed out
                results[i] = out
            done.notify_all()

    # one thread per item (the caller bounds the count: at most max_uids_per_window), all started now
    for i in range(n):
        threading.Thread(target=work, args=(i,), daemon=True, name=f"gather-{i}").start()
    with done:
        while any(r is None for r in results):
            left = deadline + GRACE - time.monotonic()
            if left <= 0:
                break
            done.wait(left)
        for i, r in enumerate(results):
            if r is None:
                store, key = items[i]
                results[i] = PeerTimeout(f"{store.bucket}/{key}: not whole by the deadline")
    return [r for r in results if r is not None]
