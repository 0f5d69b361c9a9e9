"""topk2 (Elias–Fano indices, 2-bit values with a bin-mean table), error feedback as momentum, and
the per-index mean merge: round trips, exact sizes, refusals, and the arithmetic by hand."""

from __future__ import annotations

import pytest
import torch
import transformers

from bistro.config import build_settings
from bistro.delta import (
    CODECS,
    BadTensors,
    CodecContext,
    ErrorFeedback,
    MeanMerge,
    Sparse,
    add_,
    apply_,
    compress,
    merge_mean,
    restore_,
    scaled,
    to_dense,
)
from bistro.model import llama_config

CTX = CodecContext(netuid=212, window=7, compression=64.0)
SMALL = {"w": (300, 50), "b": (7,), "c": (3 * 4096 + 5,)}
TOPK2 = CODECS["topk2"]


def random_delta(shapes: dict, seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in shapes.items()}


def test_keeps_the_largest_per_chunk_and_the_bin_means() -> None:
    delta = random_delta(SMALL)
    wire = TOPK2.encode(delta, CTX)
    assert {n: (tuple(t.shape), t.dtype) for n, t in wire.items()} == TOPK2.wire_spec(SMALL, CTX)
    decoded = TOPK2.decode(wire, CTX, SMALL)
    for name, t in delta.items():
        part, flat = decoded[name], t.reshape(-1)
        assert isinstance(part, Sparse)
        for c in range(0, flat.numel(), 4096):
            x = flat[c : c + 4096]
            got = part.indices[(part.indices >= c) & (part.indices < c + 4096)] - c
            want = x.abs().topk(min(64, x.numel())).indices.sort().values
            assert torch.equal(got, want), name
        v, sent = flat[part.indices], part.values
        assert (torch.sign(v) == torch.sign(sent)).float().mean() > 0.9  # bins split at 0
        # each bin's value is the mean of what fell in it: the sum over a chunk is kept
        assert float(sent.sum()) == pytest.approx(float(v.sum()), rel=0.02, abs=1e-4)


def test_indices_cost_about_eight_bits_and_the_ratio_beats_146() -> None:
    lay = TOPK2.layout(CTX)
    assert (lay.k, lay.low, lay.highs) == (64, 6, 64)
    assert lay.record == (64 * 6 + 64 + 64 + 64 * 2) // 8 + 8  # 88 bytes a chunk
    shapes = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(
        llama_config(build_settings("tiny").model)).named_parameters()}  # fmt: skip
    assert TOPK2.ratio(shapes, CTX) > 160


def test_tiny_values_do_not_underflow() -> None:
    delta = random_delta(SMALL, scale=1e-30)
    decoded = TOPK2.decode(TOPK2.encode(delta, CTX), CTX, SMALL)
    assert all(float(p.values.abs().min()) > 0 for p in decoded.values())


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_other_value_widths_round_trip(bits: int) -> None:
    ctx = CodecContext(212, 7, 64.0, value_bits=bits)
    delta = random_delta(SMALL)
    decoded = TOPK2.decode(TOPK2.encode(delta, ctx), ctx, SMALL)
    err = sum(float((to_dense(decoded, SMALL)[n] - d).square().sum()) for n, d in delta.items())
    assert TOPK2.params(ctx)["value_bits"] == bits and err > 0


def test_decode_refuses_malformed_records() -> None:
    wire = TOPK2.encode(random_delta(SMALL), CTX)
    lay = TOPK2.layout(CTX)
    cases = {}
    bitmap = wire["b"].clone()
    bitmap[64 * 6 // 8] ^= 0x01  # one bitmap bit flipped: 63 or 65 ones
    cases["bitmap must hold"] = bitmap
    nan = wire["b"].clone()
    nan[lay.packed : lay.packed + 2] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8)  # bf16 NaN
    cases["finite"] = nan
    for why, bad in cases.items():
        with pytest.raises(BadTensors, match=why):
            TOPK2.decode({**wire, "b": bad}, CTX, SMALL)
    with pytest.raises(BadTensors):
        TOPK2.decode({**wire, "b": wire["b"][:-1]}, CTX, SMALL)
    ctx = CodecContext(212, 7, 100.0)  # 41 a chunk: 433 bits of fields in 55 bytes
    wire = TOPK2.encode(random_delta(SMALL), ctx)
    padded = wire["b"].clone()
    padded[TOPK2.layout(ctx).packed - 1] |= 0x80  # a padding bit
    with pytest.raises(BadTensors, match="padding"):
        TOPK2.decode({**wire, "b": padded}, ctx, SMALL)


