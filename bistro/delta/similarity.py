"""How alike two decoded deltas are: exact cosines (`similarity`, `low_rank_similarity`) and the
count-sketch that screens many deltas for near-copies without comparing every pair densely."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .apply import _square
from .codec import Delta, Factored, Mixed, Part, Shapes, Sparse, full, numel


def _intersect(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Common values of two sorted unique index tensors and where each holds them."""
    if x.numel() == 0 or y.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty, empty
    pos = torch.searchsorted(y, x).clamp_max(y.numel() - 1)
    hit = y[pos] == x
    return x[hit], hit.nonzero().reshape(-1), pos[hit]


def _dot(a: Part, b: Part) -> float:
    """Dot product of two parts; positions only one of them holds contribute nothing. Two low-rank
    parts: from their factors' Gram matrices (`Factored.dot`), no matrix."""
    if isinstance(a, Factored) and isinstance(b, Factored):
        return a.dot(b)
    if isinstance(a, Sparse) and isinstance(b, Factored):
        return float((a.values.double() * b.at(a.indices).double()).sum())
    if isinstance(a, Sparse) and isinstance(b, Sparse):
        _, ia, ib = _intersect(a.indices, b.indices)
        return float((a.values[ia].double() * b.values[ib].double()).sum())
    if isinstance(a, Sparse):
        return float((a.values.double() * full(b).reshape(-1)[a.indices].double()).sum())
    if isinstance(b, Sparse):
        return _dot(b, a)
    return float((full(a).reshape(-1).double() * full(b).reshape(-1).double()).sum())


def _screened(delta: Delta) -> Delta:
    """What the copy screen compares: a `Mixed` part's sparse values, every other part whole."""
    return {name: p.sparse if isinstance(p, Mixed) else p for name, p in delta.items()}


def low_rank_part(delta: Delta) -> Delta:
    """The low-rank parts of a delta's `Mixed` parts, as their factors (`Factored`); empty otherwise."""
    return {name: p.low for name, p in delta.items() if isinstance(p, Mixed)}


def low_rank_similarity(a: Delta, b: Delta) -> float:
    """Cosine between two deltas' low-rank parts (0 if either has none), from their factors:
    <P1 Q1ᵀ, P2 Q2ᵀ> = tr((P1ᵀ P2)(Q2ᵀ Q1)), no m × n matrix. Honest lowrank deltas of one
    window: 0.24-0.76 on `tiny`; a copy of one's low-rank part re-encoded with its own top-k: 1.0.
    The copy screen groups pairs at `mechanism.low_rank_copy_threshold` (evaluator.drop_copies)."""
    return similarity(low_rank_part(a), low_rank_part(b))


def low_rank_cosines(parts: Sequence[Delta]) -> Tensor:
    """Every pair's `low_rank_similarity` at once, exactly, from `parts` (each delta's
    `low_rank_part`): per parameter, the stacked factors' Gram matrices P̃ᵀP̃ and Q̃ᵀQ̃ ([N r, N r]
    each, float64) give <P_a Q_aᵀ, P_b Q_bᵀ> for every a, b in one product, so the low-rank screen
    costs each delta's factors once, O(r (m + n)) per matrix, and no matrix is ever built (a
    count-sketch of P Qᵀ needs every position). A delta without low-rank parts has cosine 0."""
    n = len(parts)
    inner = torch.zeros(n, n, dtype=torch.float64)
    for name in sorted({name for d in parts for name in d}):
        held = [k for k, d in enumerate(parts) if name in d]
        factors = [parts[k][name] for k in held]
        r = factors[0].rank
        if any(f.rank != r for f in factors):
            raise ValueError(f"{name}: low-rank parts of different ranks")
        p = torch.cat([f.p.double() for f in factors], dim=1)
        q = torch.cat([f.q.double() for f in factors], dim=1)
        k = len(held)
        block = ((p.T @ p) * (q.T @ q)).view(k, r, k, r).sum(dim=(1, 3))
        at = torch.tensor(held)
        inner[at.unsqueeze(1), at.unsqueeze(0)] += block
    norms = inner.diagonal().clamp_min(0.0).sqrt()
    scale = norms.unsqueeze(1) * norms.unsqueeze(0)
    return torch.where(scale > 0, inner / scale.clamp_min(1e-300), torch.zeros_like(inner))


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
    does (a low-rank part materialised block by block: a count-sketch needs every position)."""
    out = torch.zeros(width, dtype=torch.float64)
    offset = 0
    offsets = {}
    for name in sorted(shapes):
        offsets[name] = offset
        offset += numel(tuple(shapes[name]))
    for name, part in (low_rank_part(delta) if low_rank else _screened(delta)).items():
        if isinstance(part, Sparse):
            _sketch_into(out, part.indices + offsets[name], part.values)
        elif isinstance(part, Factored):
            n = part.shape[1]
            for rows, block in part.blocks():
                start = offsets[name] + rows.start * n
                _sketch_into(
                    out, torch.arange(start, start + block.numel(), dtype=torch.int64), block.reshape(-1)
                )
        else:
            values = full(part).reshape(-1)
            _sketch_into(out, torch.arange(values.numel(), dtype=torch.int64) + offsets[name], values)
    norm = float(out.norm())  # the sketch's own norm: a delta's sketch against itself gives 1 exactly
    return out / norm if norm > 0 else out


def _sketch_into(out: Tensor, idx: Tensor, values: Tensor) -> None:
    """Add values at global flat positions `idx` to the count-sketch `out`."""
    mixed = idx % _P
    bucket = (mixed * 1_000_003) % _P % out.numel()
    sign = ((mixed * 998_244_353) % _P % 2) * 2 - 1
    out.index_add_(0, bucket, values.double() * sign)
