"""Copiers below both copy screens: a copy plus noise shaped like the delta (the `shaped_copier`
personas), and what keeps them unpaid (docs/mechanism.md "Shaped copies")."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from bistro.config import build_settings
from bistro.delta import low_rank_similarity, similarity
from bistro.delta.codec import CODECS, Mixed, codec_context, compress

SHAPES = {"attn": (96, 256), "mlp": (256, 96), "norm": (256,)}


def _source(codec_name: str, seed: int = 0):
    """A decoded delta shaped like a trained one: each matrix mostly rank 1 (Adam's few steps: the
    best rank-1 approximation holds most of the energy) plus a spread of smaller values."""
    s = build_settings("tiny", overrides={"mechanism.codec": codec_name})
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            a, b = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
            delta[name] = torch.outer(a, b) / 10 + 0.05 * torch.randn(shape, generator=g)
        else:
            delta[name] = 0.01 * torch.randn(shape, generator=g)
    codec, ctx = CODECS[codec_name], codec_context(s, 3)
    wire = compress(delta, codec, ctx, None)
    return s, codec, ctx, wire, codec.decode(wire, ctx, SHAPES)


def _miner(codec, ctx, uid: int = 7) -> SimpleNamespace:
    miner = SimpleNamespace(uid=uid, codec=codec, shapes=SHAPES, ctx=lambda window: ctx)
    miner.encode = lambda window, tensors: tensors  # the forged wire tensors, unsigned
    return miner


@pytest.mark.parametrize("persona", ["shaped_copier", "shaped_copier_05", "rotating_copier"])
def test_a_shaped_copy_sits_at_its_cosine_as_a_whole_and_in_the_low_rank_factors(persona: str) -> None:
    """The defining property: decoded with the network's codec (lowrank), the copy's cosine to its
    source is about the persona's (0.7 or 0.5) both as whole vectors (what `copy_threshold`
    compares) and in the low-rank parts (`low_rank_copy_threshold`): under both screens. Its
    low-rank part stays rank 1 (a rotation of the source's factors, not a second direction)."""
    from bistro.localnet.personas import PERSONAS

    s, codec, ctx, wire, original = _source("lowrank")
    cls = PERSONAS[persona]
    started = time.perf_counter()
    forged = codec.decode(cls(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES)
    seconds = time.perf_counter() - started
    whole, low = similarity(original, forged), low_rank_similarity(original, forged)
    assert abs(whole - cls.cosine) < 0.06, whole
    assert abs(low - cls.cosine) < 0.06, low
    assert whole < s.mechanism.copy_threshold and low < s.mechanism.low_rank_copy_threshold
    for name in ("attn", "mlp"):
        assert isinstance(forged[name], Mixed)
        assert torch.linalg.matrix_rank(forged[name].dense).item() == 1, name
    assert seconds < 10, seconds  # the copier must forge it before the upload deadline


def test_a_shaped_copy_with_another_codec_sits_at_its_cosine() -> None:
    """With a codec without low-rank parts (topk2) the noise goes on the sent values alone."""
    from bistro.localnet.personas import ShapedCopier

    _, codec, ctx, wire, original = _source("topk2")
    forged = codec.decode(ShapedCopier(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES)
    assert abs(similarity(original, forged) - 0.7) < 0.06


def test_two_windows_two_copiers_draw_different_noise() -> None:
    """The noise is seeded by the uid and the window (protocol.seed): two copiers of one source,
    or one copier in two windows, are not copies of each other."""
    from bistro.localnet.personas import ShapedCopier

    _, codec, ctx, wire, original = _source("lowrank")
    a = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(3, [(wire, original)]), ctx, SHAPES)
    b = codec.decode(ShapedCopier(_miner(codec, ctx, 8)).forge(3, [(wire, original)]), ctx, SHAPES)
    c = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(4, [(wire, original)]), ctx, SHAPES)
    again = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(3, [(wire, original)]), ctx, SHAPES)
    assert similarity(a, again) == pytest.approx(1.0)
    for other in (b, c):  # both hold the source (cosine 0.7 each): 0.5 between them, not a copy
        assert similarity(a, other) < 0.7 and low_rank_similarity(a, other) < 0.7


def test_the_rotating_copier_takes_a_different_paid_source_each_window() -> None:
    from bistro.localnet.personas import RotatingCopier

    copier = RotatingCopier(SimpleNamespace(uid=9))
    commitments = {1: "a", 2: "b", 3: "c", 4: "d", 9: "own", 5: "unpaid"}
    paid = {1: 0.3, 2: 0.3, 3: 0.2, 4: 0.2}
    firsts = [copier.ranked(w, commitments.items(), lambda u: paid.get(u, 0.0))[0][0] for w in range(8)]
    assert firsts == [1, 2, 3, 4, 1, 2, 3, 4]
    order = [uid for uid, _ in copier.ranked(1, commitments.items(), lambda u: paid.get(u, 0.0))]
    assert order[:4] == [2, 3, 4, 1] and set(order[4:]) == {5, 9}  # the paid first: _steal stops at unpaid


def test_the_shaped_finetune_starts_from_a_shaped_copy_and_trains_a_fifth_of_a_window() -> None:
    """Its copied part is the shaped copier's (cosine 0.7 to the source, decoded), then it trains a
    fifth of a window's steps on its own pages (`CopyFinetune.forge`)."""
    from bistro.delta.codec import densify
    from bistro.localnet.personas import ShapedCopier, ShapedFinetune

    _, codec, ctx, wire, original = _source("lowrank")
    finetune = ShapedFinetune(_miner(codec, ctx))
    copied = finetune.copied(3, [(wire, original)])
    shaped = densify(
        codec.decode(ShapedCopier(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES), SHAPES
    )
    assert all(torch.equal(copied[n], shaped[n]) for n in SHAPES)
    source = densify(original, SHAPES)
    flat = (
        torch.cat([copied[n].reshape(-1) for n in SHAPES]),
        torch.cat([source[n].reshape(-1) for n in SHAPES]),
    )
    assert 0.5 < float(torch.nn.functional.cosine_similarity(*flat, dim=0)) < 0.85
    assert finetune.fraction == 0.2
