"""The window's fetch (bistro/storage/fetch.py) against real loopback HTTP servers: a seeded order,
bounded concurrency, one shared rate limit on our side, and whose fault the time was: our link
(`unfetched`, no penalty) or the peer (`timeout`: a stall, a trickle, a peer slower than the window's
others)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bistro.config import StorageConfig
from bistro.storage import LocalStore, open_peer_store
from bistro.storage.fetch import SLOW_FLOOR, Unfetched, fetch_ordered
from bistro.storage.link import Link, PeerSlow, PeerStalled
from bistro.verdicts import PEER_FAULTS, V, fetch_verdict

from .test_peer_reads import BLOB, EXPECTED, HostileServer
from .test_peer_reads import KEY as PEER_KEY
from .test_peer_reads import MAX_BYTES as PEER_MAX
from .test_peer_reads import verdict as peer_verdict

KEY = "bistro/212/deltas/7/5Peer.safetensors"
SIZE = 256 * 1024
MAX_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: PacedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        srv = self.server
        with srv.lock:
            srv.started.append(time.monotonic())
        body = srv.body
        try:
            if srv.first_byte_delay:
                srv.stopping.wait(srv.first_byte_delay)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            self.wfile.write(head.encode())
            self.wfile.flush()
            if srv.hang:
                srv.stopping.wait(30)
                return
            step = 4096 if not srv.rate else max(256, min(4096, int(srv.rate / 10)))
            for i in range(0, len(body), step):
                if srv.stopping.is_set():
                    return
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                if srv.rate:
                    srv.stopping.wait(step / srv.rate)
        except OSError:  # the reader gave up: what a bounded reader does
            pass
        self.close_connection = True


class PacedServer(ThreadingHTTPServer):
    """One peer's server on 127.0.0.1: the same body for every key, at `rate` bytes/s (0: as fast
    as loopback goes), or headers then nothing (`hang`), after `first_byte_delay` seconds."""

    daemon_threads = True

    def __init__(self, body: bytes, rate: float = 0.0, hang: bool = False, first_byte_delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body, self.rate, self.hang, self.first_byte_delay = body, rate, hang, first_byte_delay
        self.started: list[float] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def store(self):
        port = self.server_address[1]
        return open_peer_store(f"http+get://127.0.0.1:{port}/x", StorageConfig(retries=0), allow_private=True)

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer(BLOB)
    yield server
    server.stop()


@pytest.fixture
def servers() -> Iterator[list[PacedServer]]:
    made: list[PacedServer] = []
    yield made
    for s in made:
        s.stop()


def body(i: int, size: int = SIZE) -> bytes:
    return bytes([i % 251]) * size


def verdicts(results: list[bytes | BaseException]) -> list[V]:
    return [V.ok if isinstance(r, bytes) else fetch_verdict(r) for r in results]


def test_order_and_concurrency_are_kept(servers: list[PacedServer]) -> None:
    """Reads start in the order given, never more than `concurrency` at once."""
    for i in range(6):
        servers.append(PacedServer(body(i), rate=1 << 20))  # 0.25 s each
    order = [4, 1, 5, 0, 3, 2]
    items = [(servers[i].store(), KEY) for i in order]
    out = fetch_ordered(items, max_bytes=MAX_BYTES, deadline=time.monotonic() + 10, concurrency=2)
    assert [r == body(i) for i, r in zip(order, out, strict=True)] == [True] * 6
    starts = [servers[i].started[0] for i in order]
    # in order (two reads that start together may reach their servers a hair apart) ...
    assert all(later > earlier - 0.05 for earlier, later in zip(starts, starts[1:], strict=False)), starts
    # ... and at most two at a time: each read starts only once one two places before it finished
    assert all(starts[k + 2] - starts[k] > 0.15 for k in range(4)), starts


def test_a_link_that_fits_a_third_marks_the_rest_unfetched_not_timeout(servers: list[PacedServer]) -> None:
    """One token bucket shared by every read (our side): 12 honest peers of 256 KiB, 1 MiB/s for
    1 s: about four fit. The others are `unfetched` (no penalty), none is `timeout`."""
    for i in range(12):
        servers.append(PacedServer(body(i)))
    items = [(s.store(), KEY) for s in servers]
    link = Link(1 << 20)
    t0 = time.monotonic()
    out = fetch_ordered(items, max_bytes=MAX_BYTES, deadline=t0 + 1.0, concurrency=4, link=link, stall=0.5)
    took = time.monotonic() - t0
    got = verdicts(out)
    print(
        f"12 peers, link for a third: {got.count(V.ok)} ok, {got.count(V.unfetched)} unfetched in {took:.2f} s"
    )
    assert not [v for v in got if v in PEER_FAULTS], got
    assert all(r == body(i) for i, r in enumerate(out) if isinstance(r, bytes))
    assert took < 1.0 + 0.8
    # the link serves the reads in the window's order: the first k finish one by one (not all four
    # in flight cut together at the deadline), the rest are unfetched
    k = got.count(V.ok)
    assert 3 <= k <= 5 and got == [V.ok] * k + [V.unfetched] * (12 - k), got


def test_the_same_link_limit_holds_for_local_buckets(tmp_path) -> None:
    """A store that returns whole objects (a local bucket, as in a local network) pays the link
    after `get`: the same third fits, the rest is unfetched."""
    items = []
    for i in range(12):
        store = LocalStore(tmp_path, f"b{i}")
        store.put(KEY, body(i))
        items.append((store, KEY))
    out = fetch_ordered(
        items,
        max_bytes=MAX_BYTES,
        deadline=time.monotonic() + 1.0,
        concurrency=4,
        link=Link(1 << 20),
        stall=0.5,
    )
    got = verdicts(out)
    k = got.count(V.ok)
    assert 3 <= k <= 5 and got == [V.ok] * k + [V.unfetched] * (12 - k), got


def test_a_trickle_just_above_the_floor_is_timeout_and_frees_its_slot(servers: list[PacedServer]) -> None:
    """A peer at 1.5× the absolute floor, far below the window's honest median: `timeout`, cut
    once watched for the stall time (it does not hold a slot until the budget ends)."""
    for i in range(4):
        servers.append(PacedServer(body(i)))
    slow = PacedServer(body(9), rate=1.5 * SLOW_FLOOR)
    servers.append(slow)
    items = [(s.store(), KEY) for s in servers]
    t0 = time.monotonic()
    out = fetch_ordered(items, max_bytes=MAX_BYTES, deadline=t0 + 4.0, concurrency=2, stall=0.6)
    took = time.monotonic() - t0
    assert verdicts(out)[:4] == [V.ok] * 4
    assert isinstance(out[4], PeerSlow) and fetch_verdict(out[4]) == V.timeout, out[4]
    assert took < 2.0, took  # aborted after ~0.6 s of watching, not at the 4 s budget


def test_hung_after_headers_and_slow_first_byte_are_stalls(servers: list[PacedServer]) -> None:
    servers += [
        PacedServer(body(0)),
        PacedServer(body(1), hang=True),
        PacedServer(body(2), first_byte_delay=30),
    ]
    items = [(s.store(), KEY) for s in servers]
    t0 = time.monotonic()
    out = fetch_ordered(items, max_bytes=MAX_BYTES, deadline=t0 + 5.0, concurrency=3, stall=0.5)
    took = time.monotonic() - t0
    assert out[0] == body(0)
    assert isinstance(out[1], PeerStalled) and isinstance(out[2], PeerStalled), out
    assert verdicts(out)[1:] == [V.timeout, V.timeout]
    assert took < 2.0, took


def test_cut_at_a_normal_rate_is_unfetched(servers: list[PacedServer]) -> None:
    """A read still moving at the window's normal rate when the budget ends: our budget, not the
    peer. (All peers pace at 512 KiB/s, so 1 MiB objects cannot finish in 1 s.)"""
    for i in range(4):
        servers.append(PacedServer(body(i, 1 << 20), rate=512 * 1024))
    items = [(s.store(), KEY) for s in servers]
    out = fetch_ordered(items, max_bytes=2 << 20, deadline=time.monotonic() + 1.0, concurrency=4, stall=0.3)
    assert verdicts(out) == [V.unfetched] * 4, out


def test_never_finishing_while_others_would_is_timeout(servers: list[PacedServer]) -> None:
    """A peer just fast enough to pass the slow bar but too slow ever to finish within a budget,
    while the window's median would: `timeout` (it cannot keep itself unjudged by never finishing)."""
    for i in range(4):
        servers.append(PacedServer(body(i)))
    crawl = PacedServer(body(7, 1 << 20), rate=200 * 1024)  # 1 MiB at 200 KiB/s: 5 s > the 1.5 s budget
    servers.append(crawl)
    items = [(s.store(), KEY) for s in servers]
    out = fetch_ordered(
        items, max_bytes=2 << 20, deadline=time.monotonic() + 1.5, concurrency=5, stall=0.3, slow_fraction=0.0
    )
    assert verdicts(out)[:4] == [V.ok] * 4
    assert isinstance(out[4], PeerSlow), out[4]


