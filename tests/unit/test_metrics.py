"""Metrics: the Prometheus endpoint of a real validator process shows the window's verdict counts,
scores and weights; a W&B offline run holds the same windows, read back through wandb's own API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bistro.config import replace
from bistro.metrics import Metrics, flatten
from bistro.verdicts import V

from ..support.reliability_kit import FIRST, World, make_world

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

VALIDATOR = """
import sys, time
from pathlib import Path
from bistro.config import replace
from bistro.validator import Validator
from tests.support.reliability_kit import FIRST, base_settings
s = base_settings(Path(sys.argv[1]), **{"metrics.port": int(sys.argv[3])})
v = Validator(replace(s, **{"wallet.name": "val", "dir": sys.argv[2]}))
for w in (FIRST, FIRST + 1):
    v.evaluate(w)
print("done", flush=True)
time.sleep(120)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the endpoint's text exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, honest_blobs) -> World:
    """a: honest in both windows; b: bytes that are not a delta; c: uploads nothing."""
    world = make_world(tmp_path_factory.mktemp("metrics"), ["a", "b", "c"])
    for w in (FIRST, FIRST + 1):
        world.put("a", w, honest_blobs.get(world, "a", w))
        world.put("b", w, b"\x00" * 100)
    return world


@pytest.mark.slow
def test_a_running_validators_endpoint_shows_the_windows_verdicts(world: World) -> None:
    port, home = free_port(), world.dir / "val-process"
    proc = subprocess.Popen(
        [sys.executable, "-c", VALIDATOR, str(world.dir), str(home), str(port)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.time() + 240
        while time.time() < deadline and (not seen or seen[-1].strip() != "done"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
        assert seen and seen[-1].strip() == "done", "".join(seen[-30:])
        m = scrape(port)
    finally:
        proc.kill()
        proc.wait()
    uid = {name: world.members[name].uid for name in ("a", "b", "c", "top")}
    last = json.loads((home / "validator" / "windows.jsonl").read_text().splitlines()[-1])
    assert m[("bistro_window", (("role", "validator"),))] == FIRST + 1
    verdicts = {v.value: m[("bistro_window_verdicts", (("verdict", v.value),))] for v in V}
    # the top validator's uid uploads nothing either: two missing, one ok, one bad header
    assert verdicts == {**dict.fromkeys(verdicts, 0.0), "ok": 1.0, "bad_header": 1.0, "missing": 2.0}
    assert verdicts == {v: sum(r["verdict"] == v for r in last["uids"].values()) for v in verdicts}
    assert m[("bistro_verdicts_total", (("verdict", "ok"),))] == 2.0  # both windows
    assert m[("bistro_verdicts_total", (("verdict", "bad_header"),))] == 2.0
    a = str(uid["a"])
    assert m[("bistro_score", (("uid", a),))] == pytest.approx(last["uids"][a]["score"])
    assert m[("bistro_score", (("uid", a),))] != 0.0
    # the only ok uid takes the whole weight when its moving average is positive (4 steps on one
    # random eval page: its score can come out below zero, and then nobody is paid)
    paid = 1.0 if last["uids"][a]["moving_average"] > 0 else 0.0
    assert m[("bistro_weight", (("uid", a),))] == pytest.approx(last["uids"][a]["weight"]) == paid
    assert m[("bistro_weight", (("uid", str(uid["b"])),))] == 0.0
    for delta in ("with", "without"):
        key = ("bistro_eval_loss", (("delta", delta), ("pages", "local"), ("uid", a)))
        assert m[key] == pytest.approx(last["uids"][a][f"{delta}_local"])
    assert m[("bistro_bytes_total", (("direction", "in"),))] >= 2 * (
        len(world.path("a", FIRST).read_bytes()) + 100
    )
    assert m[("bistro_fetch_seconds", ())] > 0 and m[("bistro_scoring_seconds", ())] > 0
    assert m[("bistro_master_window", ())] == FIRST + 1
    assert m[("bistro_master_hash_age_seconds", ())] > 0


@pytest.mark.slow
def test_wandb_offline_run_holds_each_window(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    import wandb

    world = make_world(tmp_path, ["a"], publish=False)
    settings = replace(
        world.settings,
        **{"wandb.project": "bistro-test", "wandb.mode": "offline", "dir": str(tmp_path / "node")},
    )
    metrics = Metrics(settings, "validator", 1, world.members["val"].hotkey)
    records = [
        {"window": w, "seconds": 1.5, "fetch_seconds": 0.25, "master_window": w + 1, "master_hash": f"{w:064x}",
         "uids": {"2": {"verdict": "ok", "score": 0.1 * w, "weight": 1.0, "moving_average": 0.05 * w},
                  "3": {"verdict": "missing", "score": 0.0, "weight": 0.0, "moving_average": 0.0}}}
        for w in (3, 4, 5)
    ]  # fmt: skip
    for r in records:
        metrics.window(r)
    run_dir = Path(metrics.wandb.dir).parent
    metrics.close()
    files = list(run_dir.glob("*.wandb"))
    assert run_dir.name.startswith("offline-run-") and files
    # wandb's service process may still be writing its log when `finish` returns on a busy box
    # (an empty history was read once): give it a bounded while to land
    deadline = time.time() + 60
    while len(history := read_history(files[0])) < 3 and time.time() < deadline:
        time.sleep(0.5)
    assert [h["_step"] for h in history] == [3, 4, 5]
    assert [h["uids/2/score"] for h in history] == pytest.approx([0.3, 0.4, 0.5])
    assert all(h["verdicts/ok"] == 1 and h["verdicts/missing"] == 1 for h in history)
    assert flatten(records[0])["fetch_seconds"] == 0.25
    assert wandb.__version__


def read_history(path: Path) -> list[dict]:
    """The history rows of an offline run: wandb's own `Record` protobufs, read from its transaction
    log (a LevelDB-style log: a 7-byte file header, 32 KiB blocks of checksummed chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    rows, chunk = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_a_miners_window_on_its_endpoint(tmp_path: Path) -> None:
    """In-process: the miner's summary of a window, off the same endpoint code, and off when 0."""
    from bistro.config import build_settings

    settings = build_settings("tiny", None, {"dir": str(tmp_path), "metrics.port": free_port()})
    metrics = Metrics(settings, "miner", 5, "hotkey")
    try:
        for w, nbytes in ((7, 1000), (8, 1500)):
            metrics.window({"window": w, "loss": 4.5, "tokens_per_s": 900.0, "bytes_uploaded": nbytes,
                            "upload_seconds": 0.2, "incentive": 0.25, "master_window": w,
                            "master_hash": "ab" * 32})  # fmt: skip
        m = scrape(metrics.port)
    finally:
        metrics.close()
    assert m[("bistro_window", (("role", "miner"),))] == 8
    assert m[("bistro_train_loss", ())] == 4.5 and m[("bistro_incentive", ())] == 0.25
    assert m[("bistro_bytes_total", (("direction", "out"),))] == 2500
    assert m[("bistro_master_window", ())] == 8
    assert 0 <= m[("bistro_master_hash_age_seconds", ())] < 60  # the hash did not change at window 8
    assert all(m[("bistro_window_verdicts", (("verdict", v.value),))] == 0 for v in V)  # a miner scores none
    off = Metrics(build_settings("tiny", None, {"dir": str(tmp_path)}), "miner", 5, "hotkey")
    assert off.server is None and off.port is None and off.wandb is None
