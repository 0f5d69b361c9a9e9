"""Delta codecs: what a miner's `trained - master` becomes on the wire, and back.

In the manner of hivemind's `compression/base.py`: an abstract `Codec`, a frozen `CodecContext`
describing the window, and a `CODECS` registry checked at import. Every codec also promises the
exact wire tensors (`wire_spec`) it produces for a model's shapes, so a validator can reject a blob
from its header alone, before any tensor is loaded.

- `topk` (the first default): per parameter, chunks of `ctx.chunk` entries, the k = round(chunk/compression)
  largest by magnitude per chunk; local indices sorted and packed in 12 bits (two in three bytes)
  when chunk <= 4096 (int32 otherwise); values as int8 with one fp32 scale (absmax/127) per chunk.
  fp32 scales cost ~2% of the ratio against fp16 but cannot underflow for late, tiny deltas:
  ~154x at compression 100. Pair it with `ErrorFeedback`.
- `topk2` (codec version 2 of topk, SparseLoCo-like): the same k largest per chunk, but each chunk
  is one byte record: the sorted local indices Elias–Fano coded (r = floor(log2(chunk/k)) low bits
  each, plus a bitmap of k + ceil(chunk/2^r) bits for the high parts: 8 bits an index at 64 of
  4096, against 12), `value_bits`-bit codes of 2^bits equal bins over ±3σ of the chunk's values,
  and a table of each bin's mean (bf16: fp32's range, so late tiny deltas cannot underflow). One
  uint8 tensor per parameter, so the safetensors header lists a third of topk's entries. At 64 of
  4096 and 2 bits: 88 bytes a chunk, ~186x before the header. Pair it with `ErrorFeedback`.
- `lowrank`: rank-`rank` factors of every 2-D parameter (int8 codes, an fp32 scale a factor), then
  `topk2` of what the factors leave, in one uint8 tensor a parameter (the default: rank 1 with 32 of
  4096; ~175x before the header on `tiny`). Early deltas of Adam are nearly low-rank and flat in
  magnitude, which top-k alone sends badly. A 2-D part decodes to `Mixed` (the product, dense, and
  the sparse values). Pair it with `ErrorFeedback`.
- `mask`: the same positions for every miner, drawn from a CPU generator seeded by
  (netuid, window, name); only fp32 values travel, so the ratio is `compression` exactly.
- `dense`: bf16 values of everything, for debugging and as a reference (2x).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import protocol

if TYPE_CHECKING:
    from ..config import Settings

Shapes = dict[str, tuple[int, ...]]
MAX_RANK = 8
"""Most factors `lowrank` sends a matrix."""
LOW_RANK_ITERATIONS = 3
"""Subspace iterations of `low_rank` (the miner's cost only; decoding reads the factors)."""
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


# --- topk ---------------------------------------------------------------------------------------


def pack12(idx: Tensor) -> Tensor:
    """Pack values < 4096 two to three bytes (uint8); an odd count gets one zero pad."""
    idx = idx.to(torch.int32).reshape(-1)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    a, b = idx[0::2], idx[1::2]
    out = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1)  # [pairs, 3]
    return out.to(torch.uint8).reshape(-1)


def unpack12(packed: Tensor, count: int) -> Tensor:
    """Inverse of `pack12`: `count` int64 values; raises `BadTensors` if the pad is not zero."""
    p = packed.to(torch.int64).reshape(-1, 3)
    a = p[:, 0] | ((p[:, 1] & 0xF) << 8)
    b = (p[:, 1] >> 4) | (p[:, 2] << 4)
    out = torch.stack([a, b], dim=1).reshape(-1)
    if out.numel() > count and bool((out[count:] != 0).any()):
        raise BadTensors("non-zero padding in packed indices")
    return out[:count]


