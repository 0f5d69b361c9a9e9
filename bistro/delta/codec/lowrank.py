"""`lowrank`: rank-r factors of every matrix (int8 codes, an fp32 scale a factor), then `topk2` of
what the factors leave; a 2-D part decodes to `Mixed` (the dequantized factors and the sparse values)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    LOW_RANK_ITERATIONS,
    BadTensors,
    CodecContext,
    Delta,
    Factored,
    Mixed,
    NonFiniteValues,
    Shapes,
    WireSpec,
    numel,
)
from .topk2 import TopK2


def low_rank(t: Tensor, rank: int, iterations: int = LOW_RANK_ITERATIONS) -> tuple[Tensor, Tensor]:
    """P [m, rank], Q [n, rank] with P Qᵀ close to the best rank-`rank` approximation of `t` [m, n]:
    subspace iteration from a fixed start (the same every call: no global RNG is touched)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(t.shape[1], rank, generator=g).to(t)
    u = t @ v
    for _ in range(iterations):
        u = torch.linalg.qr(t @ (t.T @ u)).Q
    q = t.T @ u  # [n, rank]: t ≈ u qᵀ, u orthonormal
    size = q.norm(dim=0).clamp_min(1e-30).sqrt()  # balance the two factors' ranges
    return u * size, q / size


def _q8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each column as int8 codes and one fp32 scale (absmax / 127)."""
    scale = x.abs().amax(dim=0) / 127.0
    q = torch.where(scale > 0, x / scale.clamp_min(1e-38), 0.0).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class LowRank(TopK2):
    """Rank-r factors of every 2-D parameter, then `topk2` of what the factors leave.

    Adam's delta over a few steps is close to low-rank and nearly flat in magnitude (on `tiny`,
    window 1: the best rank-1 approximation of each matrix holds 62% of the delta's energy, the 64
    largest of every 4096 entries 4.8%), so a top-k codec alone sends a small part of early progress.
    Per 2-D parameter [m, n] the record is r·m int8 codes of P, r·n of Q, r fp32 scales of each
    (little-endian bytes), then the `topk2` records of Δ − P Qᵀ; other parameters are `topk2` only.
    A 2-D parameter decodes to `Mixed`: the dequantized factors as `Factored` (materialised only as
    Σ_j outer(p_j, q_j) in a fixed order, elementwise, so every node gets the same bits) and the
    sparse values."""

    name = "lowrank"

    def params(self, ctx: CodecContext) -> dict:
        return {**super().params(ctx), "rank": ctx.rank}

    def factor_bytes(self, shape: tuple[int, ...], ctx: CodecContext) -> int:
        return ctx.rank * (shape[0] + shape[1] + 8) if len(shape) == 2 else 0

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        record = self.layout(ctx).record
        return {
            name: (((-(-numel(s) // ctx.chunk)) * record + self.factor_bytes(s, ctx),), torch.uint8)
            for name, s in shapes.items()
        }

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        out = {}
        for name, t in delta.items():
            t = t.detach().to("cpu", torch.float32)
            if t.dim() != 2:
                out[name] = self.records(t, ctx)
                continue
            p, q = low_rank(t, ctx.rank)
            (pc, ps), (qc, qs) = _q8(p), _q8(q)
            factors = torch.cat([pc.T.reshape(-1).view(torch.uint8), qc.T.reshape(-1).view(torch.uint8),
                                 torch.cat([ps, qs]).view(torch.uint8)])  # fmt: skip
            rest = t - _product(pc, ps, qc, qs)
            out[name] = torch.cat([factors, self.records(rest, ctx)]).contiguous()
        return out

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        r, delta = ctx.rank, {}
        for name, shape in shapes.items():
            head = self.factor_bytes(shape, ctx)
            raw = tensors[name]
            sparse = self.sparse(raw[head:], ctx, shape, name)
            if not head:
                delta[name] = sparse
                continue
            m, n = shape
            pc = raw[: r * m].clone().view(torch.int8).view(r, m).T
            qc = raw[r * m : r * (m + n)].clone().view(torch.int8).view(r, n).T
            scales = raw[r * (m + n) : head].clone().view(torch.float32)
            if not bool(torch.isfinite(scales).all()):
                raise NonFiniteValues(f"{name}: factor scales must be finite")
            if bool((scales < 0).any()):
                raise BadTensors(f"{name}: factor scales must be >= 0")
            delta[name] = Mixed(_factors(pc, scales[:r], qc, scales[r:]), sparse)
        return delta


def _factors(pc: Tensor, ps: Tensor, qc: Tensor, qs: Tensor) -> Factored:
    """The dequantized factors: code times its column's scale, fp32."""
    return Factored(pc.float() * ps, qc.float() * qs)


def _product(pc: Tensor, ps: Tensor, qc: Tensor, qs: Tensor) -> Tensor:
    """Σ_j outer(p_j, q_j) of dequantized factors, one rank at a time (bit-identical everywhere)."""
    return _factors(pc, ps, qc, qs).full()