def test_slow_sybils_cannot_drag_the_bar_under_the_floor(servers: list[PacedServer]) -> None:
    """Eight sybils completing small objects slowly make the window's median theirs: the bar falls
    to the floor, no lower. A trickle under the floor is still `timeout`; honest peers are not
    touched (they are far above any bar)."""
    for i in range(8):
        servers.append(PacedServer(body(i, 8 * 1024), rate=24 * 1024))
    for i in range(3):
        servers.append(PacedServer(body(20 + i)))
    servers.append(PacedServer(body(30), rate=4 * 1024))
    items = [(s.store(), KEY) for s in servers]
    out = fetch_ordered(
        items, max_bytes=MAX_BYTES, deadline=time.monotonic() + 3.0, concurrency=12, stall=0.6
    )
    got = verdicts(out)
    assert got[8:11] == [V.ok] * 3
    assert got[:8] == [V.ok] * 8  # the sybils finished: judged on their bytes (a delta that helps or not)
    assert isinstance(out[11], PeerSlow)


def test_a_store_cannot_claim_unfetched(tmp_path) -> None:
    """Only the fetcher says `unfetched`: the exception raised by a store is that store's error."""

    class Liar(LocalStore):
        def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
            raise Unfetched("not my fault")

    out = fetch_ordered([(Liar(tmp_path, "l"), KEY)], max_bytes=MAX_BYTES, deadline=time.monotonic() + 1)
    assert verdicts(out) == [V.peer_error]


