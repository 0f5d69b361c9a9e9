"""Miner behaviours for testing the incentive: the honest miner and the cheats it must beat.

    honest      train, compress with error feedback, sign, upload
    idle        registered, bucket committed, uploads nothing
    freeloader  uploads a zero delta
    noise       uploads random noise with the norm of a real delta (measured once by training)
    copycat     re-signs another miner's delta of the same window as its own, after it appears
    poison      uploads its trained delta reversed and amplified
    stale       re-uploads its delta of an older window

Each persona runs inside the real miner process; only what it uploads differs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors

from . import protocol
from .delta import delta_norm
from .delta.wire import DeltaRejected, decode_delta
from .storage.base import NotFound, StorageError

if TYPE_CHECKING:
    from .miner import Miner

log = logging.getLogger("bistro.persona")


class Persona:
    name = "honest"

    def __init__(self, miner: Miner) -> None:
        self.miner = miner

    def produce(self, window: int) -> tuple[bytes | None, object]:
        """The blob to upload for `window` (None: nothing) and training stats (None: no training)."""
        return self.miner.honest(window)

    def compress_plain(self, window: int, delta: dict[str, torch.Tensor]) -> bytes:
        """Encode without error feedback (cheats keep no residual)."""
        from .delta.codec import compress

        return self.miner.encode(window, compress(delta, self.miner.codec, self.miner.ctx(window), None))


class Idle(Persona):
    name = "idle"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        return None, None


class Freeloader(Persona):
    name = "freeloader"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        zero = {k: torch.zeros_like(v) for k, v in self.miner.master.items()}
        return self.compress_plain(window, zero), None


class Noise(Persona):
    name = "noise"
    norm: float | None = None

    def produce(self, window: int) -> tuple[bytes | None, object]:
        stats = None
        if self.norm is None:
            delta, stats = self.miner.train(window)
            self.norm = delta_norm(delta)
        g = torch.Generator().manual_seed(protocol.seed("noise", self.miner.uid, window))
        noise = {k: torch.randn(v.shape, generator=g) for k, v in self.miner.master.items()}
        scale = self.norm / delta_norm(noise)
        return self.compress_plain(window, {k: n * scale for k, n in noise.items()}), stats


class Poison(Persona):
    name = "poison"
    factor = -4.0

    def produce(self, window: int) -> tuple[bytes | None, object]:
        delta, stats = self.miner.train(window)
        return self.compress_plain(window, {k: d * self.factor for k, d in delta.items()}), stats


class Stale(Persona):
    name = "stale"
    blob: bytes | None = None

    def produce(self, window: int) -> tuple[bytes | None, object]:
        if self.blob is None:
            self.blob, stats = self.miner.honest(window)
            return self.blob, stats
        return self.blob, None


class Copycat(Persona):
    """Waits for another miner's delta of this window, then re-signs it as its own."""

    name = "copycat"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        m = self.miner
        deadline = protocol.window_start(window + 1, m.bpw) - 1
        while m.chain.block() < deadline and not m.stopping.is_set():
            wire = self._steal(window)
            if wire is not None:
                return m.encode(window, wire), None
            time.sleep(0.5)
        return None, None

    def _steal(self, window: int) -> dict[str, torch.Tensor] | None:
        m = self.miner
        from .evaluator import expectation

        mg = m.chain.metagraph()
        # The best-paid miner first: that is whose work is worth stealing.
        ranked = sorted(m.chain.commitments().items(), key=lambda kv: (-mg.incentive_of(kv[0]), kv[0]))
        for uid, commitment in ranked:
            hotkey = mg.hotkey_of(uid)
            if uid == m.uid or hotkey is None:
                continue
            try:
                blob = m.peer_store(commitment).get(
                    protocol.delta_key(m.netuid, window, hotkey),
                    max_bytes=m.settings.mechanism.max_delta_bytes,
                )
                exp = expectation(m.settings, window, hotkey, m.position.hash if m.position else "", m.shapes)
                if decode_delta(blob, exp).norm == 0.0:  # only copy what a validator would accept
                    continue
            except (NotFound, StorageError, ValueError, DeltaRejected):
                continue
            log.info("copycat: copying uid %d's delta of window %d", uid, window)
            return dict(load_safetensors(blob))
        return None


PERSONAS = {p.name: p for p in (Persona, Idle, Freeloader, Noise, Poison, Stale, Copycat)}


def make_persona(name: str, miner: Miner) -> Persona:
    return PERSONAS[name](miner)
