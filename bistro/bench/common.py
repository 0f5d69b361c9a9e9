"""What the bench suites share: deterministic hotkeys and block hashes, the honest miner's window
without a chain, and the row format of `bistro bench`'s table. `mechanism` and `scale` both import
this module and never each other's helpers (`mechanism.run` composes `scale`'s measurements)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import bittensor_core
import torch

from ..config import Settings
from ..data import Dataset
from ..data.pages import local_pages
from ..delta import CODECS, ErrorFeedback, compress, encode_delta
from ..delta.codec import codec_context
from ..model import Params, build_model, state_tensors
from ..training import Trainer


@dataclass(frozen=True)
class Plan:
    """How big a benchmark's simulated network is."""

    miners: int
    windows: int
    steps: int
    """Optimizer steps per miner per window."""
    held_out: int
    """Held-out pages."""
    batch_size: int | None = None
    """Sequences per miner step (None: the preset's `train.batch_size`)."""


def clone(params: Params) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


def block_hash(window: int) -> str:
    """A stand-in for the hash of the window's seed block (`protocol.seed_block`, the chain's, in
    production)."""
    return hashlib.sha256(f"bench-block-{window}".encode()).hexdigest()


def keypair(uid: int) -> bittensor_core.Keypair:
    """A real sr25519 hotkey, the same every run."""
    return bittensor_core.Keypair.create_from_seed(hashlib.sha256(f"bench-hotkey-{uid}".encode()).digest())


class SimMiner:
    """The honest miner's window (`Miner.train` + `Miner.honest` + `Miner.encode`), without a chain."""

    def __init__(self, settings: Settings, dataset: Dataset, uid: int) -> None:
        self.settings, self.dataset, self.uid = settings, dataset, uid
        self.keypair = keypair(uid)
        self.model = build_model(settings.model, seed=settings.model.seed).to(settings.device)
        self.params = state_tensors(self.model)
        self.trainer = Trainer(self.model, settings.train, settings.device)
        self.ef = ErrorFeedback()

    def train(self, window: int, master: Params) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(master[name])
        pages = local_pages(self.settings.chain.netuid, self.uid, window, self.dataset.page_settings)
        self.trainer.train(self.dataset.sequences(pages), self.settings.train.steps_per_window)
        with torch.no_grad():
            return {name: p.detach() - master[name] for name, p in self.params.items()}

    def produce(self, window: int, master: Params, digest: str) -> bytes:
        return sign_delta(self.settings, self.uid, window, self.train(window, master), digest, self.ef)


def sign_delta(settings: Settings, uid: int, window: int, delta: dict[str, torch.Tensor], digest: str,
               ef: ErrorFeedback | None) -> bytes:  # fmt: skip
    """`compress` + `encode_delta`, as `Miner.honest` does, signed by uid's bench hotkey."""
    codec = CODECS[settings.mechanism.codec]
    ctx = codec_context(settings, window)
    wire = compress(delta, codec, ctx, ef)
    return encode_delta(
        wire, keypair=keypair(uid), netuid=settings.chain.netuid, uid=uid, window=window, codec=codec.name,
        codec_params=codec.params(ctx), master_window=window, master_hash=digest,
    )  # fmt: skip


def row(name: str, value: float | None, unit: str, *, baseline: float | None = None, target: str | None = None,
         ok: bool | None = None) -> dict[str, Any]:  # fmt: skip
    ratio = None if baseline in (None, 0) or value is None else value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            "ok": ok}  # fmt: skip
