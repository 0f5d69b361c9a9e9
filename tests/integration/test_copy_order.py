"""The backdating copier: a copier re-signs an honest miner's wire tensors as its own and dates its
object an hour earlier (on a local bucket the file's time is its Last-Modified; on S3 its own
server says whatever it likes). The copy order reads no time: the author's own pages decide, so the
copier is `copy` and the author is paid."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from ..support.reliability_kit import FIRST, make_miner, make_world


@pytest.mark.parametrize("stream", [False, True], ids=["held", "streamed"])
def test_a_backdated_copy_is_the_copy_and_its_author_is_paid(
    tmp_path: Path, honest_blobs, stream: bool
) -> None:
    """Also with `mechanism.stream_deltas`: the real Validator's fetch keeps the blobs."""
    from bistro.validator import Validator

    # consistent_windows 1: the author is paid from this one window (its second would do otherwise)
    world = make_world(
        tmp_path, ["a", "b", "c"], **{"mechanism.stream_deltas": stream, "mechanism.consistent_windows": 1}
    )
    blob = honest_blobs.get(world, "a", FIRST)
    world.put("a", FIRST, blob)
    world.put("c", FIRST, honest_blobs.get(world, "c", FIRST))  # a second author: the test's ratios apply
    copier = make_miner(world, "b")
    assert copier.sync(FIRST)
    world.put("b", FIRST, copier.encode(FIRST, dict(load_safetensors(blob))))  # the same tensors, b's name
    earlier = time.time() - 3600
    os.utime(world.path("b", FIRST), (earlier, earlier))
    assert world.path("b", FIRST).stat().st_mtime < world.path("a", FIRST).stat().st_mtime

    validator = Validator(world.members["val"].settings)
    validator.evaluate(FIRST)
    home = Path(world.members["val"].settings.dir)
    record = json.loads((home / "validator" / "windows.jsonl").read_text().splitlines()[-1])
    a, b = (str(world.members[n].uid) for n in "ab")
    assert record["uids"][b]["verdict"] == "copy" and record["uids"][b]["copy_of"] == int(a)
    assert record["uids"][a]["verdict"] == "ok" and record["uids"][a]["score"] > 0
    assert record["uids"][a]["weight"] > 0.0 and record["uids"][b]["weight"] == 0.0
