"""Apply, remove and combine decoded deltas, in place on the model's own tensors.

DESIGN.md "Mechanism", steps 4-5, one validator, window w:

    4. θ_eval = θ_w + Σ_{i∈V} m_i Δ_i
    5. for each i in V: L_with = L(θ_eval); remove m_i Δ_i; L_without = L(θ_eval − m_i Δ_i);
       put it back **bit-exactly** (restore the saved values, not a float subtraction).

In code:

    for delta, m in zip(deltas, weights):
        add_(params, delta, m)                     # step 4: θ_eval
    for delta, m in zip(deltas, weights):          # step 5
        l_with = loss(model)
        saved = apply_(params, delta, -m)          # remove m_i Δ_i, keeping what was there
        l_without = loss(model)
        restore_(params, saved)                    # θ_eval again, bit for bit

A sparse part touches only its positions (`index_add_` on the flat view), so applying a `mask`
delta costs O(k), far below a forward pass; a dense part touches everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..scoring import clip_factors
from .codec import Delta, Mixed, Part, Shapes, Sparse, densify, full, numel

Saved = dict[str, Part]
"""Previous values at every touched position: Sparse(indices, old values) or a dense copy."""


def _flat(p: Tensor) -> Tensor:
    if not p.is_contiguous():
        raise ValueError("parameters must be contiguous to be updated in place")
    return p.view(-1)


@torch.no_grad()
def add_(params: dict[str, Tensor], delta: Delta, scale: float) -> None:
    """params += scale * delta, in place, without saving anything (θ_eval, the master)."""
    for name, part in delta.items():
        p = params[name]
        if isinstance(part, Mixed):
            add_(params, {name: part.dense}, scale)
            part = part.sparse
        if isinstance(part, Sparse):
            idx, vals = part.indices.to(p.device), part.values.to(p.device, p.dtype)
            _flat(p).index_add_(0, idx, vals, alpha=scale)
        else:
            p.add_(part.to(p.device, p.dtype).view_as(p), alpha=scale)


@torch.no_grad()
def apply_(params: dict[str, Tensor], delta: Delta, scale: float) -> Saved:
    """params += scale * delta, in place; returns the previous values of every touched position."""
    saved: Saved = {}
    for name, part in delta.items():
        p = params[name]
        if isinstance(part, Sparse):
            idx = part.indices.to(p.device)
            saved[name] = Sparse(idx, _flat(p).index_select(0, idx))
        else:
            saved[name] = p.detach().clone()
    add_(params, delta, scale)
    return saved


@torch.no_grad()
def restore_(params: dict[str, Tensor], saved: Saved) -> None:
    """Put back the values `apply_` saved: every parameter is bit-identical to before."""
    for name, part in saved.items():
        p = params[name]
        if isinstance(part, Sparse):
            _flat(p).index_copy_(0, part.indices, part.values)
        else:
            p.copy_(part)


def scaled(delta: Delta, factor: float) -> Delta:
    """`delta` with every value times `factor` (sparse parts keep their positions)."""
    return {name: _scaled(p, factor) for name, p in delta.items()}


def _scaled(p: Part, factor: float) -> Part:
    if isinstance(p, Mixed):
        return Mixed(p.dense * factor, Sparse(p.sparse.indices, p.sparse.values * factor))
    return Sparse(p.indices, p.values * factor) if isinstance(p, Sparse) else p * factor


def delta_norm(delta: Delta) -> float:
    """L2 norm over every part (float64 accumulation, so huge values give inf, not NaN)."""
    return math.sqrt(sum(_square(p) for p in delta.values()))


def to_dense(delta: Delta, shapes: Shapes) -> dict[str, Tensor]:
    """Dense fp32 tensors (zeros where a sparse part holds nothing)."""
    return densify(delta, shapes)


def merge(deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes) -> Delta:
    """Σ w_i Δ_i; a parameter stays sparse (union of positions) when every input is sparse there."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    out: Delta = {}
    for name, shape in shapes.items():
        parts = [(d[name], float(w)) for d, w in zip(deltas, weights, strict=True) if name in d]
        if not parts:
            continue
        if all(isinstance(p, Sparse) for p, _ in parts):
            idx = torch.cat([p.indices for p, _ in parts])
            vals = torch.cat([p.values.float() * w for p, w in parts])
            union, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            out[name] = Sparse(union, torch.zeros(union.numel()).index_add_(0, inverse, vals))
        else:
            dense = torch.zeros(shape)
            for p, w in parts:
                add_({name: dense}, {name: p}, w)
            out[name] = dense
    return out


