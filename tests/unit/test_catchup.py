"""A late joiner catches up from the publisher's bucket (newest checkpoint, then every update after
it), reading each object's tensors as views of its bytes: no second full copy of the model."""

from __future__ import annotations

from pathlib import Path

import bittensor_core
import pytest
import torch

from bistro import protocol
from bistro.config import build_settings
from bistro.delta import CODECS, merge
from bistro.delta.codec import codec_context
from bistro.delta.signed import check_signed, pack_signed, tensor_views
from bistro.master import Follower, MasterError, Position, Publisher, apply_update, update_to_tensors
from bistro.model import build_model, model_hash, state_tensors
from bistro.plan import measure_peak
from bistro.storage.local import LocalStore

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")
NETUID = 212


def _publish(root: Path, windows: int, checkpoint_at: tuple[int, ...] = (0,)):
    settings = build_settings("tiny")
    params = state_tensors(build_model(settings.model))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    store = LocalStore(root, "publisher")
    pub = Publisher(store, ALICE, NETUID)
    digest = model_hash(params)
    pub.checkpoint(0, params, digest)
    codec, g = CODECS["topk"], torch.Generator().manual_seed(0)
    hashes = {0: digest}
    for w in range(windows):
        ctx = codec_context(settings, w)
        deltas = [codec.decode(codec.encode({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}, ctx), ctx, shapes)
                  for _ in range(3)]  # fmt: skip
        update = merge(deltas, [1 / 3] * 3, shapes)
        apply_update(params, update)
        new = model_hash(params)
        pub.update(w, update, digest, new, uids=[1, 2, 3])
        digest = hashes[w + 1] = new
        if w + 1 in checkpoint_at:
            pub.checkpoint(w + 1, params, new)
    pub.latest(windows, digest, sorted({0, *checkpoint_at}))
    return store, params, hashes, shapes


def _follower(shapes) -> tuple[Follower, dict[str, torch.Tensor]]:
    params = state_tensors(build_model(build_settings("tiny").model, seed=99))  # other weights
    return Follower(NETUID, shapes, sum(4 * p.numel() for p in params.values())), params


def test_late_joiner_reaches_the_publishers_master(tmp_path: Path) -> None:
    store, theirs, hashes, shapes = _publish(tmp_path, 8, checkpoint_at=(5,))
    follower, params = _follower(shapes)
    pos = follower.sync(store, ALICE.ss58_address, params, None)
    assert pos == Position(8, hashes[8]) and model_hash(params) == model_hash(theirs)
    for name, p in params.items():  # the model holds its own bits, not views of a blob
        assert (
            torch.equal(p, theirs[name])
            and p.untyped_storage().data_ptr() != theirs[name].untyped_storage().data_ptr()
        )
    follower, params = _follower(shapes)
    assert follower.sync(store, ALICE.ss58_address, params, None, target=3) == Position(3, hashes[3])
    assert follower.sync(store, ALICE.ss58_address, params, Position(3, hashes[3])) == Position(8, hashes[8])


def test_catch_up_allocates_no_second_model(tmp_path: Path) -> None:
    store, _, hashes, shapes = _publish(tmp_path, 6)
    follower, params = _follower(shapes)
    model_bytes = sum(4 * p.numel() for p in params.values())
    peak, pos = measure_peak(lambda: follower.sync(store, ALICE.ss58_address, params, None))
    assert pos.hash == hashes[6]
    # Loading the whole checkpoint as tensors would allocate model_bytes; views of the blob allocate
    # only the small masks of the finiteness checks.
    assert peak < 0.2 * model_bytes, (peak, model_bytes)
    # safetensors' own loader allocates outside torch's count: check directly that the tensors the
    # follower reads are views into the downloaded blob, not copies of it.
    key = protocol.checkpoint_key(NETUID, 0)
    blob = store.get(key)
    header, entries = check_signed(
        blob, signer=ALICE.ss58_address, max_bytes=2 * model_bytes, expect={"window": 0}
    )
    base = _frombuffer(blob).data_ptr()
    for t in tensor_views(blob, header, entries).values():
        assert base <= t.data_ptr() < base + len(blob)


def test_bad_update_is_refused_by_the_streaming_reader(tmp_path: Path) -> None:
    store, _, hashes, shapes = _publish(tmp_path, 3)
    update = {"model.norm.weight": torch.full(shapes["model.norm.weight"], float("nan"))}
    doc = {"kind": "update", "netuid": NETUID, "window": 1, "base_hash": hashes[1], "result_hash": hashes[2],
           "accepted": True, "uids": [1]}  # fmt: skip
    store.put(protocol.update_key(NETUID, 1), pack_signed(update_to_tensors(update), doc, ALICE))
    follower, params = _follower(shapes)
    with pytest.raises(MasterError, match="non_finite"):
        follower.sync(store, ALICE.ss58_address, params, None)
    store.put(protocol.update_key(NETUID, 1), b"\x08" + b"\x00" * 7 + b"{}garbage")
    with pytest.raises(MasterError, match="update-1"):
        follower.sync(store, ALICE.ss58_address, params, None)


def _frombuffer(blob: bytes) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(blob, dtype=torch.uint8)