def test_error_feedback_with_decay_is_momentum() -> None:
    shapes = {"w": (4096,)}
    ctx = CodecContext(212, 7, 64.0, ef_decay=0.5)
    ef = ErrorFeedback()
    d1, d2 = random_delta(shapes, 1), random_delta(shapes, 2)
    sent1 = to_dense(TOPK2.decode(compress(d1, TOPK2, ctx, ef), ctx, shapes), shapes)["w"]
    assert torch.equal(ef.residual["w"], d1["w"] - sent1)  # e = Δ1 − sent
    e1 = ef.residual["w"].clone()
    sent2 = to_dense(TOPK2.decode(compress(d2, TOPK2, ctx, ef), ctx, shapes), shapes)["w"]
    assert torch.allclose(ef.residual["w"], 0.5 * e1 + d2["w"] - sent2, atol=1e-9)  # e = βe + Δ2 − sent


def test_merge_mean_averages_each_index_over_its_senders_after_median_clipping() -> None:
    shapes = {"w": (6,)}
    a = {"w": Sparse(torch.tensor([0, 1]), torch.tensor([3.0, 4.0]))}  # norm 5
    b = {"w": Sparse(torch.tensor([1, 2]), torch.tensor([1.0, 0.0]))}  # norm 1
    c = {"w": Sparse(torch.tensor([4]), torch.tensor([30.0]))}  # norm 30: clipped to the median, 5
    out = merge_mean([a, b, c], [0.25, 0.25, 0.5], shapes)["w"]
    assert out.indices.tolist() == [0, 1, 2, 4]
    # index 0: only a; index 1: a and b, equal weights; index 4: only c, clipped to norm 5
    assert out.values.tolist() == pytest.approx([3.0, 2.5, 0.0, 5.0])
    dense = {"w": torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0])}  # norm 5 as well: nothing clipped
    mixed = merge_mean([a, dense], [0.5, 0.5], shapes)["w"]  # a dense part sends every index
    assert mixed.tolist() == pytest.approx([4.0, 2.0, 0.0, 0.0, 0.0, 0.0])


def test_mean_merge_own_terms_add_up_to_the_update_and_restores_exactly() -> None:
    shapes = {"w": (5000,), "d": (3, 4)}
    g = torch.Generator().manual_seed(5)
    deltas = []
    for _ in range(3):  # top-k-like sparse parts that overlap, a dense part, the same norm each
        idx = torch.randperm(5000, generator=g)[:400].sort().values
        d = {"w": Sparse(idx, torch.randn(400, generator=g)), "d": torch.randn(3, 4, generator=g)}
        norm = (d["w"].values.square().sum() + d["d"].square().sum()).sqrt()
        deltas.append({"w": Sparse(idx, d["w"].values / norm), "d": d["d"] / norm})
    weights = [0.5, 0.3, 0.2]
    mm = MeanMerge(deltas, weights, shapes)
    params = {"w": torch.zeros(5000), "d": torch.zeros(3, 4)}
    add_(params, mm.update, 1.0)
    before = {k: v.clone() for k, v in params.items()}
    for i in range(3):
        saved = apply_(params, mm.term(i), -1.0)
        # i's values out, its weight still in every mean it was part of (nobody else's value grows)
        zeroed = [scaled(d, 0.0) if j == i else d for j, d in enumerate(deltas)]
        want = to_dense(merge_mean(zeroed, weights, shapes), shapes)
        for name in shapes:
            assert torch.allclose(params[name], want[name], atol=1e-6), (i, name)
        restore_(params, saved)
        assert all(torch.equal(params[k], before[k]) for k in params)
    total = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for i in range(3):
        add_(total, mm.term(i), 1.0)
    for name in shapes:  # the terms are the update, split by sender
        assert torch.allclose(total[name], before[name], atol=1e-6), name
