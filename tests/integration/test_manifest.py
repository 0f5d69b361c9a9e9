"""A master anyone can verify (docs/mechanism.md): the publisher signs a manifest of what it merged
into update-{w}; a validator that scored the window recomputes U, the step decision and the wire and
says ok / unverifiable / tampered; a follower runs the cheap check, and with verification on
recomputes from the miners' deltas. A publisher that signs a tampered update (its own key, so the
signature is valid) is caught by both."""

from __future__ import annotations

import json

import pytest
import torch

from bistro import manifest, protocol
from bistro.delta.signed import RESERVED, pack_signed, unpack_signed

from ..support.reliability_kit import FIRST, World, make_world

MINERS = ["m0", "m1", "m2"]
_TOP: list[str] = []
"""The publisher's hotkey (set by the fixture)."""


def _validator(world: World, name: str):
    from bistro.validator import Validator

    v = Validator(world.members[name].settings)
    v.fetch_budget = lambda: 5.0
    return v


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, honest_blobs):
    world = make_world(tmp_path_factory.mktemp("manifest"), MINERS)
    for name in MINERS:
        world.put(name, FIRST, honest_blobs.get(world, name, FIRST))
    top = _validator(world, "top")
    _TOP[:] = [top.hotkey]
    top.evaluate(FIRST)  # the publisher: update-FIRST with its manifest
    key = protocol.update_key(world.settings.chain.netuid, FIRST)
    honest = world.store("top").get(key, max_bytes=1 << 30)
    val = _validator(world, "val")
    ctx_holder = {}
    original = val._check_pending

    def keep(mg):  # the context the check ran with, for the tolerance test
        if val._pending_check is not None:
            ctx_holder.update(val._pending_check)
        return original(mg)

    val._check_pending = keep
    val.evaluate(FIRST)
    return world, top, val, honest, key, ctx_holder


def _record(validator) -> dict:
    return json.loads((validator.state_dir / "windows.jsonl").read_text().splitlines()[-1])


def _tampered(world: World, honest: bytes) -> bytes:
    """update-FIRST with the wire of another update (−3 × the honest one) and a step taken, re-signed with the
    publisher's own key: the signature is valid, the manifest untouched."""
    doc, tensors = unpack_signed(honest, signer=_TOP[0], max_bytes=1 << 30)
    from bistro.delta import scaled
    from bistro.master import master_format
    from bistro.model import build_model, state_tensors

    s = world.settings
    shapes = {k: tuple(v.shape) for k, v in state_tensors(build_model(s.model)).items()}
    fmt = master_format(s)
    ctx = fmt.context(s.chain.netuid, FIRST)
    sent = fmt.impl.decode(dict(tensors), ctx, shapes)
    from bistro.master import _dense

    forged = fmt.impl.encode(_dense(scaled(sent, -3.0), shapes), ctx)  # a valid wire of another update
    assert any(not torch.equal(forged[k], tensors[k]) for k in tensors)
    doc = dict(doc)
    man = dict(doc["manifest"])
    if not doc.get("accepted"):
        man["step"] = 1.0
        doc["accepted"] = True
    doc["manifest"] = man
    for k in RESERVED:
        doc.pop(k, None)
    return pack_signed(forged, doc, world.members["top"].keypair)


def test_the_manifest_lists_what_was_merged(scored) -> None:
    world, top, _, honest, _, _ = scored
    doc, _ = unpack_signed(honest, signer=_TOP[0], max_bytes=1 << 30)
    man = doc["manifest"]
    record = _record(top)
    assert man["uids"] == record["merged_uids"] and man["merge"] == "mean"
    assert len(man["blobs"]) == len(man["uids"]) and all(len(h) == 64 for h in man["blobs"])
    for uid, sha in zip(man["uids"], man["blobs"], strict=True):
        name = next(n for n, m in world.members.items() if m.uid == uid)
        assert sha == manifest.blob_sha256(world.path(name, FIRST).read_bytes())
    assert man["step"] in (0.0, 0.5, 1.0) and (man["step"] > 0) == doc["accepted"]
    assert man["residual_sha256"] == manifest.EMPTY  # a fresh publisher's residual
    assert set(man["uids"]) <= set(man["valid"])


def test_an_honest_update_verifies_ok(scored) -> None:
    _, _, val, _, _, _ = scored
    check = _record(val)["publisher_check"]
    assert check["status"] == "ok", check
    assert check["window"] == FIRST
    assert val.state.distrusted == {}


