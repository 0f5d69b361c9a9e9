"""Apply and remove in place: bit-exact restore, only touched positions, merge, similarity, norm."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import transformers

from bistro.config import build_settings
from bistro.delta import (
    CODECS,
    CodecContext,
    Sparse,
    add_,
    apply_,
    delta_norm,
    merge,
    restore_,
    similarity,
    sketch,
    to_dense,
)
from bistro.delta.apply import applied_per_module
from bistro.model import llama_config, sequence_losses

CTX = CodecContext(netuid=212, window=3, compression=100.0)


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(build_settings("tiny").model))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters()}


def decoded(model: torch.nn.Module, codec: str, seed: int) -> dict:
    """A decoded random delta for the model (cached: tests only read it)."""
    return _decoded(tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), codec, seed)


@functools.cache
def _decoded(shape_items: tuple, codec: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = dict(shape_items)
    delta = {n: torch.randn(s, generator=g) * 1e-2 for n, s in shapes.items()}
    return CODECS[codec].decode(CODECS[codec].encode(delta, CTX), CTX, shapes)


def bits(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().view(torch.int32) for n, p in params.items()}


@pytest.mark.parametrize("codec", ["lowrank", "topk", "dense"])
def test_a_delta_applied_module_by_module_gives_the_losses_of_applying_it_whole(
    model: torch.nn.Module, codec: str
) -> None:
    """The validator's leave-one-out (θ_eval less a uid's term) applied one parameter at a time as
    each module runs: the same losses, bit for bit, as applying the term to every parameter in
    place, and every parameter as it was, with no clone of the model held."""
    params = params_of(model)
    before = bits(params)
    term = decoded(model, codec, 7)
    seqs = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(1))
    saved = apply_(params, term, -0.5)
    whole = sequence_losses(model, seqs, 4)
    restore_(params, saved)
    plain = sequence_losses(model, seqs, 4)
    with applied_per_module(model, params, term, -0.5) as applied:
        per_module = sequence_losses(model, seqs, 4)
        assert not applied.saved  # between forwards nothing is applied, nothing is held
    assert torch.equal(per_module, whole) and not torch.equal(per_module, plain)
    assert all(torch.equal(params[n].view(torch.int32), before[n]) for n in params)


def test_a_forward_that_raises_inside_leaves_every_parameter_as_it_was(model: torch.nn.Module) -> None:
    params = params_of(model)
    before = bits(params)
    term = decoded(model, "lowrank", 8)
    down = list(model.model.layers)[-1].mlp.down_proj  # raises after its weight was applied
    with pytest.raises(RuntimeError, match="halfway"):
        with applied_per_module(model, params, term, 1.0) as applied:
            handle = down.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("halfway")))
            try:
                sequence_losses(model, torch.zeros(2, 8, dtype=torch.long), 2)
            finally:
                handle.remove()
                assert applied.saved  # left applied by the forward that raised
    assert all(torch.equal(params[n].view(torch.int32), before[n]) for n in params)


@pytest.mark.parametrize("codec", ["topk", "mask", "dense"])
def test_remove_then_restore_is_bit_exact(model: torch.nn.Module, codec: str) -> None:
    params = params_of(model)
    before = bits(params)
    deltas = [decoded(model, codec, seed) for seed in range(3)]
    for d in deltas:  # θ_eval = θ + Σ m_i Δ_i
        add_(params, d, 1 / 3)
    eval_bits = bits(params)
    for d in deltas:
        saved = apply_(params, d, -1 / 3)  # remove m_i Δ_i
        assert any(not torch.equal(params[n].view(torch.int32), eval_bits[n]) for n in params)
        restore_(params, saved)  # put it back
        assert all(torch.equal(params[n].view(torch.int32), eval_bits[n]) for n in params)
    # a float subtraction would not have been exact: that is why we save and restore
    naive = {n: p.detach().clone() for n, p in params.items()}
    add_(naive, deltas[0], -1 / 3)
    add_(naive, deltas[0], 1 / 3)
    assert any(not torch.equal(naive[n].view(torch.int32), eval_bits[n]) for n in params)
    with torch.no_grad():  # leave the shared model as the fixture built it
        for n, p in params.items():
            p.copy_(before[n].view(torch.float32))


def test_sparse_apply_touches_only_its_positions(model: torch.nn.Module) -> None:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = bits(params)
    delta = decoded(model, "mask", seed=5)
    apply_(params, delta, 0.5)
    for name, part in delta.items():
        changed = (params[name].view(torch.int32) != before[name]).reshape(-1).nonzero().reshape(-1)
        assert bool(torch.isin(changed, part.indices).all()), name
        want = before[name].view(torch.float32).reshape(-1)[part.indices] + 0.5 * part.values
        assert torch.allclose(params[name].reshape(-1)[part.indices], want)


def test_add_matches_dense_arithmetic(model: torch.nn.Module) -> None:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for codec in ("topk", "dense"):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        delta = decoded(model, codec, seed=6)
        add_(params, delta, 0.25)
        dense = to_dense(delta, shapes)
        for n, p in model.named_parameters():
            assert torch.allclose(params[n], p.detach() + 0.25 * dense[n], atol=1e-7)


def test_merge_keeps_sparse_as_a_union_and_equals_the_dense_sum(model: torch.nn.Module) -> None:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    deltas = [decoded(model, "topk", seed) for seed in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = merge(deltas, weights, shapes)
    for name in shapes:
        part = merged[name]
        assert isinstance(part, Sparse)
        assert torch.equal(part.indices, torch.cat([d[name].indices for d in deltas]).unique())
    dense = [to_dense(d, shapes) for d in deltas]
    want = {n: sum(w * x[n] for x, w in zip(dense, weights, strict=True)) for n in shapes}
    got = to_dense(merged, shapes)
    assert all(torch.allclose(got[n], want[n], atol=1e-7) for n in shapes)
    mixed = merge([deltas[0], decoded(model, "dense", 9)], [1.0, 1.0], shapes)
    assert all(isinstance(p, torch.Tensor) for p in mixed.values())
    with pytest.raises(ValueError):
        merge(deltas, [1.0], shapes)


def test_similarity(model: torch.nn.Module) -> None:
    a, b = decoded(model, "mask", 1), decoded(model, "mask", 2)
    negated = {n: Sparse(p.indices, -p.values) for n, p in a.items()}
    assert similarity(a, a) == pytest.approx(1.0)
    assert similarity(a, negated) == pytest.approx(-1.0)
    assert abs(similarity(a, b)) < 0.05  # independent noise
    t1, t2 = decoded(model, "topk", 1), decoded(model, "topk", 2)
    shared = sum(int(torch.isin(t1[n].indices, t2[n].indices).sum()) for n in t1)
    assert shared > 0 and abs(similarity(t1, t2)) < 0.2
    disjoint = {"x": Sparse(torch.tensor([0, 2]), torch.tensor([1.0, 1.0]))}
    other = {"x": Sparse(torch.tensor([1, 3]), torch.tensor([1.0, 1.0]))}
    assert similarity(disjoint, other) == 0.0
    d1, d2 = decoded(model, "dense", 1), decoded(model, "dense", 1)
    assert similarity(d1, d2) == pytest.approx(1.0)
    # a copy re-sent through the same codec still looks like it
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    copied = CODECS["topk"].decode(CODECS["topk"].encode(to_dense(t1, shapes), CTX), CTX, shapes)
    assert similarity(copied, t1) > 0.99
    # agreeing where supports meet is not copying: whole-vector cosine, not over shared positions
    left = {"x": Sparse(torch.arange(0, 10), torch.ones(10))}
    right = {"x": Sparse(torch.arange(5, 15), torch.ones(10))}
    assert similarity(left, right) == pytest.approx(0.5)


def test_delta_norm() -> None:
    sparse = {"x": Sparse(torch.tensor([1, 5]), torch.tensor([3.0, 4.0])), "y": torch.tensor([[12.0]])}
    assert delta_norm(sparse) == pytest.approx(13.0)
    assert delta_norm({"x": torch.tensor([3e38, 3e38])}) == pytest.approx(
        3e38 * math.sqrt(2)
    )  # fp64: no overflow
    assert math.isinf(delta_norm({"x": torch.tensor([float("inf"), 1.0])}))


def test_sketch_estimates_similarity(model: torch.nn.Module) -> None:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    deltas = [decoded(model, "topk", seed) for seed in (1, 2, 3)] + [decoded(model, "dense", 4)]
    copy = {n: Sparse(p.indices, p.values * 1.0001) for n, p in deltas[0].items()}
    deltas.append(copy)
    sketches = [sketch(d, shapes) for d in deltas]
    for i, a in enumerate(deltas):
        for j, b in enumerate(deltas):
            estimate = float(sketches[i] @ sketches[j])
            assert estimate == pytest.approx(similarity(a, b), abs=0.03), (i, j)
    assert float(sketches[0] @ sketches[4]) > 0.99
