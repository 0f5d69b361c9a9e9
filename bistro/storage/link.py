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
    limit) with bursts of `burst` bytes. `take(n, deadline)` waits until n bytes may pass, in the
    order asked (each reservation follows the previous one), and raises PeerTimeout (ours: the
    fetcher files it as our link, `Unfetched`) when that would pass the deadline."""

    def __init__(self, bytes_per_second: float = 0.0, burst: int = 1 << 16) -> None:
        if bytes_per_second < 0:
            raise ValueError("bytes_per_second must be >= 0")
        self.rate, self.burst = float(bytes_per_second), burst
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def take(self, n: int, deadline: float) -> float:
        """Wait until `n` more bytes fit the link; the seconds waited."""
        if not self.limited or n <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            # a link idle for a while holds at most `burst` bytes of credit
            start = max(self._free_at, now - self.burst / self.rate)
            end = start + n / self.rate
            if end > deadline:
                raise PeerTimeout("our link: no room before the deadline")
            self._free_at = end
        wait = end - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return max(0.0, wait)


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
    abort: type[PeerTimeout] | None = None
    """Set by the fetcher's watchdog: the next recv raises it."""
    ended: float | None = None

    def peer_seconds(self, now: float | None = None) -> float:
        end = self.ended if self.ended is not None else (time.monotonic() if now is None else now)
        return max(0.0, end - self.started - self.waited)

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
        if self.link is not None and n > 0:
            self.waited += self.link.take(n, self.deadline)


_local = threading.local()


def current() -> Transfer | None:
    """The transfer the calling thread is measuring (None: a read nobody measures)."""
    return getattr(_local, "transfer", None)


def install(transfer: Transfer | None) -> None:
    _local.transfer = transfer