def merge_mean(deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes) -> Delta:
    """Per index, the `weights`-weighted mean of the values of the deltas that hold it (a dense part
    holds every index), each delta first scaled down to the median norm (templar's merge).

    `merge` divides a coordinate only one of N barely overlapping top-k deltas holds by about N; this
    keeps it. The median is the lower one (torch.median's) so every node takes the same."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    clip = clip_factors([delta_norm(d) for d in deltas])
    out: Delta = {}
    for name, shape in shapes.items():
        parts = [(d[name], float(w), c) for d, w, c in zip(deltas, weights, clip, strict=True) if name in d]
        if not parts:
            continue
        if all(isinstance(p, Sparse) for p, _, _ in parts):
            idx = torch.cat([p.indices for p, _, _ in parts])
            vals = torch.cat([p.values.float() * (w * c) for p, w, c in parts])
            held = torch.cat([torch.full((p.indices.numel(),), w) for p, w, _ in parts])
            union, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            total = torch.zeros(union.numel()).index_add_(0, inverse, vals)
            out[name] = Sparse(union, total / torch.zeros(union.numel()).index_add_(0, inverse, held))
            continue
        if any(isinstance(p, Mixed) for p, _, _ in parts):
            out[name] = TwoMeans.of(parts, numel(shape)).mean().view(shape)
            continue
        total, held = torch.zeros(numel(shape)), torch.zeros(numel(shape))
        for p, w, c in parts:
            if isinstance(p, Sparse):
                total.index_add_(0, p.indices, p.values.float(), alpha=w * c)
                held.index_add_(0, p.indices, torch.full((p.indices.numel(),), w))
            else:
                total.add_(p.float().reshape(-1), alpha=w * c)
                held.add_(w)
        out[name] = torch.where(held > 0, total / held.clamp_min(1e-30), 0.0).view(shape)
    return out


def _split(p: Part) -> tuple[Tensor | None, Sparse | None]:
    """A part's dense and sparse halves (either may be absent)."""
    if isinstance(p, Mixed):
        return p.dense, p.sparse
    return (None, p) if isinstance(p, Sparse) else (p, None)


class TwoMeans(NamedTuple):
    """`merge_mean` of one parameter where some delta holds it as `Mixed`: the mean of the dense
    parts over every delta that has one, plus, per index, the mean of the sparse values over the
    deltas that hold that index (a low-rank part is everyone's, a top-k value its sender's)."""

    dense_total: Tensor
    dense_held: float
    sparse_total: Tensor
    sparse_held: Tensor

    @classmethod
    def of(cls, parts: Sequence[tuple[Part, float, float]], size: int) -> TwoMeans:
        """Sums over (part, weight, clipping factor), in the given order (every node's order)."""
        dense_total, dense_held = torch.zeros(size), 0.0
        sparse_total, sparse_held = torch.zeros(size), torch.zeros(size)
        for p, w, c in parts:
            dense, sparse = _split(p)
            if dense is not None:
                dense_total.add_(dense.float().reshape(-1), alpha=w * c)
                dense_held += w
            if sparse is not None:
                sparse_total.index_add_(0, sparse.indices, sparse.values.float(), alpha=w * c)
                sparse_held.index_add_(0, sparse.indices, torch.full((sparse.indices.numel(),), w))
        return cls(dense_total, dense_held, sparse_total, sparse_held)

    def mean(self) -> Tensor:
        dense = (
            self.dense_total / self.dense_held if self.dense_held > 0 else torch.zeros_like(self.dense_total)
        )
        held = self.sparse_held
        return dense + torch.where(held > 1e-12, self.sparse_total / held.clamp_min(1e-30), 0.0)

    def taken(self, p: Part, w: float) -> tuple[float, float]:
        """(|p| summed, |p| weighted by its share w / Σ w of each mean it is in): for `share`."""
        dense, sparse = _split(p)
        mass = taken = 0.0
        if dense is not None:
            size = float(dense.float().abs().double().sum())
            mass, taken = mass + size, taken + size * w / max(self.dense_held, 1e-30)
        if sparse is not None:
            size_s = sparse.values.float().abs().double()
            held = self.sparse_held[sparse.indices].double().clamp_min(1e-30)
            mass, taken = mass + float(size_s.sum()), taken + float((size_s * (w / held)).sum())
        return mass, taken


