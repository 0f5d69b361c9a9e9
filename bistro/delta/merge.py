"""Combine many decoded deltas into one update: the merge rules (docs/design.md, step 4) and
the median-norm clip they share.

Every rule is a `Merge`: built from a window's deltas, their merge weights and (optionally) their
norms, it holds the `update` and answers what the validator's leave-one-out needs of it, each
delta's `share` (per unit of which it is scored) and its own `term` (what taking it out of θ_eval
removes; the terms add up to the update). Clipping to the median norm happens inside.

    sum    Σ w_i c_i Δ_i (`SumMerge`, over `merge`)
    mean   per index, the weighted mean of the deltas that hold it, each first clipped to the median
           norm (`MeanMerge`, over `merge_mean`: the default)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .apply import add_, delta_norm, scaled
from .codec import Delta, Mixed, Part, Shapes, Sparse, numel


def clip_factors(norms: Sequence[float]) -> list[float]:
    """min(1, median / ‖Δ_i‖) per delta, the median (the lower one, so every node takes the same)
    over the deltas that move anything. Zero deltas keep 1 (they move nothing) and do not count
    towards the median: with them in it, one zero upload beside one real delta made the median 0,
    the real delta's factor 0 and its share of the merge 0, and the validator divided by it."""
    moving = sorted(n for n in norms if n > 0)
    median = moving[(len(moving) - 1) // 2] if moving else 0.0
    return [min(1.0, median / n) if n > 0 else 1.0 for n in norms]


def deltas_clip(deltas: Sequence[Delta], norms: Sequence[float] | None) -> list[float]:
    """`clip_factors` of the deltas' norms: `norms` when the caller has them (`decode_delta`
    measured them), else one pass over `deltas`."""
    return clip_factors(list(norms) if norms is not None else [delta_norm(d) for d in deltas])


def clip_to_median_norm(weights: Mapping[int, float], norms: Mapping[int, float]) -> dict[int, float]:
    """Merge weights with each delta's norm clipped to the median norm of the valid set (templar
    clips peers to the median norm before merging): m_i · min(1, median / ‖Δ_i‖). One amplified
    delta then moves θ_eval no more than a typical one, so it cannot turn the pooled help that the
    own-page test divides by negative for everyone. Zero deltas keep their weight (they move nothing)."""
    uids = list(weights)
    factors = clip_factors([float(norms[uid]) for uid in uids])
    return {uid: weights[uid] * c for uid, c in zip(uids, factors, strict=True)}


def merge(deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes) -> Delta:
    """Σ w_i Δ_i; a parameter stays sparse (union of positions) when every input is sparse there.

    Delta-outer: each delta is read once, in order, into one dense fp32 sum per parameter, so a
    streamed `deltas` (the validator's `stream_deltas`) never holds more than one decoded."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    totals: dict[str, Tensor] = {}
    held: dict[str, Tensor] = {}  # positions a sparse part holds
    sparse: dict[str, bool] = {}  # every part so far is Sparse
    for d, w in zip(deltas, weights, strict=True):
        for name, p in d.items():
            if name not in totals:
                size = numel(shapes[name])
                totals[name], held[name] = torch.zeros(size), torch.zeros(size, dtype=torch.bool)
                sparse[name] = True
            add_({name: totals[name]}, {name: p}, float(w))
            if isinstance(p, Sparse):
                held[name][p.indices] = True
            else:
                sparse[name] = False
    out: Delta = {}
    for name, shape in shapes.items():
        if name in totals:
            union = held[name].nonzero().reshape(-1)
            out[name] = Sparse(union, totals[name][union]) if sparse[name] else totals[name].view(shape)
    return out


def merge_mean(
    deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes, norms: Sequence[float] | None = None
) -> Delta:
    """Per index, the `weights`-weighted mean of the values of the deltas that hold it (a dense part
    holds every index), each delta first scaled down to the median norm (templar's merge).

    `merge` divides a coordinate only one of N barely overlapping top-k deltas holds by about N; this
    keeps it. The median is the lower one (torch.median's) so every node takes the same. `norms`,
    when given, are the deltas' `delta_norm`s (the validator has them from `decode_delta`): without
    them a first pass over `deltas` computes them; the sums take one more (`mean_sums`)."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    clip = deltas_clip(deltas, norms)
    sums = mean_sums(deltas, weights, clip, shapes)
    return {name: sums[name].mean().view(shape) if sums[name].kind != "sparse" else sums[name].sparse_mean()
            for name, shape in shapes.items() if name in sums}  # fmt: skip


class _Rekind(Exception):
    """A `Mixed` part reached a parameter already summed as plain dense: sum it again as `TwoMeans`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class MeanSums:
    """One parameter's running sums for `merge_mean`, fed one delta's part at a time, in the deltas'
    order (every node's order): Σ w c v and Σ w at each position, dense fp32 of the parameter's size.

    Its kind follows the parts seen: `sparse` while every part is Sparse (the mean is over the union
    of positions), `dense` once a plain dense part came (it holds every index), `two` once a `Mixed`
    one came (`TwoMeans`: the dense parts' mean plus the sparse values' per-index mean). Sparse sums
    turn into either without a change of value: every kind adds a sparse part the same way, so the
    result is bit for bit that of summing parameter by parameter over a list (what `merge_mean` did
    before it streamed). A `Mixed` part after a plain dense one cannot be split out again: `_Rekind`
    asks `mean_sums` for a pass with the parameter `two` from the start (no codec mixes them)."""

    def __init__(self, size: int, two: bool = False) -> None:
        self.kind = "two" if two else "sparse"
        self.total, self.held = torch.zeros(size), torch.zeros(size)  # two: the sparse values' sums
        self.touched = torch.zeros(size, dtype=torch.bool)  # positions a sparse part holds
        self.dense_total: Tensor | None = torch.zeros(size) if two else None
        self.dense_held = 0.0

    def add(self, name: str, p: Part, w: float, c: float) -> None:
        if isinstance(p, Mixed) and self.kind != "two":
            if self.kind == "dense":
                raise _Rekind(name)
            self.kind, self.dense_total = "two", torch.zeros(self.total.numel())
        elif self.kind == "sparse" and not isinstance(p, Sparse):
            self.kind = "dense"
        dense, sparse = _split(p)
        if sparse is not None:
            self.total.index_add_(0, sparse.indices, sparse.values.float(), alpha=w * c)
            self.held.index_add_(0, sparse.indices, torch.full((sparse.indices.numel(),), w))
            self.touched[sparse.indices] = True
        if dense is not None and self.dense_total is not None:  # two
            self.dense_total.add_(dense.float().reshape(-1), alpha=w * c)
            self.dense_held += w
        elif dense is not None:
            self.total.add_(dense.float().reshape(-1), alpha=w * c)
            self.held.add_(w)

    def union(self) -> Tensor:
        """The sorted positions some sparse part held (kind `sparse`: the update's positions)."""
        return self.touched.nonzero().reshape(-1)

    def sparse_mean(self) -> Sparse:
        at = self.union()
        return Sparse(at, self.total[at] / self.held[at])

    def two_means(self) -> TwoMeans:
        if self.dense_total is None:
            raise ValueError("not a two-means parameter")
        return TwoMeans(self.dense_total, self.dense_held, self.total, self.held)

    def mean(self) -> Tensor:
        """Flat mean (kinds `dense` and `two`)."""
        if self.kind == "two":
            return self.two_means().mean()
        return torch.where(self.held > 0, self.total / self.held.clamp_min(1e-30), 0.0)


def mean_sums(
    deltas: Sequence[Delta], weights: Sequence[float], clip: Sequence[float], shapes: Shapes
) -> dict[str, MeanSums]:
    """`MeanSums` of every parameter some delta holds: one pass over `deltas`, delta by delta (two
    if a parameter must be summed again as `two`, see `MeanSums`)."""
    two: set[str] = set()
    while True:
        sums: dict[str, MeanSums] = {}
        try:
            for d, w, c in zip(deltas, weights, clip, strict=True):
                for name, p in d.items():
                    if name not in sums:
                        sums[name] = MeanSums(numel(shapes[name]), two=name in two)
                    sums[name].add(name, p, float(w), c)
            return sums
        except _Rekind as e:
            two.add(e.name)


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


class Merge(ABC):
    """A merge rule over one window's deltas (`deltas[i]` with merge weight `weights[i]`)."""

    name: ClassVar[str]
    update: Delta
    """The merged update: θ_eval = θ + update."""

    @abstractmethod
    def share(self, i: int, delta: Delta | None = None) -> float:
        """How much of delta i the update holds: its score is per unit of this. `delta`: delta i as
        the caller holds it (a streaming caller has it decoded in hand)."""

    @abstractmethod
    def term(self, i: int, delta: Delta | None = None) -> Delta:
        """Delta i's own part of the update: θ_eval less it is "θ_eval without uid i"."""


class SumMerge(Merge):
    """Σ w_i c_i Δ_i, c_i = `clip_factors` of the norms: one amplified delta counts at most the
    median norm. A delta's term is its own weighted values; its share, its clipped weight."""

    name = "sum"

    def __init__(
        self,
        deltas: Sequence[Delta],
        weights: Sequence[float],
        shapes: Shapes,
        norms: Sequence[float] | None = None,
    ) -> None:
        self.deltas, self.shapes = deltas, shapes
        clip = deltas_clip(deltas, norms)
        self.weights = [float(w) * c for w, c in zip(weights, clip, strict=True)]
        self.update: Delta = merge(deltas, self.weights, shapes)

    def share(self, i: int, delta: Delta | None = None) -> float:
        return self.weights[i]

    def term(self, i: int, delta: Delta | None = None) -> Delta:
        return scaled(self.deltas[i] if delta is None else delta, self.weights[i])


class MeanMerge(Merge):
    """`merge_mean` of a window's deltas, and each one's exact leave-one-out.

    "Without uid i" for a merge that is not a weighted sum: θ_eval minus i's own term, `term(i)`:
    its values times its share of each per-index mean they are in, every denominator and clipping
    factor kept, so taking one delta out never rescales the others (the terms add up to `update`).
    The validator applies it with `apply_` and comes back with `restore_`, bit for bit, as with the
    weighted sum:

        add_(params, mm.update, 1.0)                    # θ_eval
        saved = apply_(params, mm.term(i), -1.0)        # θ_eval without i
        restore_(params, saved)

    `deltas` may be a streamed sequence (each read decodes anew): it is read once for the sums
    (and once for the norms unless `norms` are given), and `share` / `term` take delta i as the
    caller has it in hand, so scoring every uid reads each delta once more, one at a time.
    """

    name = "mean"

    def __init__(
        self,
        deltas: Sequence[Delta],
        weights: Sequence[float],
        shapes: Shapes,
        norms: Sequence[float] | None = None,
    ) -> None:
        self.deltas, self.weights, self.shapes = deltas, [float(w) for w in weights], shapes
        self.clip = deltas_clip(deltas, norms)
        sums = mean_sums(deltas, self.weights, self.clip, shapes)
        self.update: Delta = {}
        # Per parameter: the update's flat positions (None: dense), and Σ w c v and Σ w over the
        # senders at each of them: O(union) for a sparse part once the pass is done.
        self.sums: dict[str, tuple[Tensor | None, Tensor, Tensor]] = {}
        self.two: dict[str, TwoMeans] = {}  # parameters some delta holds as `Mixed`
        for name, shape in shapes.items():
            s = sums.pop(name, None)
            if s is None:
                continue
            if s.kind == "two":
                self.two[name] = s.two_means()
                self.update[name] = self.two[name].mean().view(shape)
            elif s.kind == "sparse":
                self.update[name] = part = s.sparse_mean()
                self.sums[name] = (part.indices, s.total[part.indices], s.held[part.indices])
            else:
                self.update[name] = s.mean().view(shape)
                self.sums[name] = (None, s.total, s.held)

    def _at(self, name: str, p: Part) -> tuple[Tensor, Tensor]:
        """Delta part `p`'s flat positions and where they sit in `self.sums[name]`."""
        at = self.sums[name][0]
        pos = p.indices if isinstance(p, Sparse) else torch.arange(numel(self.shapes[name]))
        return pos, (pos if at is None else torch.searchsorted(at, pos))

    def share(self, i: int, delta: Delta | None = None) -> float:
        """How much of delta i the update holds: the mean, over i's positions weighted by |value|, of
        its share w_i / Σ w of the means there, times its clipping factor. 1 for an unclipped delta
        that no other overlaps; w_i (normalised) where every delta holds every position, which is
        what the weighted sum gives it. The validator scores per unit of this, as per unit of m_i.
        `delta`: delta i, if the caller holds it (else it is read from `deltas`)."""
        w, c = self.weights[i], self.clip[i]
        mass = taken = 0.0
        for name, p in (self.deltas[i] if delta is None else delta).items():
            if name in self.two:
                m, t = self.two[name].taken(p, w)
                mass, taken = mass + m, taken + t
                continue
            _, where = self._at(name, p)
            size = (p.values if isinstance(p, Sparse) else p.reshape(-1)).float().abs().double()
            mass += float(size.sum())
            taken += float((size * (w / self.sums[name][2][where].double().clamp_min(1e-30))).sum())
        return c * taken / mass if mass > 0 else c

    def term(self, i: int, delta: Delta | None = None) -> Delta:
        """Delta i's own term in the update: at each position it sends, its value times its share
        w_i c_i / Σ w of the mean there, every denominator kept. `θ_eval − term(i)` is "θ_eval
        without uid i" as the validator scores it (docs/design.md, mechanism step 5) for a merge
        that is not a weighted sum: what i's *values* put into θ_eval, and nothing else.

        Not the mean of the others: taking i out of a mean also un-dilutes
        everyone else's values there, and that is not i's work. A freeloader's all-zero upload sits
        in every dense mean (a low-rank part is everyone's), so the mean of the others scaled the
        whole update up by 1 / (1 − its weight); where the update overshot, that "help" paid it:
        its summed incentive beat an honest miner's in a 6-window localnet. Its term is exactly 0, so its help is exactly 0. `delta` as for `share`."""
        out: Delta = {}
        w, c = self.weights[i], self.clip[i]
        for name, p in (self.deltas[i] if delta is None else delta).items():
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


MERGES: dict[str, type[SumMerge] | type[MeanMerge]] = {r.name: r for r in (SumMerge, MeanMerge)}
"""Merge rules by the name `mechanism.merge` gives (part of the protocol: every node must agree)."""
