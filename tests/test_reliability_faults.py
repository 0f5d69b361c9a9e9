"""Issue 9, faults: storage that fails 30% of calls and a chain that fails intermittently.

Honest miners `a` and `b` upload deltas for windows FIRST..LAST; the real `Validator` scores them
through faulty stores (a real `Store` subclass wrapping the real one) or a faulty chain under the
real `RetryingChain`.
"""

from __future__ import annotations

import json
import logging
import random

import pytest

from bistro.chain.base import Chain, ChainError
from bistro.chain.retry import RetryingChain
from bistro.storage.faulty import FaultyStore

from .reliability_kit import FIRST, LAST, World, honest_blob, make_miner, make_world

WINDOWS = range(FIRST, LAST + 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = make_world(tmp_path_factory.mktemp("faults"), ["a", "b"])
    for name in ("a", "b"):
        miner = make_miner(world, name)
        for w in WINDOWS:
            world.put(name, w, honest_blob(miner, world, w))
    return world


def validator_at(world: World, home: str):
    from bistro.config import replace
    from bistro.validator import Validator

    settings = replace(world.members["val"].settings, dir=str(world.dir / home))
    return Validator(settings)


def records(validator) -> list[dict]:
    lines = (validator.state_dir / "windows.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_thirty_percent_storage_faults(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bistro.node import Node

    real = Node.peer_store
    faulty: dict[str, FaultyStore] = {}
    miners = {world.members[n].bucket for n in ("a", "b")}

    def peer_store(self, commitment: str):
        if commitment not in miners:  # the master's bucket: see the next test
            return real(self, commitment)
        if commitment not in faulty:
            faulty[commitment] = FaultyStore(real(self, commitment), fail_rate=0.3, seed=len(faulty) + 7)
        return faulty[commitment]

    monkeypatch.setattr(Node, "peer_store", peer_store)
    validator = validator_at(world, "storage-faults")
    tolerance = validator.settings.mechanism.storage_tolerance
    caplog.set_level(logging.INFO, logger="bistro")
    for _ in range(2):  # 8 windows: each window twice (scores of a window do not depend on the state)
        for w in WINDOWS:
            validator.evaluate(w)
    got = records(validator)
    assert len(got) == 2 * len(WINDOWS)  # every window completed
    assert sum(s.failures for s in faulty.values()) > 0
    assert "injected fault" in caplog.text  # the failures are logged, with what failed
    uids = [world.members[n].uid for n in ("a", "b")]
    verdicts = {u: [r["uids"][str(u)]["verdict"] for r in got] for u in uids}
    assert any("skip" in v for v in verdicts.values()), verdicts
    for uid, seq in verdicts.items():
        assert set(seq) <= {"ok", "skip", "storage_error"}, seq
        run = 0
        for r, verdict in zip(got, seq, strict=True):
            run = run + 1 if verdict in ("skip", "storage_error") else 0
            # zeroed for our own errors only after `tolerance` windows in a row were forgiven
            assert (verdict == "storage_error") == (run > tolerance), seq
            if verdict == "skip":
                assert r["uids"][str(uid)]["score"] == 0.0
    # a skipped window leaves the moving average where it was
    for uid in uids:
        avgs = [r["uids"][str(uid)]["moving_average"] for r in got]
        for i, verdict in enumerate(verdicts[uid]):
            if verdict == "skip" and i > 0:
                assert avgs[i] == avgs[i - 1]


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
    assert set(weights) == {world.members["a"].uid, world.members["b"].uid}
    assert [r["window"] for r in records(validator)] == list(WINDOWS)