class MeanMerge:
    """`merge_mean` of a window's deltas, and each one's exact leave-one-out.

    "Without uid i" for a merge that is not a weighted sum: θ_eval minus i's own term, `term(i)`:
    its values times its share of each per-index mean they are in, every denominator and clipping
    factor kept, so taking one delta out never rescales the others (the terms add up to `update`).
    The validator applies it with `apply_` and comes back with `restore_`, bit for bit, as with the
    weighted sum:

        add_(params, mm.update, 1.0)                    # θ_eval
        saved = apply_(params, mm.term(i), -1.0)        # θ_eval without i
        restore_(params, saved)
    """

    def __init__(self, deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes) -> None:
        self.deltas, self.weights, self.shapes = list(deltas), [float(w) for w in weights], shapes
        self.clip = clip_factors([delta_norm(d) for d in deltas])
        self.update = merge_mean(deltas, weights, shapes)
        # Per parameter: the update's flat positions (None: dense), and Σ w c v and Σ w over the
        # senders at each of them: O(union) for a sparse part, never a dense copy of the model.
        self.sums: dict[str, tuple[Tensor | None, Tensor, Tensor]] = {}
        self.two: dict[str, TwoMeans] = {}  # parameters some delta holds as `Mixed`
        for name in self.update:
            parts = [
                (d[name], w, c)
                for d, w, c in zip(self.deltas, self.weights, self.clip, strict=True)
                if name in d
            ]
            if any(isinstance(p, Mixed) for p, _, _ in parts):
                self.two[name] = TwoMeans.of(parts, numel(shapes[name]))
                continue
            part = self.update[name]
            at = part.indices if isinstance(part, Sparse) else None
            size = at.numel() if at is not None else numel(shapes[name])
            total, held = torch.zeros(size), torch.zeros(size)
            for d, w, c in zip(self.deltas, self.weights, self.clip, strict=True):
                p = d.get(name)
                if isinstance(p, Sparse):
                    where = p.indices if at is None else torch.searchsorted(at, p.indices)
                    total.index_add_(0, where, p.values.float(), alpha=w * c)
                    held.index_add_(0, where, torch.full((p.indices.numel(),), w))
                elif p is not None:
                    total.add_(p.float().reshape(-1), alpha=w * c)
                    held.add_(w)
            self.sums[name] = (at, total, held)

    def _at(self, name: str, p: Part) -> tuple[Tensor, Tensor]:
        """Delta part `p`'s flat positions and where they sit in `self.sums[name]`."""
        at = self.sums[name][0]
        pos = p.indices if isinstance(p, Sparse) else torch.arange(numel(self.shapes[name]))
        return pos, (pos if at is None else torch.searchsorted(at, pos))

    def share(self, i: int) -> float:
        """How much of delta i the update holds: the mean, over i's positions weighted by |value|, of
        its share w_i / Σ w of the means there, times its clipping factor. 1 for an unclipped delta
        that no other overlaps; w_i (normalised) where every delta holds every position, which is
        what the weighted sum gives it. The validator scores per unit of this, as per unit of m_i."""
        w, c = self.weights[i], self.clip[i]
        mass = taken = 0.0
        for name, p in self.deltas[i].items():
            if name in self.two:
                m, t = self.two[name].taken(p, w)
                mass, taken = mass + m, taken + t
                continue
            _, where = self._at(name, p)
            size = (p.values if isinstance(p, Sparse) else p.reshape(-1)).float().abs().double()
            mass += float(size.sum())
            taken += float((size * (w / self.sums[name][2][where].double().clamp_min(1e-30))).sum())
        return c * taken / mass if mass > 0 else c

    def term(self, i: int) -> Delta:
        """Delta i's own term in the update: at each position it sends, its value times its share
        w_i c_i / Σ w of the mean there, every denominator kept. `θ_eval − term(i)` is "θ_eval
        without uid i" as the validator scores it (issue 16 asks to define it for a merge that is
        not a weighted sum): what i's *values* put into θ_eval, and nothing else.

        Not the mean of the others (until session 8): taking i out of a mean also un-dilutes
        everyone else's values there, and that is not i's work. A freeloader's all-zero upload sits
        in every dense mean (a low-rank part is everyone's), so the mean of the others scaled the
        whole update up by 1 / (1 − its weight); where the update overshot, that "help" paid it:
        its summed incentive beat an honest miner's in a 6-window localnet (a fresh-clone CI of
        session 7). Its term is exactly 0, so its help is exactly 0."""
        out: Delta = {}
        w, c = self.weights[i], self.clip[i]
        for name, p in self.deltas[i].items():
            shape = self.shapes[name]
            if name in self.two:
                two = self.two[name]
                dense, sparse = _split(p)
                t = torch.zeros(numel(shape))
                if dense is not None and two.dense_held > 1e-12:
                    t.add_(dense.float().reshape(-1), alpha=w * c / two.dense_held)
                if sparse is not None:
                    held = two.sparse_held[sparse.indices].clamp_min(1e-30)
                    t.index_add_(0, sparse.indices, sparse.values.float() * (w * c) / held)
                out[name] = t.view(shape)
                continue
            _, where = self._at(name, p)
            held = self.sums[name][2][where].clamp_min(1e-30)
            if isinstance(p, Sparse):
                out[name] = Sparse(p.indices, p.values.float() * (w * c) / held)
            else:
                out[name] = (p.float().reshape(-1) * (w * c) / held).view(shape)
        return out


MERGES = {"sum": merge, "mean": merge_mean}
"""Merge rules by the name `mechanism.merge` gives (part of the protocol: every node must agree)."""


