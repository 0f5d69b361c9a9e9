"""Faults: storage that fails 30% of calls and a chain that fails intermittently.

Honest miners `a` and `b` upload deltas for windows FIRST..LAST; the real `Validator` scores them
through faulty stores (a real `Store` subclass wrapping the real one) or a faulty chain under the
real `RetryingChain`.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from bistro.chain.base import Chain, ChainError
from bistro.chain.retry import RetryingChain
from bistro.storage.base import Store
from tests.support.faulty import FaultyStore

from ..support.reliability_kit import FIRST, LAST, World, make_miner, make_world

WINDOWS = range(FIRST, LAST + 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, honest_blobs) -> World:
    world = make_world(tmp_path_factory.mktemp("faults"), ["a", "b"])
    for name in ("a", "b"):
        for w in WINDOWS:
            world.put(name, w, honest_blobs.get(world, name, w))
    return world


def validator_at(world: World, home: str):
    from bistro.config import replace
    from bistro.validator import Validator

    settings = replace(world.members["val"].settings, dir=str(world.dir / home))
    return Validator(settings)


def records(validator) -> list[dict]:
    lines = (validator.state_dir / "windows.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def faulty_peers(monkeypatch: pytest.MonkeyPatch, world: World, wrap) -> None:
    """Peer stores of miners `a`/`b` go through `wrap(name, real_store)` (the master's do not)."""
    from bistro.node import Node

    real = Node.peer_store
    names = {world.members[n].bucket: n for n in ("a", "b")}

    def peer_store(self, commitment: str):
        store = real(self, commitment)
        return wrap(names[commitment], store) if commitment in names else store

    monkeypatch.setattr(Node, "peer_store", peer_store)


def verdicts_of(got: list[dict], uid: int) -> list[str]:
    return [r["uids"][str(uid)]["verdict"] for r in got]


def test_thirty_percent_storage_faults_are_the_peers_fault(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    faulty: dict[str, FaultyStore] = {}

    def wrap(name: str, store):
        if name not in faulty:
            faulty[name] = FaultyStore(store, fail_rate=0.3, seed=len(faulty) + 7)
        return faulty[name]

    faulty_peers(monkeypatch, world, wrap)
    validator = validator_at(world, "storage-faults")
    caplog.set_level(logging.INFO, logger="bistro")
    for _ in range(2):  # 8 windows: each window twice (scores of a window do not depend on the state)
        for w in WINDOWS:
            validator.evaluate(w)
    got = records(validator)
    assert len(got) == 2 * len(WINDOWS)  # every window completed
    assert sum(s.failures for s in faulty.values()) > 0
    assert "injected fault" in caplog.text  # the failures are logged, with what failed
    uids = [world.members[n].uid for n in ("a", "b")]
    seqs = {u: verdicts_of(got, u) for u in uids}
    assert any("peer_error" in seq for seq in seqs.values()), seqs
    for uid, seq in seqs.items():
        assert set(seq) <= {"ok", "peer_error"}, seq  # a peer's failure is never forgiven as ours
        avgs = [r["uids"][str(uid)]["moving_average"] for r in got]
        for i, verdict in enumerate(seq):
            if verdict == "peer_error":
                assert got[i]["uids"][str(uid)]["score"] == 0.0
                if i > 0 and avgs[i - 1] > 0:
                    assert avgs[i] < avgs[i - 1]  # it counts: the average decays


def test_a_peer_that_fails_two_windows_in_three_loses_its_weight(
    world: World, monkeypatch: pytest.MonkeyPatch, honest_blobs
) -> None:
    """The one-in-three attack: upload one real window in three, fail the others on purpose
    (here: every storage call fails). It used to be forgiven as our own storage error."""
    down = {"on": False}
    faulty_peers(
        monkeypatch, world, lambda name, s: FaultyStore(s, fail_rate=1.0) if name == "b" and down["on"] else s
    )
    for name in ("a", "b"):  # two more windows (θ is published up to LAST + 2)
        for w in (LAST + 1, LAST + 2):
            world.put(name, w, honest_blobs.get(world, name, w))
    validator = validator_at(world, "two-in-three")
    a, b = world.members["a"].uid, world.members["b"].uid
    pattern = [False, True, True, False, True, True]  # b down in 2 windows of 3
    for w, broken in zip(range(FIRST, LAST + 3), pattern, strict=True):
        down["on"] = broken
        validator.evaluate(w)
    got = records(validator)
    assert verdicts_of(got, b) == ["peer_error" if x else "ok" for x in pattern]
    assert verdicts_of(got, a) == ["ok"] * len(pattern)
    # every failed window counts against it, more than a zero would (mechanism.fault_penalty):
    # avg <- (1 - alpha) avg - alpha * penalty * (mean positive average), never frozen
    m = validator.settings.mechanism
    avgs = [r["uids"][str(b)]["moving_average"] for r in got]
    for i in range(1, len(pattern)):
        if pattern[i]:
            assert got[i]["uids"][str(b)]["score"] == 0.0
            before = [u["moving_average"] for u in got[i - 1]["uids"].values() if u["moving_average"] > 0]
            assert before  # the honest miners' averages, which the penalty is scaled by
            fault = -m.fault_penalty * sum(before) / len(before)
            assert avgs[i] == pytest.approx((1 - m.ma_alpha) * avgs[i - 1] + m.ma_alpha * fault, rel=1e-9)
            assert avgs[i] < (1 - m.ma_alpha) * avgs[i - 1]
            assert got[i]["uids"][str(b)]["weight"] == 0.0  # a window is paid for the work in it
    # two failed windows in a row: no weight (inactive_windows), whatever its average
    assert got[-1]["uids"][str(b)]["weight"] == 0.0
    assert validator.state.last_valid[b] == FIRST + 3


def test_every_peer_failing_at_once_is_still_the_peers_fault(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Most peers failed at once" is no evidence about our side: sybils can arrange it."""
    faulty_peers(monkeypatch, world, lambda name, s: FaultyStore(s, fail_rate=1.0))
    validator = validator_at(world, "all-peers-down")
    validator.evaluate(FIRST)
    got = records(validator)[-1]["uids"]
    assert {got[str(world.members[n].uid)]["verdict"] for n in ("a", "b")} == {"peer_error"}


def test_our_own_bucket_down_skips_the_window_for_everyone(world: World) -> None:
    """The canary (an object we wrote to our own bucket, read in the same gather) fails: no uid
    is judged, every moving average stays where it was; the next window is scored again."""
    validator = validator_at(world, "own-bucket-down")
    validator.evaluate(FIRST)
    before = dict(validator.state.averages)
    assert all(before[world.members[n].uid] != 0.0 for n in ("a", "b"))  # scored: a zero would hide a decay
    own = validator.store
    validator.store = FaultyStore(own, fail_rate=1.0)
    validator.evaluate(FIRST + 1)
    skipped = records(validator)[-1]["uids"]
    assert {r["verdict"] for r in skipped.values()} == {"skip"}
    assert all(r["score"] == 0.0 for r in skipped.values())
    assert validator.state.averages == before
    validator.store = own
    validator.evaluate(FIRST + 2)
    assert {records(validator)[-1]["uids"][str(world.members[n].uid)]["verdict"] for n in ("a", "b")} == {
        "ok"
    }


class Hostile(Store):
    """A peer's store that raises what no store should (a KeyError from a missing header)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.bucket = inner, inner.bucket

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        raise KeyError("Last-Modified")

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def head(self, key: str):
        raise KeyError("Last-Modified")

    def list(self, prefix: str = ""):
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_any_exception_from_a_peer_or_our_decoder_costs_only_that_uid(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import bistro.validator as vmod

    faulty_peers(monkeypatch, world, lambda name, s: Hostile(s) if name == "b" else s)
    validator = validator_at(world, "hostile")
    caplog.set_level(logging.INFO, logger="bistro")
    validator.evaluate(FIRST)
    got = records(validator)[-1]["uids"]
    a, b = str(world.members["a"].uid), str(world.members["b"].uid)
    assert got[b]["verdict"] == "peer_error" and got[a]["verdict"] == "ok"

    real = vmod.decode_delta

    def buggy(blob: bytes, expect):  # a bug of ours, met on one peer's bytes
        if expect.hotkey == world.members["a"].hotkey:
            raise RuntimeError("bug in our decoder")
        return real(blob, expect)

    monkeypatch.setattr(vmod, "decode_delta", buggy)
    validator.evaluate(FIRST + 1)
    got = records(validator)[-1]["uids"]
    assert got[a]["verdict"] == "peer_error"
    assert "Traceback" in caplog.text and "bug in our decoder" in caplog.text  # loud, with the trace


def test_a_slow_peer_is_timeout_at_the_deadline_and_delays_no_one(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from bistro.config import replace

    faulty_peers(
        monkeypatch, world, lambda name, s: FaultyStore(s, fail_rate=0.0, delay=20.0) if name == "b" else s
    )
    validator = validator_at(world, "slow")
    # nothing arrives from b: a stall (the peer's), once nothing came for fetch_stall_seconds
    validator.settings = replace(
        validator.settings, **{"mechanism.fetch_seconds": 1.0, "mechanism.fetch_stall_seconds": 0.5}
    )
    mg = world.chain.metagraph()
    assert validator.ensure_master(FIRST, mg)
    t0 = time.monotonic()
    verdicts = validator.fetch(FIRST, mg, [world.members[n].uid for n in ("a", "b")])
    assert time.monotonic() - t0 < 12.0  # the deadline (1 s), not b's 20 s (slack: a loaded CI box)
    assert verdicts[world.members["b"].uid].verdict == "timeout"
    assert verdicts[world.members["a"].uid].verdict == "ok"


def test_the_fetch_deadline_never_takes_more_than_a_quarter_of_the_window(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 30 s fetch budget in a short window would let one hostile peer push scoring past the next
    window; the validator caps it at FETCH_SHARE of the window."""
    import time

    from bistro.config import replace
    from bistro.validator import FETCH_SHARE

    faulty_peers(
        monkeypatch, world, lambda name, s: FaultyStore(s, fail_rate=0.0, delay=60.0) if name == "b" else s
    )
    validator = validator_at(world, "capped")
    validator.settings = replace(
        validator.settings, **{"mechanism.fetch_seconds": 30.0, "mechanism.fetch_stall_seconds": 0.5}
    )
    window_seconds = validator.bpw * validator.block_time()
    assert validator.fetch_budget() == pytest.approx(min(30.0, FETCH_SHARE * window_seconds))
    assert validator.fetch_budget() < 30.0  # the test world's windows are short
    mg = world.chain.metagraph()
    assert validator.ensure_master(FIRST, mg)
    t0 = time.monotonic()
    verdicts = validator.fetch(FIRST, mg, [world.members[n].uid for n in ("a", "b")])
    assert time.monotonic() - t0 < validator.fetch_budget() + 10.0  # slack: a loaded CI box
    assert verdicts[world.members["b"].uid].verdict == "timeout"


def test_a_failing_master_bucket_leaves_the_window_unscored_not_the_validator_dead(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bistro.node import Node

    real = Node.peer_store
    top = world.members["top"].bucket
    broken = {"on": True}

    def peer_store(self, commitment: str):
        store = real(self, commitment)
        return FaultyStore(store, fail_rate=1.0) if commitment == top and broken["on"] else store

    monkeypatch.setattr(Node, "peer_store", peer_store)
    validator = validator_at(world, "master-faults")
    caplog.set_level(logging.INFO, logger="bistro")
    validator.evaluate(FIRST)  # a StorageError from the master's bucket used to end the process
    assert "not scored" in caplog.text and "injected fault" in caplog.text
    assert not (validator.state_dir / "windows.jsonl").exists()
    broken["on"] = False
    validator.evaluate(FIRST)
    assert [r["window"] for r in records(validator)] == [FIRST]


class FlakyChain(Chain):
    """The real chain, with a seeded fraction of calls raising a transient ChainError first, and
    set_weights refused outright while `down` is set."""

    def __init__(self, inner: Chain, rate: float, seed: int = 3) -> None:
        self.inner, self.netuid, self.rate = inner, inner.netuid, rate
        self.rng = random.Random(seed)
        self.down = False
        self.failures = 0
        self.block_time = inner.block_time

    def _maybe_fail(self, what: str) -> None:
        if self.rng.random() < self.rate:
            self.failures += 1
            raise ChainError(f"{what}: injected timeout", transient=True)

    def block(self) -> int:
        self._maybe_fail("block")
        return self.inner.block()

    def block_hash(self, block: int) -> str:
        self._maybe_fail("block_hash")
        return self.inner.block_hash(block)

    def metagraph(self):
        self._maybe_fail("metagraph")
        return self.inner.metagraph()

    def commitments(self) -> dict[int, str]:
        self._maybe_fail("commitments")
        return self.inner.commitments()

    def commit(self, wallet, data: str) -> None:
        self._maybe_fail("commit")
        self.inner.commit(wallet, data)

    def set_weights(self, wallet, uids, weights) -> None:
        if self.down:
            raise ChainError("set_weights: injected outage", transient=True)
        self._maybe_fail("set_weights")
        self.inner.set_weights(wallet, uids, weights)

    def register(self, wallet) -> int:
        return self.inner.register(wallet)


def chain_weights(world: World, uid: int) -> dict[int, int]:
    rows = world.chain._db.execute("SELECT dst, value FROM weights WHERE src=?", (uid,)).fetchall()
    return dict(rows)


def test_flaky_chain_retries_keeps_scores_and_sets_weights_later(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    reference = validator_at(world, "chain-reference")
    for w in WINDOWS:
        reference.evaluate(w)

    validator = validator_at(world, "chain-faults")
    flaky = FlakyChain(validator.chain.inner, rate=0.3)
    validator.chain = RetryingChain(flaky, attempts=8, base_delay=0.001, max_delay=0.01)
    val_uid = world.members["val"].uid
    world.chain._db.execute("DELETE FROM weights WHERE src=?", (val_uid,))
    caplog.set_level(logging.INFO, logger="bistro")

    flaky.down = True  # set_weights fails for the first two windows: scores are kept, weights wait
    for w in list(WINDOWS)[:2]:
        validator.evaluate(w)
        assert validator.state.weights_pending
    assert chain_weights(world, val_uid) == {}
    assert "will retry next window" in caplog.text
    flaky.down = False
    for w in list(WINDOWS)[2:]:
        validator.evaluate(w)
    assert not validator.state.weights_pending
    assert flaky.failures > 0 and "retry in" in caplog.text  # backoff retries were logged
    assert validator.state.averages == reference.state.averages  # the faults changed no score
    weights = chain_weights(world, val_uid)
    expected = {int(u) for u, r in records(reference)[-1]["uids"].items() if r["weight"] > 0}
    assert expected and set(weights) == expected  # what the fault-free run would set
    assert [r["window"] for r in records(validator)] == list(WINDOWS)


# --- the miner's own upload path -------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A chain whose windows last 10 s, so an upload's deadline is still ahead."""
    return make_world(tmp_path_factory.mktemp("upload"), ["m"], publish=False, **{"chain.block_time": 1.0})


def encoded_window(miner, window: int) -> dict:
    """A delta compressed with the miner's error feedback (the honest path after training);
    returns the delta the residual must hold again if the upload never happens."""
    from bistro.delta.codec import compress

    g = torch.Generator().manual_seed(window)
    delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in miner.params.items()}
    target = {k: v.clone() for k, v in delta.items()}
    miner.unsent = (window, compress(delta, miner.codec, miner.ctx(window), miner.ef))
    return target


def test_upload_retries_through_storage_and_chain_errors_within_the_window(
    live: World, caplog: pytest.LogCaptureFixture
) -> None:
    from bistro.delta.codec import ErrorFeedback

    miner = make_miner(live, "m")
    miner.ef = ErrorFeedback()
    real_store = miner.store
    miner.store = FaultyStore(real_store, fail_rate=0.5, seed=4)
    flaky = FlakyChain(miner.chain.inner, rate=0.5, seed=5)
    miner.chain.inner = flaky  # the RetryingChain gives up at once: every failure reaches the upload
    miner.chain.attempts = 1
    caplog.set_level(logging.INFO, logger="bistro")
    window = miner.window() + 2  # 10-20 s ahead
    encoded_window(miner, window)
    after_compress = {k: v.clone() for k, v in miner.ef.residual.items()}
    miner.upload(window, b"delta bytes")
    done = miner.wait_upload()
    assert done is not None and done.window == window, caplog.text
    assert real_store.get(live.key("m", window)) == b"delta bytes"
    assert miner.store.failures + flaky.failures > 0 and "retry in" in caplog.text
    # it landed: the residual is what the wire did not carry
    assert all(torch.equal(miner.ef.residual[k], after_compress[k]) for k in after_compress)


def test_an_upload_that_never_happens_leaves_its_delta_in_the_residual(live: World) -> None:
    from bistro.delta.codec import ErrorFeedback

    miner = make_miner(live, "m")
    miner.ef = ErrorFeedback()
    miner.store = FaultyStore(miner.store, fail_rate=1.0)
    window = miner.window()  # its deadline is at most a window and two blocks away
    target = encoded_window(miner, window)
    miner.upload(window, b"never lands")
    assert miner.wait_upload() is None  # gave up at the deadline, the miner goes on
    assert miner.store.failures >= 1
    for k, t in target.items():
        assert torch.allclose(miner.ef.residual[k], t, atol=1e-9), k
