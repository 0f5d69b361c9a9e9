"""`dense`: bf16 values of everything, for debugging and as a reference (2x)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    Codec,
    CodecContext,
    Delta,
    Shapes,
    WireSpec,
)


class Dense(Codec):
    name = "dense"

    def wire_spec(self, shapes: Shapes, ctx: CodecContext) -> WireSpec:
        return {name: (tuple(s), torch.bfloat16) for name, s in shapes.items()}

    def encode(self, delta: dict[str, Tensor], ctx: CodecContext) -> dict[str, Tensor]:
        return {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in delta.items()}

    def decode(self, tensors: dict[str, Tensor], ctx: CodecContext, shapes: Shapes) -> Delta:
        self.check(tensors, ctx, shapes)
        return {name: tensors[name].float() for name in shapes}
