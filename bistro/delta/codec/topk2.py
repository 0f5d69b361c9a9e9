"""`topk2`: the k largest per chunk as one byte record a chunk: Elias-Fano coded indices,
`value_bits`-bit bin codes and a bf16 table of each bin's mean (SparseLoCo-like)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .base import (
    BadTensors,
    CodecContext,
    Delta,
    NonFiniteValues,
    Shapes,
    Sparse,
    WireSpec,
    numel,
)
from .topk import TopK


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
