"""What every codec shares: the decoded parts (`Sparse`, `Factored`, `Mixed`, `Delta`), the window's
`CodecContext`, the abstract `Codec`, and turning parts back into dense tensors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ...config import Settings


MAX_RANK = 8
"""Most factors `lowrank` sends a matrix."""


LOW_RANK_ITERATIONS = 3
"""Subspace iterations of `low_rank` (the miner's cost only; decoding reads the factors)."""

Shapes = dict[str, tuple[int, ...]]


WireSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Sparse(NamedTuple):
    """A sparse part of a delta: flat positions (sorted, unique, int64) and their fp32 values."""

    indices: Tensor
    values: Tensor


BLOCK = 1 << 22
"""Entries of one block a `Factored` product is materialised in (16 MiB of fp32)."""


class Factored(NamedTuple):
    """A low-rank matrix P Qᵀ held as its fp32 factors P [m, r], Q [n, r] (`lowrank`'s factors,
    dequantized; a merge's, stacked along the rank axis).

    It is materialised only by `full` / `add_to`: Σ_j outer(p_j, q_j), one rank at a time in the
    factors' order, elementwise fp32 (no matrix product, whose summation order is the BLAS's), so
    every node gets the same bits, and block by block, so adding it to a parameter never holds more
    than one block. Norms and dot products come from the factors' Gram matrices."""

    p: Tensor
    q: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.p.shape[0], self.q.shape[0])

    @property
    def rank(self) -> int:
        return self.p.shape[1]

    def blocks(self, device: torch.device | str | None = None) -> Iterator[tuple[slice, Tensor]]:
        """(rows, the product's values at those rows), block by block."""
        p, q = self.p.to(device or self.p.device), self.q.to(device or self.p.device)
        m, n = self.shape
        step = max(1, BLOCK // max(n, 1))
        tmp = torch.empty(0, device=p.device)
        for start in range(0, m, step):
            rows = slice(start, min(m, start + step))
            out = torch.zeros(rows.stop - start, n, device=p.device)
            tmp = tmp.new_empty(out.shape) if tmp.shape != out.shape else tmp
            for j in range(self.rank):
                torch.mul(p[rows, j, None], q[None, :, j], out=tmp)  # outer(p_j, q_j) at these rows
                out += tmp
            yield rows, out

    def full(self) -> Tensor:
        """P Qᵀ as one new fp32 [m, n] tensor."""
        out = torch.empty(self.shape, device=self.p.device)
        for rows, block in self.blocks():
            out[rows] = block
        return out

    def add_to(self, target: Tensor, alpha: float = 1.0) -> None:
        """target [m, n] += alpha · P Qᵀ, in place, one block at a time (the same bits as adding
        `full()`)."""
        for rows, block in self.blocks(target.device):
            target[rows].add_(block.to(target.dtype), alpha=alpha)

    def at(self, indices: Tensor) -> Tensor:
        """The product's values at flat positions `indices` (the same bits as `full()` there)."""
        n = self.shape[1]
        rows, cols = indices // n, indices % n
        out = torch.zeros(indices.numel(), device=self.p.device)
        for j in range(self.rank):
            out += self.p[rows, j] * self.q[cols, j]
        return out

    def scaled(self, factor: float) -> Factored:
        """factor · P Qᵀ (the factor folded into P)."""
        return Factored(self.p * factor, self.q)

    def dot(self, other: Factored) -> float:
        """<P1 Q1ᵀ, P2 Q2ᵀ> = Σ (P1ᵀ P2) ⊙ (Q1ᵀ Q2), in float64, without the matrices."""
        return float(((self.p.double().T @ other.p.double()) * (self.q.double().T @ other.q.double())).sum())

    def square(self) -> float:
        """‖P Qᵀ‖², from the Gram matrices."""
        return max(0.0, self.dot(self))

    def abs_sum(self, device: torch.device | str | None = None) -> float:
        """Σ |P Qᵀ|, block by block (fp32 sums of rows, float64 over them), on `device` (the
        factors' own by default; the validator's model's, where parameter-sized work belongs)."""
        return sum(float(block.abs_().sum(dim=1).double().sum()) for _, block in self.blocks(device))

    def finite(self) -> bool:
        return bool(torch.isfinite(self.p).all()) and bool(torch.isfinite(self.q).all())


class Mixed(NamedTuple):
    """One matrix's low-rank part, held as its factors, plus a sparse part (`lowrank`: the factors,
    then the top-k of what they leave). The mean merge takes two means of it: the low-rank part over
    every sender (every one holds every position), the sparse part per index over the deltas that
    hold that index, as for `Sparse`."""

    low: Factored
    sparse: Sparse

    @property
    def dense(self) -> Tensor:
        """The low-rank part materialised (`Factored.full`)."""
        return self.low.full()

    def full(self) -> Tensor:
        """low-rank part + sparse part, as one new tensor."""
        out = self.low.full()
        out.view(-1).index_add_(0, self.sparse.indices.to(out.device), self.sparse.values.to(out.device))
        return out


Part = Tensor | Sparse | Mixed | Factored


Delta = dict[str, Part]


class BadTensors(ValueError):
    """The wire tensors are not exactly what the codec promises for these shapes."""


class NonFiniteValues(BadTensors):
    """Values packed inside integer wire tensors (topk2's bf16 bin means) hold NaN or Inf: the
    `non_finite` reason, as for a float tensor, not a malformed layout."""


@dataclass(frozen=True)
class CodecContext:
    """Everything a codec needs besides the tensors; the same on every node for a window."""

    netuid: int
    window: int
    compression: float
    chunk: int = 4096
    value_bits: int = 2
    """Bits a value for `topk2`."""
    rank: int = 1
    """Factors a 2-D parameter for `lowrank`."""
    ef_decay: float = 1.0
    """Error feedback as momentum (SparseLoCo): e <- ef_decay * e + delta before the codec; 1 is plain
    error feedback. A miner's choice, never on the wire."""

    def __post_init__(self) -> None:
        if not (isinstance(self.compression, (int, float)) and self.compression >= 1):
            raise ValueError(f"compression must be >= 1, got {self.compression!r}")
        if not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"chunk must be a positive int, got {self.chunk!r}")
        if self.value_bits not in (1, 2, 3, 4):
            raise ValueError(f"value_bits must be 1, 2, 3 or 4, got {self.value_bits!r}")
        if not 0 < self.ef_decay <= 1:
            raise ValueError(f"ef_decay must be in (0, 1], got {self.ef_decay!r}")
        if not (isinstance(self.rank, int) and 1 <= self.rank <= MAX_RANK):
            raise ValueError(f"rank must be an int in [1, {MAX_RANK}], got {self.rank!r}")


