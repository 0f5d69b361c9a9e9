"""`mechanism.master_codec same`: the publisher re-compresses the merged update with the miners' codec
and an error-feedback residual of its own, so a follower downloads one delta-sized object a window
however many uids were merged, applies exactly what the publisher applied, and nothing merged is lost
(it is in the residual until sent); the residual survives a restart and is dropped on a handover."""

from __future__ import annotations

from pathlib import Path

import bittensor_core
import pytest
import torch

from bistro import protocol
from bistro.config import build_settings, protocol_settings, replace
from bistro.delta import merge_mean
from bistro.delta.codec import Sparse
from bistro.master import (
    HEADER_SLACK,
    Follower,
    MasterCodec,
    MasterError,
    Position,
    Publisher,
    apply_update,
    master_format,
)
from bistro.model import build_model, model_hash, state_tensors
from bistro.storage.local import LocalStore

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")


def _settings(master_codec: str = "same"):
    return replace(build_settings("tiny"), **{"mechanism.master_codec": master_codec})


def _merged(settings, shapes, window: int, uids: int, seed: int):
    """The mean merge of `uids` synthetic sparse miner deltas (1 of 64 positions each, random)."""
    g = torch.Generator().manual_seed(seed * 1000 + uids)
    deltas = []
    for _ in range(uids):
        delta = {}
        for k, s in shapes.items():
            n = int(torch.Size(s).numel())
            idx = torch.randperm(n, generator=g)[: max(1, n // 64)].sort().values
            delta[k] = Sparse(idx, torch.randn(len(idx), generator=g) * 1e-3)
        deltas.append(delta)
    return merge_mean(deltas, [1.0 / uids] * uids, shapes)


def _publish(root: Path, settings, windows: int, uids: int, codec: MasterCodec | None = None):
    """A publisher's run: θ_{w+1} = θ_w + decode(encode(U_w + e)), each update signed and stored."""
    params = state_tensors(build_model(settings.model))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    netuid = settings.chain.netuid
    store = LocalStore(root, "publisher")
    pub = Publisher(store, ALICE, netuid, protocol_settings(settings))
    codec = codec or MasterCodec.for_settings(settings, shapes)
    digest = model_hash(params)
    pub.checkpoint(0, params, digest)
    merged, sent = [], []
    for w in range(windows):
        update = _merged(settings, shapes, w, uids, seed=w)
        merged.append(update)
        codec.start(digest)
        applied = codec.encode(update, w)
        apply_update(params, applied)
        new = model_hash(params)
        wire = codec.commit(applied, new)
        sent.append(applied)
        pub.update(w, applied, digest, new, wire, codec.fmt, uids=list(range(uids)))
        digest = new
    pub.latest(windows, digest, [0])
    return store, params, shapes, codec, merged, sent


def _follower(settings, shapes) -> tuple[Follower, dict[str, torch.Tensor]]:
    params = state_tensors(build_model(settings.model, seed=99))  # other weights: a checkpoint first
    n = sum(4 * p.numel() for p in params.values())
    return Follower(settings.chain.netuid, shapes, n, protocol_settings(settings)), params


def test_the_update_is_one_codec_wire_whatever_the_number_of_merged_uids(tmp_path: Path) -> None:
    settings = _settings()
    sizes = {}
    for uids in (2, 12):
        store, _, shapes, codec, _, _ = _publish(tmp_path / str(uids), settings, 2, uids)
        key = protocol.update_key(settings.chain.netuid, 1)
        sizes[uids] = len(store.get(key, max_bytes=1 << 30))
    wire = master_format(settings).wire_bytes(shapes)
    assert all(wire < size <= wire + HEADER_SLACK for size in sizes.values()), (sizes, wire)
    assert abs(sizes[12] - sizes[2]) < 256  # only the list of merged uids in the document differs
    follower, _ = _follower(settings, shapes)
    assert follower.max_update == wire + HEADER_SLACK


def test_publisher_and_follower_reach_the_same_master(tmp_path: Path) -> None:
    settings = _settings()
    store, theirs, shapes, _, _, _ = _publish(tmp_path, settings, 3, uids=5)
    follower, params = _follower(settings, shapes)
    pos = follower.sync(store, ALICE.ss58_address, params, None)
    assert pos == Position(3, model_hash(theirs)) and model_hash(params) == model_hash(theirs)
    assert all(torch.equal(params[k], theirs[k]) for k in params)


def test_a_follower_refuses_a_raw_union_or_other_codec_parameters(tmp_path: Path) -> None:
    settings = _settings()
    store, _, shapes, _, _, _ = _publish(tmp_path, settings, 2, uids=3)
    other = replace(settings, **{"mechanism.master_rank": 4})
    follower, params = _follower(other, shapes)
    follower.settings = None  # only the update format differs here, not the protocol check
    with pytest.raises(MasterError, match="not the protocol's"):
        follower.sync(store, ALICE.ss58_address, params, None)
    raw = _settings("sparse")
    params0 = state_tensors(build_model(raw.model))
    store2 = LocalStore(tmp_path / "raw", "publisher")
    pub = Publisher(store2, ALICE, raw.chain.netuid)
    digest = model_hash(params0)
    pub.checkpoint(0, params0, digest)
    update = {k: Sparse(torch.tensor([0]), torch.tensor([1e-3])) for k in shapes}
    apply_update(params0, update)
    pub.update(0, update, digest, model_hash(params0))
    pub.latest(1, model_hash(params0), [0])
    follower, params = _follower(settings, shapes)
    follower.settings = None
    with pytest.raises(MasterError, match="raw union"):
        follower.sync(store2, ALICE.ss58_address, params, None)


def test_the_residual_carries_what_was_not_sent(tmp_path: Path) -> None:
    settings = _settings()  # master_ef_decay 1: sum of sent + residual = sum of merged
    _, _, shapes, codec, merged, sent = _publish(tmp_path, settings, 3, uids=4)
    for name, shape in shapes.items():
        total_merged = sum(_dense_of(u, name, shape) for u in merged)
        total_sent = sum(_dense_of(u, name, shape) for u in sent)
        gap = total_merged - total_sent - codec.residual[name]
        scale = total_merged.abs().max().item()
        assert gap.abs().max().item() <= 1e-5 * max(scale, 1e-12), name
        # and the wire did not carry everything: the residual is not zero
    assert any(codec.residual[n].abs().max() > 0 for n in shapes)


def _dense_of(update, name, shape) -> torch.Tensor:
    from bistro.master import _dense

    return _dense({name: update[name]} if name in update else {}, {name: shape})[name]


def test_a_restarted_publisher_keeps_its_residual_and_a_new_one_starts_empty(tmp_path: Path) -> None:
    settings = _settings()
    _, params, shapes, codec, _, _ = _publish(tmp_path, settings, 2, uids=3)
    path = tmp_path / "state" / "master_residual.safetensors"
    codec.save(path)
    again = MasterCodec.for_settings(settings, shapes)
    assert again.load(path) and again.base == codec.base == model_hash(params)
    again.start(model_hash(params))  # the restarted publisher steps from the master it left
    assert all(torch.equal(again.residual[n], codec.residual[n]) for n in shapes)
    # both compute the same next wire: deterministic from (master, merged update, residual)
    update = _merged(settings, shapes, 2, 3, seed=7)
    codec.start(model_hash(params))
    a, b = codec.encode(update, 2), again.encode(update, 2)
    wa, wb = codec.commit(a, "x"), again.commit(b, "x")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a validator that takes over from another master starts with an empty residual
    other = MasterCodec.for_settings(settings, shapes)
    assert other.load(path)
    other.start("another-master-hash")
    assert other.residual == {}


def test_the_plan_downloads_one_codec_wire_a_window_at_7b() -> None:
    from bistro.plan import make_plan, wire_bytes

    settings = replace(build_settings("7B"), **{"mechanism.master_codec": "same"})
    plan = make_plan(settings, uids=256, hardware="8xH100")
    wire = master_format(settings).wire_bytes(_shapes_7b(settings))
    assert plan["miner"]["download_per_window_bytes"] == wire <= 5 * 2**30
    # the update's own rank and compression (`mechanism.master_rank`, `master_compression`) add
    # factors and sparse values to a miner's wire; at the miners' own it is a miner's wire
    miners = wire_bytes(settings, {k: tuple(v) for k, v in _shapes_7b(settings).items()})
    assert miners < wire < 4 * miners
    same = replace(settings, **{"mechanism.master_rank": 0, "mechanism.master_compression": 0})
    assert make_plan(same, uids=256, hardware="8xH100")["miner"]["download_per_window_bytes"] == miners
    union = make_plan(replace(settings, **{"mechanism.master_codec": "sparse"}), uids=256, hardware="8xH100")
    assert union["miner"]["download_per_window_bytes"] > 50 * wire


def _shapes_7b(settings):
    from bistro.plan import model_shapes

    return model_shapes(settings.model)
