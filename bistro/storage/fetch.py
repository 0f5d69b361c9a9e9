"""A window's peer reads over an ordinary link: in a given (seeded) order, a few at a time, under the
window's fetch budget; what our own link could not fetch is `Unfetched`, not the peer's fault.

`gather` (gather.py) starts every read at once under one deadline: 256 deltas of 138 MiB on a
1 Gbit/s link all fail together at the deadline, every one a `timeout` the peers did not cause.
`fetch_ordered` runs at most `concurrency` reads at a time, taking the items in the caller's order
(`sample.fetch_order`: the same on every validator, unknown to miners before uploads close), so
objects finish one by one, and tells apart, for each item:

- **never started**: the budget ran out before its turn: `Unfetched` (our link).
- **stalled**: no byte for `stall` seconds (at most half the budget; connect, first byte, or body;
  a hung connection): `PeerStalled`, a timeout (the peer's fault). A store that returns whole
  objects (a local bucket, emulating a peer's server) shows no byte until its `get` returns: the
  time inside it is the peer's.
- **slow**: watched for at least `stall` seconds, its rate (its bytes over *its* time: waits on our
  own rate limit left out) is below `slow_fraction` × the median rate of this window's completed
  reads (once `MIN_COMPARED` have completed), or below `SLOW_FLOOR` whatever the others do:
  `PeerSlow`, a timeout. The watchdog aborts it at once, so a trickle does not hold a slot.
- **cut by the budget**: still moving at the budget's end. `Unfetched` if its rate was normal
  (not slow by the rule above), unless its object could not have arrived within a whole budget at
  its own rate while it could at the window's median rate (then `PeerSlow`: a peer cannot keep
  itself unfetched, and so unjudged, by being just fast enough never to finish).
- anything else (bytes, NotFound, TooLarge, StorageError, ...) is what the store said, as in `gather`.

Our link: an optional `Link` shared by every read (`mechanism.link_bytes_per_second`). The peer
reader pays for each recv as it arrives; a store that returns whole objects (a local bucket) is paid
for after `get`, chunk by chunk, so the same limit holds in a local network.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence

from . import link as _link
from .base import PeerTimeout, StorageError, Store
from .link import Link, PeerSlow, PeerStalled, Transfer

GRACE = 0.25
"""Seconds past the deadline the fetcher waits for reads finishing at the deadline itself."""
SLOW_FLOOR = 16 * 1024
"""Bytes/s below which a peer is slow whatever the window's other peers do (a 64 MiB delta takes
over an hour at this rate)."""
MIN_COMPARED = 3
"""Completed reads needed before the window's median rate is a bar."""
TICK = 0.05
"""Seconds between the watchdog's looks at the reads in progress."""
PAY_CHUNK = 1 << 16


class Unfetched(Exception):
    """Our own link could not fetch the object within the window's budget (not the peer's fault).
    Only the fetcher makes it: one raised by a store is that store's error (`StorageError`)."""


class _Slot:
    def __init__(self) -> None:
        self.transfer: Transfer | None = None
        self.result: bytes | BaseException | None = None
        self.done = False


def fetch_ordered(
    items: Sequence[tuple[Store, str]],
    *,
    max_bytes: int,
    deadline: float,
    concurrency: int = 8,
    link: Link | None = None,
    stall: float = 10.0,
    slow_fraction: float = 0.1,
) -> list[bytes | BaseException]:
    """One entry per (store, key), in the order given: the bytes, `Unfetched`, `PeerStalled` /
    `PeerSlow` (timeouts), or whatever that read raised. Reads run `concurrency` at a time in the
    order of `items`; all end by `deadline` (absolute, `time.monotonic()`). Never raises for an item."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    start = time.monotonic()
    budget = max(deadline - start, 1e-6)
    stall = min(stall, budget / 2)  # a budget shorter than the stall time: half of it without a byte
    slots = [_Slot() for _ in items]
    lock = threading.Condition()
    nxt = [0]
    completed_rates: list[float] = []

    def pay(t: Transfer, data: bytes) -> None:
        """A store that returned the whole object at once: pass its bytes through our link now."""
        for i in range(0, len(data), PAY_CHUNK):
            if t.abort is not None:
                raise t.abort("the window's slow bar: aborted")
            t.got(len(data[i : i + PAY_CHUNK]))

    def work() -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= len(items) or time.monotonic() >= deadline:
                    return
                nxt[0] += 1
                t = Transfer(deadline=deadline, stall=stall, link=link, priority=i)
                slots[i].transfer = t
            store, key = items[i]
            _link.install(t)
            try:
                data = store.get(key, max_bytes=max_bytes, deadline=deadline)
                if not t.inline:
                    pay(t, data)
                out: bytes | BaseException = data
            except Unfetched as e:  # only we say unfetched: from a store, it is its error
                out = StorageError(f"{store.bucket}/{key}: {e}")
            except Exception as e:  # noqa: BLE001 -- not hidden: it is this item's answer to the caller
                out = e
            finally:
                _link.install(None)
            with lock:
                t.ended = time.monotonic()
                slots[i].result, slots[i].done = out, True
                if isinstance(out, bytes | bytearray) and t.received > 0:
                    completed_rates.append(t.rate())
                lock.notify_all()

    workers = [
        threading.Thread(target=work, daemon=True, name=f"fetch-{k}")
        for k in range(min(concurrency, len(items)))
    ]
    for w in workers:
        w.start()

    def bar() -> float:
        if len(completed_rates) < MIN_COMPARED:
            return SLOW_FLOOR
        return max(SLOW_FLOOR, slow_fraction * statistics.median(completed_rates))

    with lock:
        while not all(s.done for s in slots if s.transfer is not None) or (
            nxt[0] < len(items) and time.monotonic() < deadline
        ):
            now = time.monotonic()
            if now >= deadline + GRACE:
                break
            limit = bar()
            for s in slots:  # the watchdog: a read watched long enough and below the bar is slow
                t = s.transfer
                if t is None or s.done or t.abort is not None or t.pausing:
                    continue
                if t.peer_seconds(now) >= stall and t.rate(now) < limit:
                    t.abort = PeerSlow
            lock.wait(TICK)
        return [_judge(s, budget, bar(), completed_rates, stall) for s in slots]


def _judge(s: _Slot, budget: float, limit: float, rates: list[float], stall: float) -> bytes | BaseException:
    """The item's answer (module docstring): what the store said, or whose fault the time was."""
    t = s.transfer
    if t is None:
        return Unfetched("the fetch budget ran out before its turn")
    if s.done and not isinstance(s.result, PeerTimeout):
        return s.result  # type: ignore[return-value]
    if isinstance(s.result, PeerStalled | PeerSlow):
        return s.result
    # in progress at the budget's end (or its read gave up there)
    now = t.ended or time.monotonic()
    watched = t.peer_seconds(now)
    if watched >= stall and t.received == 0:
        return PeerStalled(f"nothing in {watched:.1f} s")
    if watched >= stall and t.rate(now) < limit:
        return PeerSlow(f"{t.rate(now):.0f} B/s, under the window's bar of {limit:.0f} B/s")
    if t.size and t.received and len(rates) >= MIN_COMPARED:
        own, median = t.size / max(t.rate(now), 1e-9), t.size / statistics.median(rates)
        if own > budget >= median:
            return PeerSlow(
                f"{own:.0f} s for its object at its rate; the window's median takes {median:.0f} s"
            )
    return Unfetched(f"in progress at the budget's end ({t.received} bytes, {t.rate(now):.0f} B/s)")