def codec_context(settings: Settings, window: int) -> CodecContext:
    """The codec context every node uses for `window` under `settings`."""
    m = settings.mechanism
    return CodecContext(
        netuid=settings.chain.netuid, window=window, compression=m.compression, chunk=m.topk_chunk,
        value_bits=m.value_bits, rank=m.rank, ef_decay=m.ef_decay,
    )  # fmt: skip


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class Codec(ABC):
    """Turns a delta into wire tensors and back; promises the wire layout in advance."""

    name: ClassVar[str]  # written into the delta's metadata

    @abstractmethod
    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        """Wire tensors (CPU, contiguous) for an fp32 delta."""

    @abstractmethod
    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        """The delta the wire tensors stand for; raises `BadTensors` for anything not promised."""

    @abstractmethod
    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        """Exact names, shapes and dtypes of the wire tensors for a model's shapes."""

    def params(self, ctx: CodecContext) -> dict:
        """The codec parameters written into (and checked against) the delta's metadata."""
        return {}

    def ratio(self, shapes: Shapes, ctx: CodecContext) -> float:
        """Dense fp32 bytes / wire bytes."""
        dense = sum(4 * numel(s) for s in shapes.values())
        wire = sum(numel(s) * dt.itemsize for s, dt in self.wire_spec(shapes, ctx).values())
        return dense / wire

    def check(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> None:
        """Raise `BadTensors` unless names, shapes and dtypes match `wire_spec` exactly."""
        spec = self.wire_spec(shapes, ctx)
        if set(tensors) != set(spec):
            missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
            raise BadTensors(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, (shape, dtype) in spec.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise BadTensors(f"{name}: {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")


def densify(delta: Delta, shapes: Shapes) -> dict[str, Tensor]:
    """Dense fp32 tensors of a decoded delta (zeros where a sparse part has no value)."""
    out = {}
    for name, shape in shapes.items():
        part = delta[name]
        if isinstance(part, Sparse):
            flat = torch.zeros(numel(shape), dtype=torch.float32, device=part.values.device)
            flat[part.indices] = part.values
            out[name] = flat.view(shape)
        else:
            out[name] = full(part).float().reshape(shape)
    return out


def full(part: Tensor | Mixed | Factored) -> Tensor:
    """A part that holds every position, as one tensor."""
    return part.full() if isinstance(part, (Mixed, Factored)) else part