def _intersect(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Common values of two sorted unique index tensors and where each holds them."""
    if x.numel() == 0 or y.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty, empty
    pos = torch.searchsorted(y, x).clamp_max(y.numel() - 1)
    hit = y[pos] == x
    return x[hit], hit.nonzero().reshape(-1), pos[hit]


def _dot(a: Part, b: Part) -> float:
    """Dot product of two parts; positions only one of them holds contribute nothing."""
    if isinstance(a, Sparse) and isinstance(b, Sparse):
        _, ia, ib = _intersect(a.indices, b.indices)
        return float((a.values[ia].double() * b.values[ib].double()).sum())
    if isinstance(a, Sparse):
        return float((a.values.double() * full(b).reshape(-1)[a.indices].double()).sum())
    if isinstance(b, Sparse):
        return _dot(b, a)
    return float((full(a).reshape(-1).double() * full(b).reshape(-1).double()).sum())


def _square(p: Part) -> float:
    values = p.values if isinstance(p, Sparse) else full(p)
    return float(values.double().square().sum())


def _screened(delta: Delta) -> Delta:
    """What the copy screen compares: a `Mixed` part's sparse values, every other part whole."""
    return {name: p.sparse if isinstance(p, Mixed) else p for name, p in delta.items()}


def low_rank_part(delta: Delta) -> Delta:
    """The dense parts of a delta's `Mixed` parts (lowrank: the factors' product); empty otherwise."""
    return {name: p.dense for name, p in delta.items() if isinstance(p, Mixed)}


def low_rank_similarity(a: Delta, b: Delta) -> float:
    """Cosine between two deltas' low-rank parts (0 if either has none). Honest lowrank deltas of one
    window: 0.24-0.76 on `tiny`; a copy of one's low-rank part re-encoded with its own top-k: 1.0.
    The copy screen groups pairs at `mechanism.low_rank_copy_threshold` (evaluator.drop_copies)."""
    return similarity(low_rank_part(a), low_rank_part(b))


def similarity(a: Delta, b: Delta) -> float:
    """Cosine between two deltas as whole vectors (a position one delta does not hold is 0 there).

    The validator groups deltas whose similarity reaches `copy_threshold` (evaluator.drop_copies). The
    cosine over the shared positions only is no test of copying: honest top-k deltas of one window
    agree in sign and size where their supports meet (measured on `tiny`: 0.99 over the ~10% of
    positions they share, 0.09-0.16 as whole vectors, 1.0 for a copy).

    Of a `Mixed` part only the sparse values count (`_screened`): the low-rank parts of honest
    deltas of one window share the direction of the common gradient (cosine 0.5-0.77 on `tiny`,
    against the 0.8 threshold), their top-k residuals are as far apart as topk2 deltas. A copier
    that keeps someone's low-rank part and sends its own sparse values passes this screen; the
    second screen (`low_rank_similarity`) catches it.
    """
    a, b = _screened(a), _screened(b)
    dot = sum(_dot(a[name], b[name]) for name in a.keys() & b.keys())
    na = sum(_square(p) for p in a.values())
    nb = sum(_square(p) for p in b.values())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / math.sqrt(na * nb)


SKETCH_WIDTH = 1 << 16
_P = (1 << 31) - 1  # a prime: (i mod P) * A stays below 2**62, no int64 overflow


def sketch(delta: Delta, shapes: Shapes, width: int = SKETCH_WIDTH, low_rank: bool = False) -> Tensor:
    """A count-sketch of the delta as one flat vector, unit length: the dot product of two sketches
    estimates their `similarity` to about sqrt(2 / width) (0.006 at the default).

    Comparing every pair of 255 deltas exactly costs 32k sparse intersections (about 17 minutes on
    `tiny` shapes); one matrix product of sketches finds the few pairs worth an exact look. It
    sketches what `similarity` compares (`_screened`), or with `low_rank` what `low_rank_similarity`
    does."""
    out = torch.zeros(width, dtype=torch.float64)
    offset = 0
    offsets = {}
    for name in sorted(shapes):
        offsets[name] = offset
        offset += numel(tuple(shapes[name]))
    for name, part in (low_rank_part(delta) if low_rank else _screened(delta)).items():
        if isinstance(part, Sparse):
            idx, values = part.indices + offsets[name], part.values
        else:
            values = full(part).reshape(-1)
            idx = torch.arange(values.numel(), dtype=torch.int64) + offsets[name]
        mixed = idx % _P
        bucket = (mixed * 1_000_003) % _P % width
        sign = ((mixed * 998_244_353) % _P % 2) * 2 - 1
        out.index_add_(0, bucket, values.double() * sign)
    norm = float(out.norm())  # the sketch's own norm: a delta's sketch against itself gives 1 exactly
    return out / norm if norm > 0 else out
