"""The publisher's due checkpoint is written in the background (`CheckpointUpload`): the window does
not wait for it, LATEST.json lists it (and the oldest checkpoint is pruned) only once it is in the
bucket, a failed upload is never listed, and followers reach every master meanwhile from the older
checkpoint plus the updates."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from bistro import protocol
from bistro.master import Follower, Position
from bistro.model import model_hash
from bistro.storage.base import StorageError, Store

from ..support.reliability_kit import FIRST, World, initial_params, make_world

WAIT = 5.0
"""Seconds a test waits for something that takes milliseconds (a failure, not a slow box)."""


class GatedStore(Store):
    """The publisher's bucket, whose checkpoint puts wait for `gate` (or raise, when `fail`)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.bucket = inner, inner.bucket
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        """Set while a checkpoint put waits at the gate."""
        self.fail = False
        self.checkpoints: list[str] = []
        """Checkpoint keys whose put was attempted, in order."""

    def put(self, key: str, data: bytes) -> None:
        if "/checkpoint-" in key:
            self.checkpoints.append(key)
            if self.fail:
                raise StorageError(f"put {key}: bucket unreachable")
            self.waiting.set()
            try:
                if not self.gate.wait(30):
                    raise StorageError(f"put {key}: gate never opened")
            finally:
                self.waiting.clear()
        self.inner.put(key, data)

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        return self.inner.get(key, max_bytes=max_bytes, deadline=deadline)

    def head(self, key: str):
        return self.inner.head(key)

    def list(self, prefix: str = ""):
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _propose(window_seed: list[int]):
    """`Evaluator.propose_update` for tests: a small random step every window, always accepted."""

    def propose(master, verdicts, base_global, global_seqs, paid, recompress):  # noqa: ARG001
        g = torch.Generator().manual_seed(window_seed[0])
        window_seed[0] += 1
        u = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in master.items()}
        sent = recompress(u) if recompress is not None else u
        info = {
            "accepted": True, "step": 1.0, "merged_uids": [1], "merged_weights": [1.0],
            "merged_norms": [1.0], "valid_uids": [1], "global_loss_before": 1.0, "global_loss_after": 0.9,
        }  # fmt: skip
        return sent, info

    return propose


@pytest.fixture
def publisher(tmp_path: Path):
    """The top validator publishing θ_FIRST (checkpoint FIRST), checkpoints every 2 windows, its
    bucket behind a GatedStore; master_step takes a random accepted step each window."""
    from bistro.validator import Validator

    world = make_world(tmp_path, [], **{"mechanism.checkpoint_every": 2})
    v = Validator(world.members["top"].settings)
    assert v.ensure_master(FIRST, v.chain.metagraph())
    assert v.state.checkpoints == [FIRST]
    store = GatedStore(v.store)
    v.publisher.store = store
    v.evaluator.propose_update = _propose([0])
    yield world, v, store
    store.gate.set()
    if getattr(v, "_upload", None) is not None:
        v._upload.join(WAIT)


