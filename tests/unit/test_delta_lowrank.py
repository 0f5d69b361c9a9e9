"""lowrank: rank-r int8 factors of each 2-D parameter, then topk2 of the rest, in one uint8 tensor a
parameter. Round trips, the bytes it promises, refusals of bytes a hostile miner could send, the
same bits on every node, and error feedback carrying exactly what the wire did not."""

from __future__ import annotations

import pytest
import torch

from bistro.config import build_settings
from bistro.delta import (
    CODECS,
    BadTensors,
    CodecContext,
    ErrorFeedback,
    Factored,
    MeanMerge,
    Mixed,
    Sparse,
    add_,
    apply_,
    compress,
    delta_norm,
    merge_mean,
    restore_,
    scaled,
    to_dense,
)
from bistro.delta.codec import NonFiniteValues, low_rank
from bistro.model import build_model, state_tensors

CTX = CodecContext(netuid=212, window=7, compression=128.0)
SHAPES = {"w": (300, 50), "b": (7,), "c": (3 * 4096 + 5,)}
LOWRANK, TOPK2 = CODECS["lowrank"], CODECS["topk2"]


def rank_one_plus_noise(seed: int = 0, noise: float = 0.05) -> dict[str, torch.Tensor]:
    """Like an early Adam delta: one direction per matrix, every entry about the same size."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(300, 1, generator=g).sign(), torch.randn(1, 50, generator=g).sign()
    return {
        "w": 1e-3 * (u @ v + noise * torch.randn(300, 50, generator=g)),
        "b": 1e-3 * torch.randn(7, generator=g),
        "c": 1e-3 * torch.randn(3 * 4096 + 5, generator=g),
    }


def rel_error(sent: torch.Tensor, true: torch.Tensor) -> float:
    return float((sent - true).norm() / true.norm())


def test_a_rank_one_delta_travels_almost_whole_where_topk2_sends_a_sliver() -> None:
    delta = rank_one_plus_noise()
    wire = LOWRANK.encode(delta, CTX)
    assert {n: (tuple(t.shape), t.dtype) for n, t in wire.items()} == LOWRANK.wire_spec(SHAPES, CTX)
    decoded = LOWRANK.decode(wire, CTX, SHAPES)
    assert isinstance(decoded["w"], Mixed) and decoded["w"].dense.shape == (300, 50)  # 2-D: product + top-k
    assert isinstance(decoded["b"], Sparse) and isinstance(decoded["c"], Sparse)  # the rest: top-k
    top = to_dense(TOPK2.decode(TOPK2.encode(delta, CTX), CTX, SHAPES), SHAPES)
    assert rel_error(decoded["w"].full(), delta["w"]) < 0.1
    assert rel_error(top["w"], delta["w"]) > 0.9


def test_factor_bytes_are_counted_and_the_tiny_ratio_beats_146() -> None:
    spec = LOWRANK.wire_spec(SHAPES, CTX)
    records = TOPK2.wire_spec(SHAPES, CTX)
    assert spec["w"][0][0] == records["w"][0][0] + 300 + 50 + 8  # int8 P and Q, two fp32 scales
    assert spec["b"] == records["b"] and spec["c"] == records["c"]
    two = CodecContext(netuid=212, window=7, compression=128.0, rank=2)
    assert LOWRANK.wire_spec(SHAPES, two)["w"][0][0] == records["w"][0][0] + 2 * (300 + 50 + 8)
    settings = build_settings("tiny", None, {})
    shapes = {n: tuple(t.shape) for n, t in state_tensors(build_model(settings.model, seed=0)).items()}
    assert LOWRANK.ratio(shapes, CTX) > 146 * 1.15  # room for the header and signature


def test_decoding_gives_the_same_bits_every_time_and_in_any_thread_count() -> None:
    wire = LOWRANK.encode(rank_one_plus_noise(), CodecContext(netuid=1, window=1, compression=128.0, rank=3))
    ctx = CodecContext(netuid=1, window=1, compression=128.0, rank=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = LOWRANK.decode(wire, ctx, SHAPES)["w"].full()
        torch.set_num_threads(max(2, threads))
        two = LOWRANK.decode(wire, ctx, SHAPES)["w"].full()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_low_rank_finds_the_top_direction_without_touching_the_global_generator() -> None:
    g = torch.Generator().manual_seed(3)
    t = 5 * torch.randn(40, 1, generator=g) @ torch.randn(1, 30, generator=g) + 0.1 * torch.randn(
        40, 30, generator=g
    )
    state = torch.random.get_rng_state()
    p, q = low_rank(t, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    best = torch.linalg.svdvals(t)
    assert rel_error(p @ q.T, t) == pytest.approx(float(best[1:].norm() / best.norm()), rel=1e-3)


def test_error_feedback_holds_exactly_what_the_wire_did_not_carry() -> None:
    ef = ErrorFeedback()
    total = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    sent = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for window in range(4):
        ctx = CodecContext(netuid=212, window=window, compression=128.0)
        delta = rank_one_plus_noise(seed=window)
        got = to_dense(LOWRANK.decode(compress(delta, LOWRANK, ctx, ef), ctx, SHAPES), SHAPES)
        for n in SHAPES:
            total[n] += delta[n].double()
            sent[n] += got[n].double()
    for n in SHAPES:
        assert torch.allclose(sent[n] + ef.residual[n].double(), total[n], atol=1e-8), n


def _with_scales(wire: dict[str, torch.Tensor], scales: list[float]) -> dict[str, torch.Tensor]:
    raw = wire["w"].clone()
    raw[350:358] = torch.tensor(scales, dtype=torch.float32).view(torch.uint8)
    return {**wire, "w": raw}


def test_scales_a_hostile_miner_could_send_are_refused_with_a_reason() -> None:
    wire = LOWRANK.encode(rank_one_plus_noise(), CTX)
    for bad in ([float("nan"), 1.0], [1.0, float("inf")]):
        with pytest.raises(NonFiniteValues):
            LOWRANK.decode(_with_scales(wire, bad), CTX, SHAPES)
    with pytest.raises(BadTensors, match=">= 0"):
        LOWRANK.decode(_with_scales(wire, [-1.0, 1.0]), CTX, SHAPES)
    broken = wire["w"].clone()
    broken[-1] = 0xFF  # the last topk2 record's bin-mean table: 0xFF.. is a bf16 NaN
    broken[-2] = 0xFF
    with pytest.raises(NonFiniteValues):
        LOWRANK.decode({**wire, "w": broken}, CTX, SHAPES)
    with pytest.raises(BadTensors):
        LOWRANK.decode({**wire, "w": wire["w"][:-1]}, CTX, SHAPES)
    with pytest.raises(BadTensors):  # a blob made for rank 1 read as rank 2
        LOWRANK.decode(wire, CodecContext(netuid=212, window=7, compression=128.0, rank=2), SHAPES)


def test_the_rank_is_a_codec_parameter_and_bounded() -> None:
    assert LOWRANK.params(CTX) == {"compression": 128.0, "chunk": 4096, "value_bits": 2, "rank": 1}
    for rank in (0, 9, 1.0):
        with pytest.raises(ValueError, match="rank"):
            CodecContext(netuid=1, window=1, compression=128.0, rank=rank)  # type: ignore[arg-type]


def test_merge_mean_averages_low_rank_parts_over_everyone_and_top_k_values_over_their_senders() -> None:
    shapes = {"w": (2, 3)}
    low = Factored(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [0.0], [0.0]]))  # 1 at [0, 0]
    a = {"w": Mixed(low.scaled(2.0), Sparse(torch.tensor([5]), torch.tensor([0.0])))}
    b = {"w": Mixed(low.scaled(0.0), Sparse(torch.tensor([5]), torch.tensor([2.0])))}
    # norms 2, 2, 2: nothing clipped. The dense parts: mean over all three, 2/3 at [0, 0]. Index 5:
    # a and b sent it, (0 + 2) / 2; index 4: c alone sent 2, and keeps it (a plain mean gives 2/3).
    c = {"w": Mixed(low.scaled(0.0), Sparse(torch.tensor([4]), torch.tensor([2.0])))}
    out = merge_mean([a, b, c], [1.0, 1.0, 1.0], shapes)["w"]
    assert isinstance(out, Mixed) and isinstance(out.low, Factored)  # held factored, never dense
    assert out.full().reshape(-1).tolist() == pytest.approx([2 / 3, 0.0, 0.0, 0.0, 2.0, 1.0])


def test_own_terms_of_mixed_parts_add_up_to_the_update_and_restores_exactly() -> None:
    shapes = {"w": (40, 30), "b": (50,)}
    deltas = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        d = {"w": Mixed(Factored(torch.randn(40, 1, generator=g), torch.randn(30, 1, generator=g)),
                        Sparse(torch.randperm(1200, generator=g)[:60].sort().values, torch.randn(60, generator=g))),
             "b": Sparse(torch.randperm(50, generator=g)[:10].sort().values, torch.randn(10, generator=g))}  # fmt: skip
        norm = delta_norm(d)
        deltas.append({n: scaled({n: p}, 1 / norm)[n] for n, p in d.items()})  # the same norm each
    weights = [0.5, 0.3, 0.2]
    mm = MeanMerge(deltas, weights, shapes)
    params = {"w": torch.zeros(40, 30), "b": torch.zeros(50)}
    add_(params, mm.update, 1.0)
    assert torch.allclose(params["w"], to_dense(merge_mean(deltas, weights, shapes), shapes)["w"])
    before = {k: v.clone() for k, v in params.items()}
    for i in range(3):
        saved = apply_(params, mm.term(i), -1.0)
        # i's values out, its weight still in every mean (the same norm each: no clip factor moves)
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
    # the dense parts are shared by all three: no delta's share of the update is whole
    assert all(0 < mm.share(i) < 1 for i in range(3))