def test_budget_spent_before_a_turn_is_unfetched(servers: list[PacedServer]) -> None:
    servers += [PacedServer(body(0, 1 << 20), rate=512 * 1024), PacedServer(body(1))]
    items = [(s.store(), KEY) for s in servers]
    out = fetch_ordered(items, max_bytes=2 << 20, deadline=time.monotonic() + 0.4, concurrency=1, stall=5.0)
    # the first is still moving (at a normal rate) when the budget ends, the second never gets its turn
    assert verdicts(out) == [V.unfetched, V.unfetched], out
    assert servers[1].started == []


@pytest.mark.parametrize("behaviour", sorted(EXPECTED))
def test_every_hostile_behaviour_keeps_its_verdict(hostile: HostileServer, behaviour: str) -> None:
    """The hostile servers of tests/unit/test_peer_reads.py, read by the window's fetch beside an honest
    peer: each gets the verdict it gets there (trickle, hang and slow first byte: `timeout`), by
    the stall time or the budget, never `unfetched`."""
    name = behaviour.replace("_", "-")
    store = open_peer_store(f"{hostile.url}/{name}", StorageConfig(retries=2), allow_private=True)
    honest = open_peer_store(f"{hostile.url}/honest", StorageConfig(), allow_private=True)
    t0 = time.monotonic()
    out = fetch_ordered([(honest, PEER_KEY), (store, PEER_KEY)], max_bytes=PEER_MAX, deadline=t0 + 1.5)
    took = time.monotonic() - t0
    assert peer_verdict(out[0]) == V.ok
    assert peer_verdict(out[1]) == EXPECTED[behaviour], out[1]
    assert took < 1.5 + 0.8


def test_a_retried_5xx_is_peer_error_not_slow(hostile: HostileServer) -> None:
    """Backoff between retries of a 5xx is not a slow transfer: with a stall time shorter than the
    retries' pauses, the verdict is still the 5xx's `peer_error`."""
    store = open_peer_store(f"{hostile.url}/status-500", StorageConfig(retries=4), allow_private=True)
    out = fetch_ordered([(store, PEER_KEY)], max_bytes=PEER_MAX, deadline=time.monotonic() + 6.0, stall=0.3)
    assert peer_verdict(out[0]) == V.peer_error, out[0]
