"""The merges hold lowrank's low-rank parts as factors (`Factored`), never dense: the same update,
shares and terms as a dense mean within fp32, terms that add up to the update, no parameter-sized
tensor outside applying, and the same bits on every node that applies the same bytes."""

from __future__ import annotations

import math

import pytest
import torch

from bistro.delta import (
    CODECS,
    CodecContext,
    Factored,
    MeanMerge,
    Mixed,
    Sparse,
    SumMerge,
    add_,
    apply_,
    delta_norm,
    low_rank_part,
    low_rank_similarity,
    restore_,
    to_dense,
)
from bistro.delta.codec.base import BLOCK
from bistro.delta.merge import clip_factors
from bistro.plan import measure_peak


def random_deltas(
    shapes: dict[str, tuple[int, ...]], count: int, rank: int = 2, seed: int = 0, density: int = 50
) -> list[dict]:
    """lowrank-shaped deltas: 2-D parameters Mixed (random factors, random sparse values), 1-D sparse;
    norms far apart, so the median clip bites."""
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for i in range(count):
        d = {}
        for name, shape in shapes.items():
            size = math.prod(shape)
            k = max(1, size // density)
            sparse = Sparse(torch.randperm(size, generator=g)[:k].sort().values, torch.randn(k, generator=g))
            if len(shape) == 2:
                low = Factored(
                    torch.randn(shape[0], rank, generator=g), torch.randn(shape[1], rank, generator=g)
                )
                d[name] = Mixed(low.scaled(0.1 * (i + 1)), sparse)
            else:
                d[name] = sparse
        deltas.append(d)
    return deltas


def dense_mean(
    deltas: list[dict], weights: list[float], shapes: dict
) -> tuple[dict, list[float], list[dict]]:
    """The mean merge computed densely, as the reference: (update, shares, terms), each dense."""
    clip = clip_factors([math.sqrt(sum(float(t.double().square().sum()) for t in to_dense(d, shapes).values()))
                         for d in deltas])  # fmt: skip
    update, shares, terms = {}, [0.0] * len(deltas), [{} for _ in deltas]
    mass, taken = [0.0] * len(deltas), [0.0] * len(deltas)
    for name, shape in shapes.items():
        size = math.prod(shape)
        low_total, low_held = torch.zeros(size, dtype=torch.float64), 0.0
        total, held = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        for d, w, c in zip(deltas, weights, clip, strict=True):
            p = d[name]
            if isinstance(p, Mixed):
                low_total += p.low.full().reshape(-1).double() * w * c
                low_held += w
                p = p.sparse
            total.index_add_(0, p.indices, p.values.double() * w * c)
            held.index_add_(0, p.indices, torch.full((p.indices.numel(),), w, dtype=torch.float64))
        mean = torch.where(held > 0, total / held.clamp_min(1e-30), 0.0)
        update[name] = (mean + (low_total / low_held if low_held else 0.0)).view(shape)
        for i, (d, w, c) in enumerate(zip(deltas, weights, clip, strict=True)):
            p, t = d[name], torch.zeros(size, dtype=torch.float64)
            if isinstance(p, Mixed):
                low = p.low.full().reshape(-1).double()
                t += low * w * c / low_held
                mass[i] += float(low.abs().sum())
                taken[i] += float(low.abs().sum()) * w / low_held
                p = p.sparse
            h = held[p.indices]
            t.index_add_(0, p.indices, p.values.double() * w * c / h)
            mass[i] += float(p.values.double().abs().sum())
            taken[i] += float((p.values.double().abs() * w / h).sum())
            terms[i][name] = t.view(shape)
    shares = [c * t / m for c, t, m in zip(clip, taken, mass, strict=True)]
    return update, shares, terms


SHAPES = {"a": (60, 40), "b": (33, 70), "c": (50,)}


def test_the_factored_mean_merge_is_the_dense_mean_and_its_terms_add_up_to_it() -> None:
    deltas = random_deltas(SHAPES, 5)
    weights = [0.3, 0.25, 0.2, 0.15, 0.1]
    mm = MeanMerge(deltas, weights, SHAPES)
    want, shares, terms = dense_mean(deltas, weights, SHAPES)
    assert isinstance(mm.update["a"], Mixed) and mm.update["a"].low.rank == 5 * 2  # K · r factors
    got = to_dense(mm.update, SHAPES)
    for name in SHAPES:
        assert torch.allclose(got[name].double(), want[name], rtol=1e-5, atol=1e-6), name
    total = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for i in range(len(deltas)):
        assert mm.share(i) == pytest.approx(shares[i], rel=1e-5)
        term = mm.term(i)
        assert isinstance(term["a"], Mixed) and term["a"].low.rank == 2  # its own rank-r factors
        dense = to_dense(term, SHAPES)
        for name in SHAPES:
            assert torch.allclose(dense[name].double(), terms[i][name], rtol=1e-5, atol=1e-6), (i, name)
        add_(total, term, 1.0)
    for name in SHAPES:  # the terms are the update, split by sender
        assert torch.allclose(total[name], got[name], atol=1e-5), name


def test_the_factored_sum_merge_is_the_weighted_sum() -> None:
    deltas = random_deltas(SHAPES, 4, seed=1)
    sm = SumMerge(deltas, [0.4, 0.3, 0.2, 0.1], SHAPES)
    assert isinstance(sm.update["a"], Mixed) and sm.update["a"].low.rank == 4 * 2
    want = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    total = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for i, d in enumerate(deltas):
        for name, t in to_dense(d, SHAPES).items():
            want[name] += t.double() * sm.weights[i]
        add_(total, sm.term(i), 1.0)
    got = to_dense(sm.update, SHAPES)
    for name in SHAPES:
        assert torch.allclose(got[name].double(), want[name], atol=1e-5), name
        assert torch.allclose(total[name], got[name], atol=1e-5), name


def _tensors(x: object) -> list[torch.Tensor]:
    """Every tensor `x` holds, through tuples, lists and dicts."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def test_merging_lowrank_deltas_allocates_nothing_of_a_matrix_size_until_it_is_applied() -> None:
    shapes = {"w": (3000, 2000), "b": (2000,)}  # 6M entries: more than one materialising block
    size = 3000 * 2000
    assert size > BLOCK
    deltas = random_deltas(shapes, 4, rank=1, seed=2, density=128)  # lowrank's 32 of 4096

    def merge_and_terms() -> MeanMerge:
        mm = MeanMerge(deltas, [0.25] * 4, shapes)
        for i in range(4):
            mm.term(i)
        return mm

    peak, mm = measure_peak(merge_and_terms)
    entries = sum(
        p.sparse.indices.numel() if isinstance(p, Mixed) else p.indices.numel()
        for d in deltas
        for p in d.values()
    )
    assert peak < 64 * entries and peak < size * 4 / 2, peak  # the union and its sort: the wire's size
    held = _tensors(mm.update) + _tensors(mm.means)
    assert held and max(t.numel() for t in held) < size / 10
    peak, _ = measure_peak(lambda: [mm.share(i) for i in range(4)])
    assert peak < BLOCK * 4 * 3, peak  # |P Qᵀ| summed block by block, never the whole matrix
    params = {"w": torch.zeros(shapes["w"]), "b": torch.zeros(shapes["b"])}
    peak, _ = measure_peak(lambda: add_(params, mm.update, 1.0))
    assert peak < BLOCK * 4 * 3, peak  # applied block by block too


def test_a_follower_applying_the_same_bytes_twice_gets_the_same_bits() -> None:
    shapes = {"w": (2100, 2100), "b": (300,)}  # more than one block
    g = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(2100, 2, generator=g) @ torch.randn(2, 2100, generator=g) * 1e-3,
             "b": torch.randn(300, generator=g)}  # fmt: skip
    codec, ctx = CODECS["lowrank"], CodecContext(netuid=1, window=1, compression=128.0, rank=2)
    wire = {n: t.clone() for n, t in codec.encode(delta, ctx).items()}
    params = [{n: torch.full(s, 0.5) for n, s in shapes.items()} for _ in range(2)]
    for p in params:
        add_(p, codec.decode({n: t.clone() for n, t in wire.items()}, ctx, shapes), 1.0)
    assert all(torch.equal(params[0][n], params[1][n]) for n in shapes)
    # and the bits are those of materialising the product whole, then adding it
    decoded = codec.decode(wire, ctx, shapes)
    whole = torch.full(shapes["w"], 0.5)
    whole.add_(decoded["w"].low.full())
    whole.view(-1).index_add_(0, decoded["w"].sparse.indices, decoded["w"].sparse.values)
    assert torch.equal(whole, params[0]["w"])
    before = {n: t.clone() for n, t in params[0].items()}
    saved = apply_(params[0], decoded, -1.0)
    restore_(params[0], saved)
    assert all(torch.equal(params[0][n], before[n]) for n in shapes)


def test_norms_and_low_rank_cosines_come_from_the_factors() -> None:
    a, b = random_deltas(SHAPES, 2, seed=4)
    da = to_dense(a, SHAPES)
    dense_norm = math.sqrt(sum(float(t.double().square().sum()) for t in da.values()))
    assert delta_norm(a) == pytest.approx(dense_norm, rel=1e-6)
    la = torch.cat([p.full().reshape(-1) for p in low_rank_part(a).values()]).double()
    lb = torch.cat([p.full().reshape(-1) for p in low_rank_part(b).values()]).double()
    cosine = float(la @ lb / (la.norm() * lb.norm()))
    assert low_rank_similarity(a, b) == pytest.approx(cosine, abs=1e-6)
    assert low_rank_similarity(a, a) == pytest.approx(1.0, abs=1e-9)
    assert all(isinstance(p, Factored) for p in low_rank_part(a).values())


def test_sums_on_the_union_and_in_dense_slots_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many senders cover most of a parameter: the sums go on in dense slots, with the bits the
    union would have given (every position adds its values in the deltas' order either way)."""
    from bistro.delta.merge import _Parts

    deltas = random_deltas(SHAPES, 12, seed=5, density=8)
    weights = [1 / 12] * 12
    runs = []
    for dense_at, fold_min in ((2.0, 1 << 20), (2.0, 1), (0.5, 1), (0.0, 1)):  # never, folds, midway, at once
        monkeypatch.setattr(_Parts, "DENSE_AT", dense_at)
        monkeypatch.setattr(_Parts, "FOLD_MIN", fold_min)
        mm = MeanMerge(deltas, weights, SHAPES)
        runs.append((to_dense(mm.update, SHAPES), [to_dense(mm.term(i), SHAPES) for i in range(12)]))
    for update, terms in runs[1:]:
        assert all(torch.equal(update[n], runs[0][0][n]) for n in SHAPES)
        assert all(torch.equal(t[n], r[n]) for t, r in zip(terms, runs[0][1], strict=True) for n in SHAPES)


def test_every_pairs_low_rank_cosine_at_once_is_each_pairs_exact_one() -> None:
    from bistro.delta import low_rank_cosines

    deltas = random_deltas(SHAPES, 4, seed=7)
    deltas.append({"c": deltas[0]["c"]})  # no low-rank part: cosine 0 with everyone
    deltas.append(dict(deltas[1]))  # a copy of delta 1's parts
    cos = low_rank_cosines([low_rank_part(d) for d in deltas])
    for a in range(len(deltas)):
        for b in range(len(deltas)):
            assert float(cos[a, b]) == pytest.approx(low_rank_similarity(deltas[a], deltas[b]), abs=1e-9), (
                a,
                b,
            )
    assert float(cos[1, 5]) == pytest.approx(1.0) and float(cos[4, 4]) == 0.0


@pytest.mark.parametrize("rule", [MeanMerge, SumMerge])
def test_the_merges_on_several_threads_give_one_threads_bits(rule: type) -> None:
    """Each parameter's sums on a thread of its own (`mechanism.host_threads`): the update, every
    share and every term are one thread's, bit for bit."""
    shapes = {"a": (40, 24), "b": (24,), "c": (16, 40), "d": (300,)}
    deltas = random_deltas(shapes, 5, seed=3)
    weights = [0.1, 0.3, 0.2, 0.25, 0.15]
    one, three = rule(deltas, weights, shapes), rule(deltas, weights, shapes, threads=3)
    assert list(one.update) == list(three.update) == list(shapes)
    assert _bits(_tensors(one.update)) == _bits(_tensors(three.update))
    for i in range(len(deltas)):
        assert one.share(i) == three.share(i)
        assert _bits(_tensors(one.term(i))) == _bits(_tensors(three.term(i)))


def _bits(tensors: list[torch.Tensor]) -> list[bytes]:
    return [t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors]
