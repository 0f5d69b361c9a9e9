"""The embedded SQLite chain: real files, real wallets, real processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bistro.chain.base import ChainError
from bistro.chain.local import LocalChain
from bistro.config import ChainConfig, WalletConfig
from bistro.wallet import open_wallet

ROOT = Path(__file__).resolve().parents[2]


def cfg(**kw) -> ChainConfig:
    base = dict(block_time=0.05, tempo=1000, weights_rate_limit=0, max_uids=16, immunity_period=0)
    base.update(kw)
    return ChainConfig(**base)


@pytest.fixture(scope="module")
def wallets(tmp_path_factory: pytest.TempPathFactory) -> list:
    path = tmp_path_factory.mktemp("wallets")
    return [
        open_wallet(WalletConfig(name=f"w{i}", hotkey="h", path=str(path)), create=True) for i in range(6)
    ]


def hk(wallet) -> str:
    return wallet.hotkey.ss58_address


def test_blocks_follow_the_clock_and_parameters_come_from_the_file(tmp_path: Path) -> None:
    first = LocalChain(tmp_path / "c.sqlite", cfg(block_time=0.05, tempo=7))
    later = LocalChain(tmp_path / "c.sqlite", cfg(block_time=12.0, tempo=3))
    assert (later.block_time, later.tempo, later.genesis) == (0.05, 7, first.genesis)
    start = first.block()
    reached = later.wait_for_block(start + 3, timeout=5)
    assert reached >= start + 3 and first.block() >= start + 3
    assert first.block_hash(start) == later.block_hash(start)
    assert first.block_hash(start) != first.block_hash(start + 1)
    assert first.block_hash(0).startswith("0x") and len(first.block_hash(0)) == 66
    other = LocalChain(tmp_path / "other.sqlite", cfg())
    assert other.block_hash(0) != first.block_hash(0)
    assert later.block_time == 0.05 and first.activity_cutoff == 5000
    with pytest.raises(ChainError, match="does not exist yet"):
        first.block_hash(first.block() + 1000)
    with pytest.raises(ChainError):
        first.wait_for_block(first.block() + 10_000, timeout=0.05)


def test_registration_is_idempotent_and_commitments_follow_the_rules(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg())
    assert [chain.register(w) for w in wallets[:3]] == [0, 1, 2]
    assert chain.register(wallets[1]) == 1
    chain.commit(wallets[0], "first")
    chain.commit(wallets[0], "b" * 128)  # latest wins; 128 bytes is allowed
    chain.commit(wallets[2], "bucket-2")
    with pytest.raises(ChainError, match="129 bytes"):
        chain.commit(wallets[2], "x" * 129)
    with pytest.raises(ChainError, match="130 bytes"):
        chain.commit(wallets[2], "é" * 65)  # 130 bytes in UTF-8
    with pytest.raises(ChainError, match="not registered"):
        chain.commit(wallets[5], "sneaky")
    assert chain.commitments() == {0: "b" * 128, 2: "bucket-2"}
    mg = chain.metagraph()
    assert mg.hotkeys == [hk(w) for w in wallets[:3]] and mg.uid_of(hk(wallets[2])) == 2


def test_bad_weights_are_refused_and_change_nothing(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(max_validators=1))
    for w in wallets[:4]:
        chain.register(w)
    chain.add_stake(hk(wallets[0]), 10.0)
    chain.add_stake(hk(wallets[1]), 1.0)  # staked, but below the one permit
    chain.set_weights(wallets[0], [2, 3], [1.0, 1.0])
    before = chain.metagraph()
    cases = [
        (wallets[5], [2], [1.0], "not registered"),
        (wallets[1], [2], [1.0], "no validator permit"),
        (wallets[2], [2], [1.0], "no validator permit"),
        (wallets[0], [2, 3], [1.0], "2 uids but 1 weights"),
        (wallets[0], [2, 3], [1.0, float("nan")], "NaN or negative"),
        (wallets[0], [2, 3], [1.0, -0.5], "NaN or negative"),
        (wallets[0], [2, 2], [1.0, 1.0], "duplicate"),
        (wallets[0], [2, 9], [1.0, 1.0], r"uids \[9\] do not exist"),
        (wallets[0], [-1], [1.0], "do not exist"),
    ]
    for wallet, uids, weights, reason in cases:
        with pytest.raises(ChainError, match=reason):
            chain.set_weights(wallet, uids, weights)
    after = chain.metagraph()
    assert after.weights == before.weights == {0: {2: 0.5, 3: 0.5}}
    np.testing.assert_array_equal(after.last_update, before.last_update)
    np.testing.assert_array_equal(after.validator_permit, [True, False, False, False])


def test_weights_are_quantised_to_u16_by_max_upscaling(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg())
    for w in wallets[:4]:
        chain.register(w)
    chain.add_stake(hk(wallets[0]), 1.0)
    chain.set_weights(wallets[0], [1, 2, 3], [0.5, 0.25, 0.0])
    with sqlite3.connect(chain.path) as db:
        stored = db.execute("SELECT dst, value FROM weights WHERE src=0 ORDER BY dst").fetchall()
    assert stored == [(1, 65535), (2, 32768)]  # zero weights are not stored, as on the chain
    assert chain.metagraph().weights == {0: {1: 65535 / 98303, 2: 32768 / 98303}}


def test_rate_limit_says_how_long_to_wait(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(weights_rate_limit=3))
    chain.register(wallets[0])
    chain.register(wallets[1])
    chain.add_stake(hk(wallets[0]), 1.0)
    chain.set_weights(wallets[0], [1], [1.0])
    first = int(chain.metagraph().last_update[0])
    try:
        chain.set_weights(wallets[0], [1], [0.5])
    except ChainError as e:
        assert "rate limited" in str(e) and "wait" in str(e) and not e.transient
    else:  # the clock may have moved 3 blocks already on a very slow machine: then it must work
        assert chain.block() >= first + 3
    chain.wait_for_block(first + 3, timeout=5)
    chain.set_weights(wallets[0], [1], [1.0])
    assert chain.metagraph().last_update[0] >= first + 3


def test_rate_limit_refusal_with_a_long_limit(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(weights_rate_limit=100_000))
    chain.register(wallets[0])
    chain.add_stake(hk(wallets[0]), 1.0)
    chain.set_weights(wallets[0], [0], [1.0])
    with pytest.raises(ChainError, match=r"wait \d+ more block"):
        chain.set_weights(wallets[0], [0], [1.0])


def test_epochs_give_incentive_to_the_uids_weighted(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(block_time=0.05, tempo=20))
    for w in wallets[:4]:
        chain.register(w)
    chain.add_stake(hk(wallets[0]), 5.0)
    chain.set_weights(wallets[0], [1, 2], [3.0, 1.0])
    if chain.block() < 20:  # no epoch yet: incentive only changes at epochs
        assert chain.metagraph().I.sum() == 0
    chain.wait_for_block(20, timeout=10)
    mg = LocalChain(tmp_path / "c.sqlite", cfg()).metagraph()  # another opener sees the same epoch
    np.testing.assert_allclose(mg.I, [0, 0.75, 0.25, 0], atol=1e-4)
    np.testing.assert_allclose(mg.D, [1, 0, 0, 0])
    assert mg.top_validator() == hk(wallets[0])


def test_full_subnet_replaces_the_lowest_emission_uid_and_clears_it(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(max_uids=3, tempo=2, immunity_period=0))
    for w in wallets[:3]:
        chain.register(w)
    chain.add_stake(hk(wallets[0]), 10.0)
    chain.add_stake(hk(wallets[2]), 1.0)
    chain.set_weights(wallets[0], [1, 2], [1.0, 0.5])
    chain.set_weights(wallets[2], [1], [1.0])
    chain.commit(wallets[2], "bucket-2")
    chain.wait_for_block(chain.block() + 3, timeout=5)
    mg = chain.metagraph()
    emission = mg.I + mg.D
    assert int(np.argmin(emission)) == 2 and emission[2] > 0  # uid 2 earns least (computed by hand)
    assert chain.register(wallets[3]) == 2
    mg = chain.metagraph()
    assert mg.hotkey_of(2) == hk(wallets[3])
    assert mg.weights == {0: {1: 1.0}}  # weights by and to uid 2 are gone
    assert chain.commitments() == {}
    assert (mg.I[2], mg.D[2], mg.S[2]) == (0.0, 0.0, 0.0)
    with sqlite3.connect(chain.path) as db:
        assert db.execute("SELECT COUNT(*) FROM bonds WHERE src=2 OR dst=2").fetchone()[0] == 0


def test_full_subnet_with_only_immune_uids_refuses(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(max_uids=2, immunity_period=100_000))
    chain.register(wallets[0])
    chain.register(wallets[1])
    with pytest.raises(ChainError, match="full"):
        chain.register(wallets[2])
    assert chain.metagraph().n == 2


KEY = """
class Key:  # a wallet as the chain sees it (only the hotkey's address): keeps start-up fast
    def __init__(self, address):
        self.hotkey = type("Hotkey", (), {"ss58_address": address})()
