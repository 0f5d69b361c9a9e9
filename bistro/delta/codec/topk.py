"""`topk`: per chunk the k largest by magnitude, 12-bit packed local indices, int8 values with an
fp32 scale a chunk (about 154x at compression 100)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    BadTensors,
    Codec,
    CodecContext,
    Delta,
    Shapes,
    Sparse,
    WireSpec,
    numel,
)


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
