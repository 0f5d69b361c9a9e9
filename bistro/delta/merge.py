"""Combine many decoded deltas into one update: the merge rules (docs/design.md, step 4) and
the median-norm clip they share.

Every rule is a `Merge`: built from a window's deltas, their merge weights and (optionally) their
norms, it holds the `update` and answers what the validator's leave-one-out needs of it, each
delta's `share` (per unit of which it is scored) and its own `term` (what taking it out of θ_eval
removes; the terms add up to the update). Clipping to the median norm happens inside.

    sum    Σ w_i c_i Δ_i (`SumMerge`, over `merge`)
    mean   per index, the weighted mean of the deltas that hold it, each first clipped to the median
           norm (`MeanMerge`, over `merge_mean`: the default)

Both hold what the wire holds (`_Parts`): sparse values summed on the sorted union of their
positions, lowrank's low-rank parts as their factors stacked along the rank axis (`Factored`, the
weights folded into P̃), so a lowrank window is merged without a parameter-sized tensor; the update
is materialised only when applied to a parameter (`apply.add_`), one block of rows at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..threads import map_threads
from .apply import delta_norm, scaled
from .codec import Delta, Factored, Mixed, Part, Shapes, Sparse, numel

T = TypeVar("T")


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


class _Parts:
    """One parameter's parts across a window's deltas, held as the wire holds them, fed one delta
    at a time in the deltas' order (every node's order): the sparse parts' sums on the sorted union
    of their positions (memory of the union's size, not the parameter's), the low-rank parts'
    factors (P times w c, stacked later along the rank axis), and only where a plain dense part
    comes (the `dense` codec) a dense Σ w c v.

    Sparse parts wait in `pending` until they hold as many entries as the union so far, then fold
    into it (one sort of the concatenated positions; `index_add_` adds in order, so every position
    sums its values in the deltas' order, whatever the folding schedule): at most about twice the
    union is held, and the sorts cost O(entries · log) in all. Once the union and the waiting parts
    reach `DENSE_AT` of the parameter (many senders: 256 deltas of 32 in 4096 cover 86% of it), a
    position costs less as a dense slot (Σ w c v, Σ w, held-or-not: 9 bytes) than as a union entry
    (16 and the sort), and the sums go on densely, with the same bits."""

    FOLD_MIN = 1 << 20
    """Pending entries below which no fold happens."""
    DENSE_AT = 0.5
    """Share of the parameter the union and waiting entries reach before the sums go dense."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.at = torch.empty(0, dtype=torch.int64)  # the union so far, sorted
        self.total = torch.empty(0)  # Σ w c v there
        self.held = torch.empty(0)  # Σ w there
        self.pending: list[tuple[Tensor, Tensor, float]] = []  # (positions, w c v, w) not folded yet
        self.waiting = 0
        self.p: list[Tensor] = []  # P_i w_i c_i
        self.q: list[Tensor] = []
        self.dense: Tensor | None = None  # Σ w c v of plain dense parts
        self.dense_held = 0.0  # Σ w over the deltas with a low-rank or dense part
        self.slots: tuple[Tensor, Tensor, Tensor] | None = None  # dense Σ w c v, Σ w, held-or-not

    def add(self, p: Part, w: float, c: float) -> None:
        low, dense, sparse = _split(p)
        if sparse is not None and self.slots is not None:
            total, held, touched = self.slots
            total.index_add_(0, sparse.indices, sparse.values.float() * (w * c))
            held.index_add_(0, sparse.indices, torch.full((sparse.indices.numel(),), w))
            touched[sparse.indices] = True
        elif sparse is not None:
            self.pending.append((sparse.indices, sparse.values.float() * (w * c), w))
            self.waiting += sparse.indices.numel()
            if self.at.numel() + self.waiting >= self.DENSE_AT * self.size:
                self._to_slots()
            elif self.waiting >= max(self.FOLD_MIN, self.at.numel()):
                self._fold()
        if low is not None:
            self.p.append(low.p.float() * (w * c))
            self.q.append(low.q.float())
        if dense is not None:
            self.dense = torch.zeros(self.size) if self.dense is None else self.dense
            self.dense.add_(dense.float().reshape(-1), alpha=w * c)
        if low is not None or dense is not None:
            self.dense_held += w

    def _fold(self) -> None:
        if not self.pending:
            return
        counts = torch.tensor([self.at.numel()] + [i.numel() for i, _, _ in self.pending])
        union, where = torch.unique(torch.cat([self.at] + [i for i, _, _ in self.pending]), sorted=True,
                                    return_inverse=True)  # fmt: skip
        total = torch.zeros(union.numel()).index_add_(
            0, where, torch.cat([self.total] + [v for _, v, _ in self.pending])
        )
        weights = torch.repeat_interleave(torch.tensor([0.0] + [w for _, _, w in self.pending]), counts)
        weights[: self.at.numel()] = self.held
        self.held = torch.zeros(union.numel()).index_add_(0, where, weights)
        self.at, self.total, self.pending, self.waiting = union, total, [], 0

    def _to_slots(self) -> None:
        """Go on with dense sums: the folded ones scattered into them (partial sums, so the bits
        are those the union would have given)."""
        self._fold()
        total, held = torch.zeros(self.size), torch.zeros(self.size)
        touched = torch.zeros(self.size, dtype=torch.bool)
        total[self.at], held[self.at], touched[self.at] = self.total, self.held, True
        self.slots = (total, held, touched)
        self.at, self.total, self.held = torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0)

    def union(self) -> tuple[Tensor, Tensor, Tensor]:
        """(the sorted positions some sparse part holds, Σ w c v and Σ w at each)."""
        if self.slots is not None:
            total, held, touched = self.slots
            at = touched.nonzero().reshape(-1)
            self.at, self.total, self.held, self.slots = at, total[at], held[at], None
        self._fold()
        return self.at, self.total, self.held

    def stacked(self) -> Factored:
        """The low-rank parts' weighted sum: their factors stacked in the deltas' order."""
        low = Factored(torch.cat(self.p, dim=1), torch.cat(self.q, dim=1))
        self.p, self.q = [], []
        return low


