"""`mask`: the same positions for every miner, seeded by (netuid, window, name); only fp32 values
travel (the seed era's codec)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ... import protocol
from .base import (
    Codec,
    CodecContext,
    Delta,
    Shapes,
    Sparse,
    WireSpec,
    numel,
)


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