class TopK(Codec):
    name = "topk"

    def k(self, ctx: CodecContext) -> int:
        return min(ctx.chunk, max(1, round(ctx.chunk / ctx.compression)))

    def params(self, ctx: CodecContext) -> dict:
        return {"compression": float(ctx.compression), "chunk": ctx.chunk}

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        spec: WireSpec = {}
        k = self.k(ctx)
        for name, shape in shapes.items():
            chunks = -(-numel(shape) // ctx.chunk)
            count = chunks * k
            if ctx.chunk <= 4096:
                spec[f"{name}.idx"] = ((3 * -(-count // 2),), torch.uint8)
            else:
                spec[f"{name}.idx"] = ((count,), torch.int32)
            spec[f"{name}.val"] = ((count,), torch.int8)
            spec[f"{name}.scale"] = ((chunks,), torch.float32)
        return spec

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        k = self.k(ctx)
        for name, t in delta.items():
            flat = t.detach().to("cpu", torch.float32).reshape(-1)
            chunks = -(-flat.numel() // ctx.chunk)
            pad = chunks * ctx.chunk - flat.numel()
            x = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(chunks, ctx.chunk)
            idx = x.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # [chunks, k]
            vals = x.gather(1, idx)
            scale = vals.abs().amax(dim=1) / 127.0  # [chunks]
            q = torch.where(scale[:, None] > 0, vals / scale[:, None].clamp_min(1e-38), 0.0)
            q = q.round().clamp(-127, 127).to(torch.int8)
            out[f"{name}.idx"] = pack12(idx) if ctx.chunk <= 4096 else idx.to(torch.int32).reshape(-1)
            out[f"{name}.val"] = q.reshape(-1)
            out[f"{name}.scale"] = scale.contiguous()
        return out

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        k, delta = self.k(ctx), {}
        for name, shape in shapes.items():
            n = numel(shape)
            chunks = -(-n // ctx.chunk)
            raw = tensors[f"{name}.idx"]
            local = unpack12(raw, chunks * k) if ctx.chunk <= 4096 else raw.to(torch.int64)
            local = local.view(chunks, k)
            if bool((local < 0).any() | (local >= ctx.chunk).any()):
                raise BadTensors(f"{name}: index outside its chunk")
            if k > 1 and bool((local[:, 1:] <= local[:, :-1]).any()):
                raise BadTensors(f"{name}: indices within a chunk not strictly increasing")
            scale = tensors[f"{name}.scale"]
            if not bool(torch.isfinite(scale).all() & (scale >= 0).all()):
                raise BadTensors(f"{name}: scales must be finite and >= 0")
            q = tensors[f"{name}.val"].view(chunks, k)
            flat = (local + torch.arange(chunks)[:, None] * ctx.chunk).reshape(-1)
            values = (q.to(torch.float32) * scale[:, None]).reshape(-1)
            real = flat < n
            if bool((q.reshape(-1)[~real] != 0).any()):
                raise BadTensors(f"{name}: non-zero value at a padding position")
            delta[name] = Sparse(flat[real], values[real])
        return delta


# --- topk2 --------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """Bit layout of one `topk2` chunk record."""

    k: int
    low: int
    """Low bits an index (Elias–Fano)."""
    highs: int
    """High buckets: ceil(chunk / 2**low); the bitmap holds k + highs bits."""
    bits: int
    """Bits a value code."""
    packed: int
    """Bytes of the bit fields (indices, then codes), zero-padded to a byte."""
    table: int
    """Bytes of the bin-mean table (2**bits bf16)."""

    @property
    def record(self) -> int:
        return self.packed + self.table


def _bits(x: Tensor, width: int) -> Tensor:
    """[..., n] ints -> [..., n*width] bits, least significant first (uint8)."""
    shifts = torch.arange(width, dtype=torch.int64)
    return ((x[..., None] >> shifts) & 1).to(torch.uint8).flatten(-2)


def _ints(bits: Tensor, width: int) -> Tensor:
    """Inverse of `_bits`: [..., n*width] bits -> [..., n] int64."""
    shifts = torch.arange(width, dtype=torch.int64)
    return (bits.view(*bits.shape[:-1], -1, width).to(torch.int64) << shifts).sum(-1)


class TopK2(TopK):
    name = "topk2"

    def params(self, ctx: CodecContext) -> dict:
        return {"compression": float(ctx.compression), "chunk": ctx.chunk, "value_bits": ctx.value_bits}

    def layout(self, ctx: CodecContext) -> Layout:
        k = self.k(ctx)
        low = max(0, math.floor(math.log2(ctx.chunk / k)))
        highs = -(-ctx.chunk // (1 << low))
        nbits = k * low + k + highs + k * ctx.value_bits
        return Layout(k, low, highs, ctx.value_bits, -(-nbits // 8), 2 * (1 << ctx.value_bits))

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        record = self.layout(ctx).record
        return {name: ((-(-numel(s) // ctx.chunk) * record,), torch.uint8) for name, s in shapes.items()}

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        return {name: self.records(t, ctx) for name, t in delta.items()}

    def records(self, t: Tensor, ctx: CodecContext) -> Tensor:
        """One parameter's chunk records (uint8)."""
        lay = self.layout(ctx)
        flat = t.detach().to("cpu", torch.float32).reshape(-1)
        chunks = -(-flat.numel() // ctx.chunk)
        pad = chunks * ctx.chunk - flat.numel()
        x = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(chunks, ctx.chunk)
        idx = x.abs().topk(lay.k, dim=1, sorted=False).indices.sort(dim=1).values  # [chunks, k]
        return self._record(idx, x.gather(1, idx), lay)

    def _record(self, idx: Tensor, vals: Tensor, lay: Layout) -> Tensor:
        chunks, k = idx.shape
        bitmap = torch.zeros(chunks, k + lay.highs, dtype=torch.uint8)
        bitmap.scatter_(1, (idx >> lay.low) + torch.arange(k), 1)  # high part j at high_j + j
        bins = 1 << lay.bits
        sigma = vals.square().mean(dim=1, keepdim=True).sqrt()  # [chunks, 1]
        width = (6 * sigma / bins).clamp_min(1e-30)
        code = ((vals + 3 * sigma) / width).floor().clamp(0, bins - 1).to(torch.int64)
        sums = torch.zeros(chunks, bins).scatter_add_(1, code, vals)
        counts = torch.zeros(chunks, bins).scatter_add_(1, code, torch.ones_like(vals))
        table = (sums / counts.clamp_min(1)).to(torch.bfloat16)  # [chunks, bins]: each bin's mean
        fields = torch.cat([_bits(idx & ((1 << lay.low) - 1), lay.low), bitmap, _bits(code, lay.bits)], 1)
        fields = torch.nn.functional.pad(fields, (0, 8 * lay.packed - fields.shape[1]))
        packed = torch.from_numpy(np.packbits(fields.numpy(), axis=1, bitorder="little"))
        record = torch.cat([packed, table.view(torch.uint8).view(chunks, lay.table)], 1)
        return record.reshape(-1).contiguous()

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        return {name: self.sparse(tensors[name], ctx, shape, name) for name, shape in shapes.items()}

    def sparse(self, records: Tensor, ctx: CodecContext, shape: tuple[int, ...], name: str) -> Sparse:
        """One parameter's chunk records (length already checked) -> its sparse part."""
        lay = self.layout(ctx)
        n = numel(shape)
        chunks = -(-n // ctx.chunk)
        local, values = self._read(records.view(chunks, lay.record), lay, ctx.chunk, name)
        flat = (local + torch.arange(chunks)[:, None] * ctx.chunk).reshape(-1)
        real = flat < n
        return Sparse(flat[real], values.reshape(-1)[real])

    def _read(self, record: Tensor, lay: Layout, chunk: int, name: str) -> tuple[Tensor, Tensor]:
        """[chunks, record] bytes -> local indices [chunks, k] and values [chunks, k]."""
        chunks, k = record.shape[0], lay.k
        bits = torch.from_numpy(np.unpackbits(record[:, : lay.packed].numpy(), axis=1, bitorder="little"))
        used = k * lay.low + k + lay.highs + k * lay.bits
        if bool(bits[:, used:].any()):
            raise BadTensors(f"{name}: non-zero padding bits")
        bitmap = bits[:, k * lay.low : k * lay.low + k + lay.highs]
        if bool((bitmap.sum(dim=1, dtype=torch.int64) != k).any()):
            raise BadTensors(f"{name}: index bitmap must hold exactly {k} ones a chunk")
        high = bitmap.nonzero()[:, 1].view(chunks, k) - torch.arange(k)  # row-major: sorted per chunk
        local = (high << lay.low) | _ints(bits[:, : k * lay.low], lay.low) if lay.low else high
        if bool((local >= chunk).any()):
            raise BadTensors(f"{name}: index outside its chunk")
        if k > 1 and bool((local[:, 1:] <= local[:, :-1]).any()):
            raise BadTensors(f"{name}: indices within a chunk not strictly increasing")
        table = record[:, lay.packed :].reshape(-1).clone().view(torch.bfloat16).view(chunks, -1).float()
        if not bool(torch.isfinite(table).all()):
            raise NonFiniteValues(f"{name}: bin means must be finite")
        code = _ints(bits[:, used - k * lay.bits : used], lay.bits)
        return local, table.gather(1, code)


# --- lowrank ------------------------------------------------------------------------------------


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
    A 2-D parameter decodes to `Mixed`: Σ_j outer(p_j, q_j) in a fixed order (elementwise, so every
    node gets the same bits) and the sparse values."""

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
            delta[name] = Mixed(_product(pc, scales[:r], qc, scales[r:]), sparse)
        return delta


def _product(pc: Tensor, ps: Tensor, qc: Tensor, qs: Tensor) -> Tensor:
    """Σ_j outer(p_j, q_j) of dequantized factors, one rank at a time (bit-identical everywhere)."""
    out = torch.zeros(pc.shape[0], qc.shape[0])
    for j in range(pc.shape[1]):
        out += torch.outer(pc[:, j].float() * ps[j], qc[:, j].float() * qs[j])
    return out


# --- mask ---------------------------------------------------------------------------------------


def mask_size(n: int, compression: float) -> int:
    """How many positions of an n-entry tensor a mask keeps: about n/compression, at least one."""
    return min(n, max(1, round(n / compression)))


@functools.lru_cache(maxsize=4096)
def mask_positions(netuid: int, window: int, name: str, n: int, k: int) -> Tensor:
    """k distinct positions in [0, n), sorted, the same on every node and process.

    Drawn on CPU with replacement and de-duplicated in draw order (O(k log k), unlike randperm's
    O(n)); a stable function of (netuid, window, name) for a given torch version. Cached and
    shared between calls: never modify the returned tensor.
    """
    g = torch.Generator(device="cpu").manual_seed(protocol.seed("mask", netuid, window, name))
    drawn, distinct = np.empty(0, dtype=np.int64), 0
    while distinct < k:
        extra = 2 * (k - distinct) + k // 64 + 16
        drawn = np.concatenate([drawn, torch.randint(n, (extra,), generator=g, dtype=torch.int64).numpy()])
        _, first = np.unique(drawn, return_index=True)  # where each distinct value was first drawn
        distinct = first.size
    keep = drawn[np.sort(first)[:k]]  # the first k distinct draws
    return torch.from_numpy(np.sort(keep))


class Mask(Codec):
    name = "mask"

    def params(self, ctx: CodecContext) -> dict:
        return {"compression": float(ctx.compression)}

    def positions(self, name: str, shape: tuple[int, ...], ctx: CodecContext) -> Tensor:
        n = numel(shape)
        return mask_positions(ctx.netuid, ctx.window, name, n, mask_size(n, ctx.compression))

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        return {name: ((mask_size(numel(s), ctx.compression),), torch.float32) for name, s in shapes.items()}

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        out = {}
        for name, t in delta.items():
            flat = t.detach().to("cpu", torch.float32).reshape(-1)
            out[name] = flat[self.positions(name, tuple(t.shape), ctx)].contiguous()
        return out

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        return {
            name: Sparse(self.positions(name, s, ctx), tensors[name].float()) for name, s in shapes.items()
        }


# --- dense --------------------------------------------------------------------------------------


class Dense(Codec):
    name = "dense"

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        return {name: (tuple(s), torch.bfloat16) for name, s in shapes.items()}

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        return {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in delta.items()}

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        return {name: tensors[name].float() for name in shapes}


CODECS: dict[str, Codec] = {c.name: c for c in (TopK(), TopK2(), LowRank(), Mask(), Dense())}
if set(CODECS) != {"topk", "topk2", "lowrank", "mask", "dense"}:
    raise ImportError(f"codec registry is inconsistent: {sorted(CODECS)}")


# --- error feedback -----------------------------------------------------------------------------


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


@dataclass
class ErrorFeedback:
    """What a miner did not send yet; added to its next window's delta (kept on the miner)."""

    residual: dict[str, Tensor] = field(default_factory=dict)

    PREFIX: ClassVar[str] = "residual/"

    def to_tensors(self) -> dict[str, Tensor]:
        """Tensors to persist (safetensors) so a restarted miner loses nothing."""
        return {self.PREFIX + name: t.detach().cpu().contiguous() for name, t in self.residual.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ErrorFeedback:
        bad = [n for n in tensors if not n.startswith(cls.PREFIX)]
        if bad:
            raise ValueError(f"not error-feedback tensors: {bad[:3]}")
        return cls({n[len(cls.PREFIX) :]: t.float() for n, t in tensors.items()})


def compress(
    delta: dict[str, Tensor], codec: Codec, ctx: CodecContext, ef: ErrorFeedback | None
) -> dict[str, Tensor]:
    """Encode `delta` plus the residual; the residual becomes exactly what the wire did not carry.

    residual = target - sent, computed in place on `target` (only the sent positions change), so
    no dense copy of the sent delta is ever made.
    """
    if ef is None:
        return codec.encode(delta, ctx)
    target = {}
    for name, t in delta.items():
        t = t.detach().float()
        if name in ef.residual:  # e <- decay * e + delta (decay 1: plain error feedback)
            target[name] = t + ctx.ef_decay * ef.residual[name].to(t.device)
        else:
            target[name] = t.clone()
    wire = codec.encode(target, ctx)
    sent = codec.decode(wire, ctx, {n: tuple(t.shape) for n, t in target.items()})
    for name, part in sent.items():
        t = target[name]
        if isinstance(part, Sparse):
            t.view(-1).index_add_(0, part.indices.to(t.device), part.values.to(t.device), alpha=-1.0)
        else:
            t.sub_(full(part).to(t.device).view_as(t))
    ef.residual = target
    return wire
