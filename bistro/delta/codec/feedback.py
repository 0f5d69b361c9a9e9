"""Error feedback: what the wire did not carry this window is added to the next window's delta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from .base import (
    Codec,
    CodecContext,
    Sparse,
    full,
)


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
