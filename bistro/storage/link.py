"""Our side of a peer read: one shared rate limit for all of a validator's peer reads (`Link`), and
the measurement of each read (`Transfer`) that tells a slow peer from our own slow link.

A `Transfer` is installed for the current thread by the fetcher (`fetch.fetch_ordered`); the peer
reader (`peer.py`) reports every recv to it, waits on the link there, and bounds each recv by the
transfer's stall time. Time spent waiting on our own link is ours, not the peer's: the peer's rate is
its bytes over the time *it* took (`peer_seconds`), so a validator that limits its own link does not
make honest peers look slow.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .base import PeerTimeout


class PeerStalled(PeerTimeout):
    """The peer sent nothing for the transfer's stall time (connect, first byte or body): its fault."""


class PeerSlow(PeerTimeout):
    """The peer's rate fell below the window's slow bar while we watched: its fault."""


class Link:
    """One token bucket shared by every peer read of this node: at most `bytes_per_second` (0: no
    limit), with at most `burst` bytes of credit saved while idle. Reads waiting for the link are
    served in priority order (the window's fetch order: lower first), so objects finish one by one
    instead of all sharing the link and all being cut at the budget's end; a later read gets
    bandwidth while earlier ones wait on their peers. `take` raises PeerTimeout (our link: the
    fetcher files it as `unfetched`) when the deadline passes first."""

    def __init__(self, bytes_per_second: float = 0.0, burst: int = 1 << 16) -> None:
        if bytes_per_second < 0:
            raise ValueError("bytes_per_second must be >= 0")
        self.rate, self.burst = float(bytes_per_second), burst
        self._cond = threading.Condition()
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._waiting: list[tuple[int, int]] = []

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def _refill(self, now: float) -> None:
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: int, deadline: float, priority: int = 0) -> float:
        """Wait until `n` more bytes may pass (the credit may go below zero once it is this read's
        turn: the next reads wait for it); the seconds waited."""
        if not self.limited or n <= 0:
            return 0.0
        t0 = time.monotonic()
        me = (priority, threading.get_ident())
        with self._cond:
            self._waiting.append(me)
            try:
                while True:
                    now = time.monotonic()
                    self._refill(now)
                    if min(self._waiting) == me and self._tokens > 0:
                        self._tokens -= n
                        return time.monotonic() - t0
                    if now >= deadline:
                        raise PeerTimeout("our link: no room before the deadline")
                    need = max(-self._tokens, 1.0) / self.rate
                    self._cond.wait(min(deadline - now, max(need, 1e-3)))
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()


@dataclass
class Transfer:
    """One read being measured (all times `time.monotonic()`)."""

    deadline: float
    stall: float
    """Seconds without a byte after which the read is the peer's stall."""
    link: Link | None = None
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    """Bytes received from the peer so far (headers included)."""
    waited: float = 0.0
    """Seconds spent waiting on our own link (not the peer's time)."""
    last_progress: float = field(default_factory=time.monotonic)
    size: int | None = None
    """The object's declared size, once its headers said it."""
    inline: bool = False
    """The reader reported its recvs itself (a store that does not is paid for after `get`)."""
    priority: int = 0
    """The read's place in the window's fetch order (the link serves lower first)."""
    waiting_since: float | None = None
    """Set while the read waits on our link (that time is ours, not the peer's)."""
    pausing: bool = False
    """Between two attempts (the reader's backoff): not watched."""
    abort: type[PeerTimeout] | None = None
    """Set by the fetcher's watchdog: the next recv raises it."""
    ended: float | None = None

    def restart(self) -> None:
        """A new attempt of the same read (after a retried 5xx or a dropped connection): measured
        from now, so the backoff pause is judged by the attempt's answer, not as a slow transfer."""
        now = time.monotonic()
        self.started = self.last_progress = now
        self.received, self.waited, self.size, self.pausing = 0, 0.0, None, False

    def peer_seconds(self, now: float | None = None) -> float:
        end = self.ended if self.ended is not None else (time.monotonic() if now is None else now)
        ours = self.waited + (end - self.waiting_since if self.waiting_since is not None else 0.0)
        return max(0.0, end - self.started - ours)

    def rate(self, now: float | None = None) -> float:
        """The peer's bytes per second so far (our link's waits left out)."""
        return self.received / max(self.peer_seconds(now), 1e-6)

    def recv_timeout(self) -> float:
        """How long the next recv may wait: the stall time, and never past the deadline."""
        if self.abort is not None:
            raise self.abort("the window's slow bar: aborted")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout("not whole by the deadline")
        return min(left, self.stall)

    def got(self, n: int) -> None:
        """`n` bytes arrived from the peer: count them, then pay for them on our link."""
        self.inline = True
        now = time.monotonic()
        if n > 0:
            self.received += n
            self.last_progress = now
        if self.link is not None and self.link.limited and n > 0:
            self.waiting_since = now
            try:
                self.link.take(n, self.deadline, self.priority)
            finally:
                self.waited += time.monotonic() - now
                self.waiting_since = None


_local = threading.local()


def current() -> Transfer | None:
    """The transfer the calling thread is measuring (None: a read nobody measures)."""
    return getattr(_local, "transfer", None)


def install(transfer: Transfer | None) -> None:
    _local.transfer = transfer