"""

WORKER = KEY + textwrap.dedent(
    """
    import os, sys, time
    from bistro.chain.local import LocalChain
    from bistro.config import ChainConfig
    path, address, go = sys.argv[1:4]
    print("ready", flush=True)
    while not os.path.exists(go):  # start together, so the writes really overlap
        time.sleep(0.005)
    chain = LocalChain(path, ChainConfig(block_time=0.05))
    key = Key(address)
    uid = chain.register(key)
    for i in range(20):
        chain.commit(key, f"bucket-{address[:6]}-{i}")
    print(uid, flush=True)
    """
)


@pytest.mark.slow
def test_concurrent_processes_register_and_commit_on_one_file(tmp_path: Path, wallets) -> None:
    path = tmp_path / "c.sqlite"  # not created yet: the processes race to create it too
    go = tmp_path / "go"
    addresses = [hk(w) for w in wallets]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), a, str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for a in addresses
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    uids = {}
    for a, p in zip(addresses, procs, strict=True):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        uids[a] = int(out.strip())
    assert sorted(uids.values()) == list(range(len(addresses)))
    chain = LocalChain(path, cfg())
    assert chain.block_time == 0.05
    assert chain.commitments() == {uid: f"bucket-{a[:6]}-19" for a, uid in uids.items()}
    mg = chain.metagraph()
    assert {a: mg.uid_of(a) for a in addresses} == uids


OPENER = KEY + textwrap.dedent(
    """
    import os, sys, time
    from bistro.chain.local import LocalChain
    from bistro.config import ChainConfig
    base, address, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    for r in range(rounds):  # every round, all workers race to create and write a fresh file
        while not os.path.exists(f"{base}-go{r}"):
            time.sleep(0.002)
        chain = LocalChain(f"{base}-{r}.sqlite", ChainConfig(block_time=0.05), busy_timeout=20)
        chain.register(Key(address))
        chain.commit(Key(address), f"b-{r}")
        chain.close()
        open(f"{base}-done{r}-{address[:8]}", "w").close()
    """
)


@pytest.mark.slow
def test_many_processes_race_to_create_and_open_one_file_without_an_error(tmp_path: Path, wallets) -> None:
    """The open race seen in CI (`database is locked` from the journal-mode pragma), in a loop."""
    base, rounds = str(tmp_path / "race"), 12
    addresses = [hk(w) for w in wallets]
    procs = [
        subprocess.Popen([sys.executable, "-c", OPENER, base, a, str(rounds)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for a in addresses
    ]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for r in range(rounds):
            Path(f"{base}-go{r}").touch()
            deadline = time.monotonic() + 60
            while len(list(tmp_path.glob(f"race-done{r}-*"))) < len(addresses):
                # a worker that wrote its last done file may already have exited, with 0
                failed = [p for p in procs if p.poll() not in (None, 0)]
                assert not failed, [p.communicate()[1] for p in failed]
                assert time.monotonic() < deadline, f"round {r} stuck"
                time.sleep(0.005)
            chain = LocalChain(f"{base}-{r}.sqlite", cfg())
            assert sorted(chain.commitments().values()) == [f"b-{r}"] * len(addresses)
            chain.close()
        for p in procs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
    finally:  # a failed round leaves the others waiting for a start signal that never comes
        for p in procs:
            if p.poll() is None:
                p.kill()


WRITER = KEY + textwrap.dedent(
    """
    import itertools, sys
    from bistro.chain.base import ChainError
    from bistro.chain.local import LocalChain
    from bistro.config import ChainConfig

    path = sys.argv[1]
    chain = LocalChain(path, ChainConfig(block_time=0.01, tempo=3, weights_rate_limit=0, max_uids=4,
                                         immunity_period=0))
    keys = [Key("5" + chr(65 + i) * 47) for i in range(8)]
    print("ready", flush=True)
    for i in itertools.count():
        key = keys[i % len(keys)]
        uid = chain.register(key)
        chain.add_stake(key.hotkey.ss58_address, 1.0)
        chain.commit(key, f"b{i}")
        n = chain.metagraph().n
        try:
            chain.set_weights(key, list(range(n)), [1.0] * n)
        except ChainError as e:  # no permit yet is fine here; any other refusal is a failure
            if "permit" not in str(e):
                raise
    """
)


def check_invariants(path: Path) -> None:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        uids = [r[0] for r in db.execute("SELECT uid FROM neurons ORDER BY uid")]
        assert uids == list(range(len(uids))) and len(uids) <= 4
        for table in ("weights", "bonds"):
            bad = db.execute(f"SELECT COUNT(*) FROM {table} WHERE src >= ? OR dst >= ?", (len(uids),) * 2)
            assert bad.fetchone()[0] == 0
        keys = {r[0] for r in db.execute("SELECT key FROM meta")}
        assert {"chain_id", "genesis", "block_time", "last_epoch"} <= keys


@pytest.mark.slow
def test_killing_writers_mid_transaction_leaves_the_file_consistent(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(float(rng.uniform(0.05, 0.4)))
        assert proc.poll() is None, proc.stderr.read()  # still writing when killed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        check_invariants(path)
    assert LocalChain(path, cfg()).metagraph().n == 4


def test_future_block_hashes_cannot_be_computed_from_the_file(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(block_time=0.05))
    target = chain.block() + 6
    chain.close()
    # A miner holding a copy of the whole file before the block exists learns nothing about its hash.
    (tmp_path / "copy.sqlite").write_bytes((tmp_path / "c.sqlite").read_bytes())
    original, copy = LocalChain(tmp_path / "c.sqlite", cfg()), LocalChain(tmp_path / "copy.sqlite", cfg())
    assert copy.genesis == original.genesis and copy.chain_id == original.chain_id
    original.wait_for_block(target, timeout=5)
    assert original.block_hash(target) != copy.block_hash(target)
    assert original.block_hash(target) == LocalChain(tmp_path / "c.sqlite", cfg()).block_hash(target)


HASHER = KEY + textwrap.dedent(
    """
    import os, sys, time
    from bistro.chain.local import LocalChain
    from bistro.config import ChainConfig
    path, block, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    chain = LocalChain(path, ChainConfig(block_time=0.05))
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    chain.wait_for_block(block, timeout=20)
    print(chain.block_hash(block), flush=True)
    """
)


def test_processes_that_ask_for_a_new_block_at_once_agree_on_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    block = LocalChain(path, cfg(block_time=0.05)).block() + 40  # all wait, then ask together
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HASHER, str(path), str(block), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for _ in range(4)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    hashes = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(hashes) == 1 and next(iter(hashes)).startswith("0x")
    assert LocalChain(path, cfg()).block_hash(block) in hashes


def test_a_validator_past_the_activity_cutoff_stops_counting(tmp_path: Path, wallets) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", cfg(block_time=0.05, tempo=30, activity_cutoff=12))
    for w in wallets[:4]:
        chain.register(w)
    chain.add_stake(hk(wallets[0]), 6.0)
    chain.add_stake(hk(wallets[1]), 4.0)
    chain.set_weights(wallets[0], [2], [1.0])  # at block ~0: inactive by the epoch at block 30
    chain.wait_for_block(20, timeout=10)
    chain.set_weights(wallets[1], [3], [1.0])
    chain.wait_for_block(30, timeout=10)
    mg = chain.metagraph()
    # With v0 active, its larger stake would hold uid 2 up (test_yuma); past the cutoff, v1 decides.
    np.testing.assert_allclose(mg.I, [0, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(mg.validator_trust, [0, 1, 0, 0], atol=1e-6)
