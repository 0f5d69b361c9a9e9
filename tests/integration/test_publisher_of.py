"""Who publishes is read at a fixed block: every node asking about the same block agrees, before
and after the stake moves (`Chain.top_validator_at`, the embedded chain's stake log)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from bistro.chain.local import LocalChain
from bistro.chain.retry import RetryingChain
from bistro.config import ChainConfig, WalletConfig
from bistro.wallet import open_wallet


def test_the_top_validator_at_a_past_block_does_not_change_when_stake_moves(tmp_path: Path) -> None:
    cfg = ChainConfig(block_time=0.05, tempo=1000, weights_rate_limit=0, max_uids=16, immunity_period=0)
    chain = LocalChain(tmp_path / "c.sqlite", cfg)
    a, b, c = (open_wallet(WalletConfig(name=n, hotkey="h", path=str(tmp_path)), create=True) for n in "abc")
    for w in (a, b, c):
        chain.register(w)
    assert chain.top_validator_at(chain.block()) is None  # no stake yet
    chain.add_stake(a.hotkey.ss58_address, 2000.0)
    chain.add_stake(b.hotkey.ss58_address, 1000.0)
    time.sleep(0.2)
    before = chain.block()
    time.sleep(0.2)
    chain.add_stake(b.hotkey.ss58_address, 5000.0)  # b overtakes a
    time.sleep(0.2)
    after = chain.block()
    other = RetryingChain(LocalChain(tmp_path / "c.sqlite", cfg))  # another node, through the wrapper
    for node in (chain, other):
        assert node.top_validator_at(before) == a.hotkey.ss58_address
        assert node.top_validator_at(after) == b.hotkey.ss58_address
    assert chain.metagraph().top_validator() == b.hotkey.ss58_address


def test_a_chain_file_from_before_the_stake_log_keeps_its_stakes(tmp_path: Path) -> None:
    cfg = ChainConfig(block_time=0.05, tempo=1000, weights_rate_limit=0, max_uids=16, immunity_period=0)
    chain = LocalChain(tmp_path / "c.sqlite", cfg)
    a, b = (open_wallet(WalletConfig(name=n, hotkey="h", path=str(tmp_path)), create=True) for n in "ab")
    chain.register(a), chain.register(b)
    chain.add_stake(a.hotkey.ss58_address, 3000.0)
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("DELETE FROM stake_log")  # as an older version wrote it
    assert chain.top_validator_at(0) == a.hotkey.ss58_address  # the current stake, no history
    chain.add_stake(b.hotkey.ss58_address, 1000.0)  # a's stake is not forgotten by the new log
    assert chain.top_validator_at(chain.block()) == a.hotkey.ss58_address


def test_a_validator_that_becomes_top_continues_the_previous_publishers_master(
    tmp_path: Path, caplog
) -> None:
    """In process: stake moves to `val` at the first block of window LAST (written into the stake
    log at that block). `val` has no state and an empty bucket; it must continue from `top`'s θ_LAST
    (a checkpoint of it in its own bucket, then its update), never publish an initial master; the
    old publisher and a miner then follow it."""
    import json
    import logging

    from bistro import protocol
    from bistro.delta.signed import unpack_signed
    from bistro.validator import Validator

    from ..support.reliability_kit import LAST, honest_blob, make_miner, make_world

    world = make_world(tmp_path, ["a"])
    world.put("a", LAST, honest_blob(make_miner(world, "a"), world, LAST))
    val, top = world.members["val"], world.members["top"]
    block = protocol.window_start(LAST, world.settings.mechanism.blocks_per_window)
    with sqlite3.connect(tmp_path / "chain.sqlite") as db:
        db.execute("INSERT INTO stake_log (block, hotkey, amount) VALUES (?, ?, ?)", (block, val.hotkey, 9e3))
    caplog.set_level(logging.INFO, logger="bistro")
    v = Validator(val.settings)
    v.evaluate(LAST)
    assert "publisher from θ_" in caplog.text and "initial master" not in caplog.text
    store, netuid = world.store("val"), world.settings.chain.netuid
    ckpt, _ = unpack_signed(
        store.get(protocol.checkpoint_key(netuid, LAST)), signer=val.hotkey, max_bytes=1 << 30
    )
    assert ckpt["hash"] == world.master_hash  # top's θ_LAST, not ours
    update, _ = unpack_signed(
        store.get(protocol.update_key(netuid, LAST)), signer=val.hotkey, max_bytes=1 << 30
    )
    assert update["base_hash"] == world.master_hash
    latest = json.loads(store.get(protocol.latest_key(netuid)))
    assert latest["window"] == LAST + 1 and latest["hash"] == update["result_hash"]
    # the old publisher and a miner follow the new one
    old = Validator(top.settings)
    assert old.ensure_master(LAST + 1, world.chain.metagraph())
    assert old.state.position.hash == update["result_hash"]
    miner = make_miner(world, "a")
    assert miner.sync(LAST + 1) and miner.position.hash == update["result_hash"]