def step(v, window: int) -> None:
    """master_step of `window` in a thread: it must return within WAIT seconds."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            v.master_step(window, {}, 1.0, [], None)
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WAIT)
    if t.is_alive():
        v.publisher.store.gate.set()  # let it end
        t.join(WAIT)
        pytest.fail(f"master_step({window}) waited for the checkpoint upload")
    if errors:
        raise errors[0]


def latest(world: World, v) -> dict:
    f = Follower(v.netuid, v.shapes, 1 << 30, v.protocol)
    doc = f.latest(world.store("top"), v.hotkey)
    assert doc is not None
    return doc


def keys(world: World, v) -> set[str]:
    return {info.key.rsplit("/", 1)[-1] for info in world.store("top").list(protocol.master_prefix(v.netuid))}


def follow(world: World, v, target: int | None = None) -> Position:
    """A fresh follower catches up from the bucket (no master held)."""
    params = initial_params(world.settings)
    f = Follower(v.netuid, v.shapes, sum(4 * p.numel() for p in params.values()), v.protocol)
    pos = f.sync(world.store("top"), v.hotkey, params, None, target)
    assert model_hash(params) == pos.hash
    return pos


def wait_upload(v) -> None:
    upload = getattr(v, "_upload", None)
    assert upload is not None and upload.join(WAIT)


def test_the_window_does_not_wait_for_the_checkpoint_and_lists_it_once_written(publisher) -> None:
    world, v, store = publisher
    step(v, FIRST)  # θ_2: checkpoint-2 due, written at once here (the gate is open)
    wait_upload(v)
    step(v, FIRST + 1)  # θ_3: the first LATEST after the upload lists it
    assert latest(world, v)["checkpoints"] == [FIRST, 2]
    assert v.state.checkpoints == [FIRST, 2]

    store.gate.clear()
    step(v, 3)  # (a) θ_4: checkpoint-4 due; its put blocks, the window returns
    assert store.waiting.wait(WAIT) and v._upload is not None and not v._upload.done
    theta4 = v.state.position
    assert theta4.window == 4
    # (b) while it uploads: LATEST names θ_4 but lists only the checkpoints in the bucket
    doc = latest(world, v)
    assert doc["window"] == 4 and doc["hash"] == theta4.hash and doc["checkpoints"] == [FIRST, 2]
    assert v.state.checkpoints == [FIRST, 2]
    assert "checkpoint-4.safetensors" not in keys(world, v)
    assert follow(world, v) == theta4  # from checkpoint-2 plus update-2 and update-3
    step(v, 4)  # θ_5 while checkpoint-4 still uploads: nothing listed, nothing pruned
    assert latest(world, v)["checkpoints"] == [FIRST, 2]
    assert {f"checkpoint-{FIRST}.safetensors", f"update-{FIRST}.safetensors"} <= keys(world, v)
    theta5 = v.state.position

    store.gate.set()  # (c) the upload ends: the next window lists it and prunes checkpoint-1
    wait_upload(v)
    assert v.state.checkpoints == [FIRST, 2]  # listed at the next LATEST, not before
    step(v, 5)
    doc = latest(world, v)
    assert doc["window"] == 6 and doc["checkpoints"] == [2, 4] and v.state.checkpoints == [2, 4]
    names = keys(world, v)
    assert f"checkpoint-{FIRST}.safetensors" not in names and f"update-{FIRST}.safetensors" not in names
    assert {"checkpoint-2.safetensors", "checkpoint-4.safetensors", "update-2.safetensors"} <= names
    # the checkpoint holds θ_4 (the snapshot), not the master of when its put ran
    assert follow(world, v, target=4) == theta4 and follow(world, v, target=5) == theta5
    assert follow(world, v) == v.state.position


def test_a_failed_upload_is_never_listed_and_the_next_one_is_written(
    publisher, caplog: pytest.LogCaptureFixture
) -> None:
    world, v, store = publisher
    caplog.set_level(logging.ERROR, logger="bistro.master")
    store.fail = True
    step(v, FIRST)  # (d) checkpoint-2 due; its put raises in the background
    wait_upload(v)
    assert any(
        "checkpoint-2" in r.getMessage() and "bucket unreachable" in r.getMessage() for r in caplog.records
    )
    step(v, FIRST + 1)  # the window goes on; LATEST lists only the old checkpoint
    doc = latest(world, v)
    assert doc["window"] == 3 and doc["checkpoints"] == [FIRST] and v.state.checkpoints == [FIRST]
    assert f"update-{FIRST}.safetensors" in keys(world, v)
    assert follow(world, v) == v.state.position  # from checkpoint-1 and every update after it

    store.fail = False
    step(v, 3)  # the next due checkpoint (θ_4) is written
    wait_upload(v)
    step(v, 4)
    assert latest(world, v)["checkpoints"] == [FIRST, 4] and v.state.checkpoints == [FIRST, 4]
    assert store.checkpoints[-2:] == [protocol.checkpoint_key(v.netuid, w) for w in (2, 4)]
    assert follow(world, v, target=4).window == 4


def test_a_due_checkpoint_waits_for_the_one_still_uploading(publisher, caplog) -> None:
    world, v, store = publisher
    caplog.set_level(logging.WARNING, logger="bistro.validator")
    store.gate.clear()
    step(v, FIRST)  # checkpoint-2 blocks
    assert store.waiting.wait(WAIT)
    step(v, FIRST + 1)
    done = threading.Event()
    t = threading.Thread(target=lambda: (v.master_step(3, {}, 1.0, [], None), done.set()), daemon=True)
    t.start()  # checkpoint-4 is due: at most one upload, so this window waits for checkpoint-2
    assert not done.wait(0.5)
    store.gate.set()
    t.join(WAIT)
    assert done.is_set()
    assert any("slower than checkpoint_every" in r.getMessage() for r in caplog.records)
    assert latest(world, v)["checkpoints"] == [FIRST, 2]  # listed by the LATEST of that window
    wait_upload(v)
    step(v, 4)
    assert latest(world, v)["checkpoints"] == [2, 4]


def test_a_stopping_validator_lists_the_checkpoint_once_written(publisher, caplog) -> None:
    from bistro.statefile import read_json

    world, v, store = publisher
    caplog.set_level(logging.WARNING, logger="bistro.validator")
    store.gate.clear()
    step(v, FIRST)
    assert store.waiting.wait(WAIT)
    v.finish_checkpoint(timeout=0.2)  # still uploading: stops without it
    assert any("still uploading" in r.getMessage() for r in caplog.records)
    assert latest(world, v)["checkpoints"] == [FIRST]
    store.gate.set()
    v.finish_checkpoint()
    doc = latest(world, v)
    assert doc["window"] == 2 and doc["checkpoints"] == [FIRST, 2]
    assert read_json(v.state_dir / "state.json")["checkpoints"] == [FIRST, 2]
    assert follow(world, v, target=2) == v.state.position