def test_losses_within_the_tolerance_do_not_flag_and_beyond_it_do(scored) -> None:
    world, top, val, honest, _, ctx = scored
    doc, tensors = unpack_signed(honest, signer=_TOP[0], max_bytes=1 << 30)
    if not doc["manifest"]["uids"]:
        pytest.skip("nothing merged in this window")
    for factor, expect in ((1 + 2e-4, "ok"), (1 + 1e-2, "tampered")):
        local = dict(ctx, base_global=ctx["base_global"] * factor)
        val.shadow = None  # the losses only (the wire was checked once already)
        check = val.check_update(local, top.hotkey, doc, dict(tensors))
        assert check.status == expect, (factor, str(check))


def test_a_merged_uid_that_hurt_only_against_a_slice_is_disputed_not_tampered(scored) -> None:
    """A merged uid that scores below the tolerance here is proof of tampering when its test used
    only what every validator of the window holds; when one of its close uids came from a slice (a
    uid outside the sample, whose slice the publisher may not have read), it is disputed."""
    import dataclasses

    _, top, val, honest, _, ctx = scored
    doc, tensors = unpack_signed(honest, signer=_TOP[0], max_bytes=1 << 30)
    if not doc["manifest"]["uids"]:
        pytest.skip("nothing merged in this window")
    merged = int(doc["manifest"]["uids"][0])
    outside = max(ctx["sample"]) + 1
    for close_to, expect in (([outside], "unverifiable"), ([], "tampered")):
        verdicts = dict(ctx["verdicts"])
        verdicts[merged] = dataclasses.replace(verdicts[merged], score=-1.0, close_to=close_to)
        val.shadow = None
        check = val.check_update(dict(ctx, verdicts=verdicts), top.hotkey, doc, dict(tensors))
        assert check.status == expect, (close_to, str(check))


def test_a_tampered_update_is_caught_by_a_validator_and_a_verifying_follower(scored, tmp_path) -> None:
    world, top, _, honest, key, _ = scored
    forged = _tampered(world, honest)
    world.store("top").put(key, forged)
    try:
        val = _validator(world, "val")  # a fresh one: scores FIRST again and checks the forged update
        val.state_dir = tmp_path / "val2"
        from bistro.windowlog import WindowLog

        val.log = WindowLog(val.state_dir, val.records_per_file, val.archives_kept)
        val.evaluate(FIRST)
        check = _record(val)["publisher_check"]
        assert check["status"] == "tampered", check
        assert val.state.distrusted == {top.hotkey: FIRST}  # never continues from its masters after θ_FIRST
        # a follower with verification on, replaying the forged update from θ_FIRST
        from bistro.delta.wire import decode_delta, expectation
        from bistro.master import Follower, MasterCodec
        from bistro.model import state_tensors

        s = world.settings
        params = {k: v.clone() for k, v in val.master.items()}
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        follower = Follower(s.chain.netuid, shapes, sum(4 * p.numel() for p in params.values()))
        follower.require_manifest = True

        def get_delta(window, uid, base):
            name = next(n for n, m in world.members.items() if m.uid == uid)
            blob = world.path(name, window).read_bytes()
            exp = expectation(s, window, world.members[name].hotkey, base, shapes)
            d = decode_delta(blob, exp)
            return d.delta, d.norm, manifest.blob_sha256(blob)

        follower.verify = manifest.follower_verifier(
            get_delta, shapes, manifest.Shadow(MasterCodec.for_settings(s, shapes))
        )
        fresh = state_tensors(__import__("bistro.model", fromlist=["build_model"]).build_model(s.model))
        with pytest.raises(manifest.PublisherTampered):
            follower.sync(world.store("top"), top.hotkey, fresh, None, FIRST + 1)
    finally:
        world.store("top").put(key, honest)


def test_the_cheap_check_catches_a_uid_outside_the_sample() -> None:
    good = {"uids": [3, 5], "blobs": ["a", "b"], "weights": [0.5, 0.5], "norms": [1.0, 1.0],
            "valid": [3, 5], "step": 1.0}  # fmt: skip
    doc = {"accepted": True, "manifest": good}
    manifest.cheap_check(doc, 7, "pub", {1, 3, 5}, None, 100.0, 12)
    outside = {"accepted": True, "manifest": dict(good, uids=[3, 9], valid=[3, 5, 9])}
    with pytest.raises(manifest.PublisherTampered, match="outside the window's drawn sample"):
        manifest.cheap_check(outside, 7, "pub", {1, 3, 5}, None, 100.0, 12)
    with pytest.raises(manifest.PublisherTampered, match="step"):
        manifest.cheap_check(
            {"accepted": True, "manifest": dict(good, step=0.3)}, 7, "pub", None, None, 100.0, 12
        )
    with pytest.raises(manifest.PublisherTampered, match="without a manifest"):
        manifest.cheap_check({"accepted": True}, 7, "pub", None, None, 100.0, 12)
    huge = {"w": torch.full((4,), 1e3)}
    with pytest.raises(manifest.PublisherTampered, match="norm"):
        manifest.cheap_check(doc, 7, "pub", None, huge, 100.0, 12)