def _parts(deltas: Sequence[Delta], weights: Sequence[float], clip: Sequence[float], shapes: Shapes) -> dict[str, _Parts]:  # fmt: skip
    """`_Parts` of every parameter some delta holds: one pass over `deltas`, delta by delta, so a
    streamed `deltas` (the validator's `stream_deltas`) never holds more than one decoded."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    parts: dict[str, _Parts] = {}
    for d, w, c in zip(deltas, weights, clip, strict=True):
        for name, p in d.items():
            if name not in parts:
                parts[name] = _Parts(numel(shapes[name]))
            parts[name].add(p, float(w), c)
    return parts


def _per_parameter(
    deltas: Sequence[Delta],
    weights: Sequence[float],
    clip: Sequence[float],
    shapes: Shapes,
    finish: Callable[[str, _Parts], T],
    threads: int,
) -> dict[str, T]:
    """`finish(name, parts)` of every parameter some delta holds, in `shapes`' order. With one
    thread, `_parts`' pass delta by delta (streamed deltas are read once); with more, `deltas` are
    read once into a list (the caller holds them decoded) and each parameter's sums are taken on a
    thread of its own, every delta added in the deltas' order as one thread adds them: the same
    bits at any count."""
    if threads <= 1:
        parts = _parts(deltas, weights, clip, shapes)
        return {name: finish(name, parts.pop(name)) for name in shapes if name in parts}
    held = list(deltas)
    if len(held) != len(weights):
        raise ValueError(f"{len(held)} deltas but {len(weights)} weights")
    names = [name for name in shapes if any(name in d for d in held)]

    def one(name: str) -> T:
        s = _Parts(numel(shapes[name]))
        for d, w, c in zip(held, weights, clip, strict=True):
            if name in d:
                s.add(d[name], float(w), c)
        return finish(name, s)

    return dict(zip(names, map_threads(one, names, threads), strict=True))


def _dense_of(low: Factored | None, dense: Tensor | None, sparse: Sparse, size: int) -> Tensor:
    """One flat dense tensor of a parameter's low-rank, dense and sparse sums (only where a plain
    dense part came: the `dense` codec beside another)."""
    out = torch.zeros(size) if dense is None else dense
    if low is not None:
        low.add_to(out.view(low.shape))
    return out.index_add_(0, sparse.indices, sparse.values)


def merge(deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes, threads: int = 1) -> Delta:
    """Σ w_i Δ_i: sparse parts summed on the union of their positions, low-rank parts as their
    factors stacked along the rank axis (P_i w_i, Q_i), so neither is ever dense; a parameter some
    delta holds plain dense is one dense sum."""

    def finish(name: str, s: _Parts) -> Part:
        union, total, _ = s.union()
        sparse, low = Sparse(union, total), s.stacked() if s.p else None
        if s.dense is not None:
            return _dense_of(low, s.dense, sparse, s.size).view(shapes[name])
        return sparse if low is None else Mixed(low, sparse)

    return _per_parameter(deltas, weights, [1.0] * len(weights), shapes, finish, threads)


def merge_mean(
    deltas: Sequence[Delta], weights: Sequence[float], shapes: Shapes, norms: Sequence[float] | None = None
) -> Delta:
    """Per index, the `weights`-weighted mean of the values of the deltas that hold it (a dense or
    low-rank part holds every index), each delta first scaled down to the median norm (templar's
    merge): `MeanMerge`'s update.

    `merge` divides a coordinate only one of N barely overlapping top-k deltas holds by about N; this
    keeps it. The median is the lower one (torch.median's) so every node takes the same. `norms`,
    when given, are the deltas' `delta_norm`s (the validator has them from `decode_delta`): without
    them a first pass over `deltas` computes them; the sums take one more."""
    return MeanMerge(deltas, weights, shapes, norms).update


def _split(p: Part) -> tuple[Factored | None, Tensor | None, Sparse | None]:
    """A part's low-rank, plain dense and sparse pieces (any may be absent)."""
    if isinstance(p, Mixed):
        return p.low, None, p.sparse
    if isinstance(p, Factored):
        return p, None, None
    return (None, None, p) if isinstance(p, Sparse) else (None, p, None)


class _Mean(NamedTuple):
    """One parameter of `MeanMerge`, what `share` and `term` need: Σ w at the update's positions
    `at` (None: every position, dense), and for a parameter some delta holds low-rank (`two`) the
    Σ w of the deltas whose low-rank part is in the low-rank mean."""

    at: Tensor | None
    held: Tensor
    two: bool = False
    low_held: float = 0.0

    def held_at(self, indices: Tensor) -> Tensor:
        return self.held[indices if self.at is None else torch.searchsorted(self.at, indices)]

    def low_scale(self) -> float:
        """1 / Σ w of the low-rank (or dense) parts' mean (0 when nobody's weight is in it)."""
        return 1.0 / self.low_held if self.low_held > 1e-12 else 0.0


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
        device: torch.device | str | None = None,
        threads: int = 1,
    ) -> None:
        self.deltas, self.shapes = deltas, shapes
        clip = deltas_clip(deltas, norms)
        self.weights = [float(w) * c for w, c in zip(weights, clip, strict=True)]
        self.update: Delta = merge(deltas, self.weights, shapes, threads)

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
        device: torch.device | str | None = None,
        threads: int = 1,
    ) -> None:
        self.deltas, self.weights, self.shapes = deltas, [float(w) for w in weights], shapes
        self.device = device
        """Where `share` materialises a low-rank part block by block (the model's device)."""
        self.clip = deltas_clip(deltas, norms)
        done = _per_parameter(
            deltas, self.weights, self.clip, shapes, lambda name, s: self._mean(s, shapes[name]), threads
        )
        self.update: Delta = {name: part for name, (_, part) in done.items()}
        self.means: dict[str, _Mean] = {name: mean for name, (mean, _) in done.items()}
        """Per parameter: Σ w where the update's values are means (O(union) when sparse)."""

    @staticmethod
    def _mean(s: _Parts, shape: tuple[int, ...]) -> tuple[_Mean, Part]:
        """A parameter's `_Mean` and its part of the update. Three kinds: sparse (every part is
        sparse: the mean per index over the union), two (some part is low-rank: its mean over every
        sender with one, P̃ Q̃ᵀ with the weights w_i c_i / Σ w folded into P̃, plus the sparse values'
        mean per index over their senders), dense (a plain dense part holds every index: one mean
        per index over everything, dense)."""
        union, total, held = s.union()
        if s.p:  # two
            mean = _Mean(union, held, two=True, low_held=s.dense_held)
            sparse = Sparse(union, torch.where(held > 1e-12, total / held.clamp_min(1e-30), 0.0))
            stacked = s.stacked()  # P_i w_i c_i, Q_i along the rank axis
            low = Factored(stacked.p / s.dense_held, stacked.q) if mean.low_scale() else stacked.scaled(0.0)
            if s.dense is None:
                return mean, Mixed(low, sparse)
            return mean, _dense_of(low, s.dense * mean.low_scale(), sparse, s.size).view(shape)
        if s.dense is None:  # sparse
            return _Mean(union, held), Sparse(union, total / held)
        total_d = s.dense.index_add_(0, union, total)  # dense
        held_d = torch.full((s.size,), s.dense_held).index_add_(0, union, held)
        return _Mean(None, held_d), torch.where(held_d > 0, total_d / held_d.clamp_min(1e-30), 0.0).view(
            shape
        )

    def share(self, i: int, delta: Delta | None = None) -> float:
        """How much of delta i the update holds: the mean, over i's positions weighted by |value|, of
        its share w_i / Σ w of the means there, times its clipping factor. 1 for an unclipped delta
        that no other overlaps; w_i (normalised) where every delta holds every position, which is
        what the weighted sum gives it. The validator scores per unit of this, as per unit of m_i.
        A low-rank part's |values| are summed block by block (`Factored.abs_sum`).
        `delta`: delta i, if the caller holds it (else it is read from `deltas`)."""
        w, c = self.weights[i], self.clip[i]
        mass = taken = 0.0
        for name, p in (self.deltas[i] if delta is None else delta).items():
            mean = self.means[name]
            low, dense, sparse = _split(p)
            whole = low.abs_sum(self.device) if low is not None else 0.0
            if dense is not None and mean.two:
                whole += float(dense.float().abs().double().sum())
            mass, taken = mass + whole, taken + whole * w / max(mean.low_held, 1e-30)
            if dense is not None and not mean.two:
                size = dense.float().reshape(-1).abs().double()
                mass += float(size.sum())
                taken += float((size * (w / mean.held.double().clamp_min(1e-30))).sum())
            if sparse is not None:
                size = sparse.values.float().abs().double()
                held = mean.held_at(sparse.indices).double().clamp_min(1e-30)
                mass, taken = mass + float(size.sum()), taken + float((size * (w / held)).sum())
        return c * taken / mass if mass > 0 else c

    def term(self, i: int, delta: Delta | None = None) -> Delta:
        """Delta i's own term in the update: at each position it sends, its value times its share
        w_i c_i / Σ w of the mean there, every denominator kept. `θ_eval − term(i)` is "θ_eval
        without uid i" as the validator scores it (docs/design.md, mechanism step 5) for a merge
        that is not a weighted sum: what i's *values* put into θ_eval, and nothing else. Its low-rank
        part stays its own rank-r factors, scaled (the same bits as its slice of the update's P̃).

        Not the mean of the others: taking i out of a mean also un-dilutes
        everyone else's values there, and that is not i's work. A freeloader's all-zero upload sits
        in every dense mean (a low-rank part is everyone's), so the mean of the others scaled the
        whole update up by 1 / (1 − its weight); where the update overshot, that "help" paid it:
        its summed incentive beat an honest miner's in a 6-window localnet. Its term is exactly 0, so its help is exactly 0. `delta` as for `share`."""
        out: Delta = {}
        w, c = self.weights[i], self.clip[i]
        for name, p in (self.deltas[i] if delta is None else delta).items():
            mean, shape = self.means[name], self.shapes[name]
            low, dense, sparse = _split(p)
            if sparse is not None:
                sparse = Sparse(
                    sparse.indices,
                    sparse.values.float() * (w * c) / mean.held_at(sparse.indices).clamp_min(1e-30),
                )
            if low is not None:
                low = (
                    Factored(low.p.float() * (w * c) / mean.low_held, low.q.float())
                    if mean.low_scale()
                    else low.scaled(0.0)
                )
            if dense is not None:
                scale = (w * c) * mean.low_scale() if mean.two else None
                dense = (
                    dense.float().reshape(-1) * scale
                    if scale is not None
                    else dense.float().reshape(-1) * (w * c) / mean.held.clamp_min(1e-30)
                )
                out[name] = (
                    dense if sparse is None else dense.index_add_(0, sparse.indices, sparse.values)
                ).view(shape)
            elif low is not None:
                out[name] = low if sparse is None else Mixed(low, sparse)
            else:
                out[name] = sparse
        return out


MERGES: dict[str, type[SumMerge] | type[MeanMerge]] = {r.name: r for r in (SumMerge, MeanMerge)}
"""Merge rules by the name `mechanism.merge` gives (part of the protocol: every node must agree)."""
