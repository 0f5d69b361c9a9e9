"""What every codec shares: the decoded parts (`Sparse`, `Mixed`, `Delta`), the window's
`CodecContext`, the abstract `Codec`, and turning parts back into dense tensors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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


class Mixed(NamedTuple):
    """One parameter's dense part plus a sparse part (`lowrank`: the factors' product, then the top-k
    of what they leave). `merge_mean` takes two means of it: the dense part over every sender, the
    sparse part per index over the deltas that hold that index, as for `Sparse`."""

    dense: Tensor
    sparse: Sparse

    def full(self) -> Tensor:
        """dense + sparse, as one new tensor."""
        out = self.dense.float().clone()
        out.view(-1).index_add_(0, self.sparse.indices.to(out.device), self.sparse.values.to(out.device))
        return out


Part = Tensor | Sparse | Mixed


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


def full(part: Tensor | Mixed) -> Tensor:
    """A part that holds every position, as one tensor."""
    return part.full() if isinstance(part, Mixed) else part
