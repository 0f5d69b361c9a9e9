"""Nothing a long run keeps grows without bound.

windows.jsonl rotates into numbered archives and start-up reads only the current file; master
hashes, peer stores and publishers are capped; the tokenized page cache is evicted by size; a
validator keeps no θ on its own disk (it catches up from the publisher's bucket).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bistro.config import replace

from ..support.reliability_kit import FIRST, LAST, World, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, honest_blobs) -> World:
    world = make_world(tmp_path_factory.mktemp("bounded"), ["a"])
    for w in range(FIRST, LAST + 1):
        world.put("a", w, honest_blobs.get(world, "a", w))
    return world


def validator_at(world: World, home: str):
    from bistro.validator import Validator

    return Validator(replace(world.members["val"].settings, dir=str(world.dir / home)))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_windows_jsonl_rotates_and_start_up_reads_only_the_current_file(world: World) -> None:
    from bistro.validator import Validator

    Validator.records_per_file, Validator.archives_kept = 3, 2
    try:
        v = validator_at(world, "rotate")
        for _ in range(3):
            for w in range(FIRST, LAST + 1):
                v.evaluate(w)  # 12 records: 4 files of 3
        d = v.state_dir
        archives = sorted(p.name for p in d.glob("windows-*.jsonl"))
        assert archives == ["windows-000002.jsonl", "windows-000003.jsonl"]  # the oldest deleted
        assert len(lines(d / "windows.jsonl")) == 3
        assert [r["window"] for r in lines(d / "windows-000003.jsonl")] == [3, 4, 1]
        # a record written but not saved (killed in the gap) sits in the current file only
        with open(d / "windows.jsonl", "a") as f:
            f.write(json.dumps({"window": LAST + 1, "uids": {}}) + "\n")
        again = validator_at(world, "rotate")
        assert again.log.lines == 3 and len(lines(d / "windows.jsonl")) == 3
    finally:
        Validator.records_per_file, Validator.archives_kept = 1000, 4


def test_a_validator_keeps_no_master_on_disk_and_catches_up_after_a_restart(world: World) -> None:
    v = validator_at(world, "no-theta")
    v.evaluate(FIRST)
    assert not list(v.state_dir.glob("*.safetensors"))
    saved = json.loads((v.state_dir / "state.json").read_text())
    assert "position" not in saved
    again = validator_at(world, "no-theta")
    assert again.state.position is None
    again.evaluate(FIRST + 1)  # caught up from the publisher's bucket
    assert again.state.position.hash == world.master_hash
    assert (
        lines(again.state_dir / "windows.jsonl")[-1]["uids"][str(world.members["a"].uid)]["verdict"] == "ok"
    )


def test_hashes_peer_stores_and_publishers_are_capped(world: World) -> None:
    from bistro import node
    from bistro.master import Position
    from bistro.validator import HASHES_KEPT, State

    v = validator_at(world, "caps")
    for w in range(100):
        v._hold(Position(w, f"{w:064x}"))
    assert sorted(v.state.hashes) == list(range(100 - HASHES_KEPT, 100))
    assert len(State.from_json({"hashes": {str(w): "h" for w in range(100)}}).hashes) == HASHES_KEPT
    for i in range(node.MAX_PEER_STORES + 50):  # commitments are whatever miners write on chain
        v.peer_store(f"bucket-{i:05d}")
    assert len(v._peers) == node.MAX_PEER_STORES and "bucket-00000" not in v._peers
    mg = world.chain.metagraph()
    for w in range(node.MAX_PUBLISHERS + 10):
        assert v.publisher_of(w, mg) == world.members["top"].hotkey
    assert len(v._publishers) <= node.MAX_PUBLISHERS


def test_the_page_cache_is_evicted_by_size_least_recently_used_first(world: World, tmp_path: Path) -> None:
    from bistro.data import Dataset

    shared = Dataset.open(world.settings)
    one = len(shared._path(0).read_bytes()) if shared._path(0).exists() else None
    bound = 40_000
    d = Dataset(shared.corpus, shared.tokenizer, shared.sequence_length, shared.page_settings, str(tmp_path),
                cache_bytes=bound)  # fmt: skip
    d.page_tokens(0)
    for page in range(1, 60):
        d.page_tokens(page)
        d.memory.clear()  # as a new process would: through the disk
        d.page_tokens(0)  # page 0 stays in use
    files = list(d.cache.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= bound
    assert d.cache / "0.safetensors" in files and d.cache / "59.safetensors" in files
    assert not (d.cache / "1.safetensors").exists()
    assert len(files) < 59, (one, len(files))
