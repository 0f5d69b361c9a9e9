"""Scoring one window's deltas against a master, and the master step (DESIGN.md "Mechanism" 3-5, 8).

The validator wraps this with the chain and the buckets; the benchmarks and tests call it directly,
so everyone measures the same code. Nothing here reads a clock, a chain or a store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import scoring
from .config import Settings
from .data import Dataset
from .data.pages import eval_pages, global_pages
from .delta import Delta, add_, apply_, merge, restore_, similarity, sketch
from .delta.wire import Expectation
from .master import apply_update
from .miner import codec_context
from .model import sequence_losses, state_tensors

log = logging.getLogger("bistro.evaluator")

Params = dict[str, torch.Tensor]

SCREEN = 0.05
"""Pairs whose sketched cosine is this far below the copy threshold are not compared exactly (the
sketch's error is about 0.006)."""


def expectation(settings: Settings, window: int, hotkey: str, master_hash: str, shapes: dict) -> Expectation:
    """What a valid delta from `hotkey` for `window` must be."""
    m = settings.mechanism
    return Expectation(
        netuid=settings.chain.netuid, window=window, hotkey=hotkey, master_hash=master_hash, codec=m.codec,
        ctx=codec_context(settings, window), shapes=shapes, max_bytes=m.max_delta_bytes, max_norm=m.max_delta_norm,
    )  # fmt: skip


@dataclass
class Verdict:
    """What happened to one uid's delta this window."""

    uid: int
    verdict: str = "missing"
    """ok, missing, copy, skip (our own storage error, tolerated), storage_error, bad_commitment, or a
    DeltaRejected reason."""
    merge_weight: float = 0.0
    with_local: float | None = None
    without_local: float | None = None
    with_global: float | None = None
    without_global: float | None = None
    score: float = 0.0
    uploaded: float = float("inf")
    """Upload time (storage last-modified, seconds): orders copies."""
    copy_of: int | None = None
    delta: Delta | None = field(default=None, repr=False)


class Evaluator:
    """One model whose parameters are moved between θ, θ_eval and θ_eval − m_i Δ_i, in place."""

    def __init__(self, settings: Settings, model: torch.nn.Module, dataset: Dataset) -> None:
        self.settings = settings
        self.model = model
        self.dataset = dataset
        self.netuid = settings.chain.netuid
        self.params: Params = state_tensors(model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}

    def set_params(self, source: Params) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(source[name])

    def losses(self, sequences: torch.Tensor) -> torch.Tensor:
        return sequence_losses(self.model, sequences, self.settings.train.eval_batch_size).double()

    def loss(self, sequences: torch.Tensor) -> float:
        return float(self.losses(sequences).mean())

    def global_sequences(self, window: int, block_hash: str) -> torch.Tensor:
        return self.dataset.sequences(
            global_pages(self.netuid, window, block_hash, self.dataset.page_settings)
        )

    def eval_sequences(self, uid: int, window: int, block_hash: str) -> torch.Tensor:
        return self.dataset.sequences(
            eval_pages(self.netuid, uid, window, block_hash, self.dataset.page_settings)
        )

    def drop_copies(self, verdicts: dict[int, Verdict]) -> None:
        """Of near-identical deltas, keep the earliest upload; the others become `copy`.

        Sketches screen every pair at once; only pairs within `SCREEN` of the threshold are compared
        exactly, so 255 uids cost one matrix product, not 32k sparse intersections."""
        ok = [v for v in verdicts.values() if v.verdict == "ok"]
        if len(ok) < 2:
            return
        order = [v.uid for v in sorted(ok, key=lambda v: (v.uploaded, v.uid))]
        row = {uid: k for k, uid in enumerate(order)}
        sketches = torch.stack([sketch(verdicts[uid].delta, self.shapes) for uid in order])
        gram = sketches @ sketches.T
        threshold = self.settings.mechanism.copy_threshold

        def similar(a: int, b: int) -> float:
            estimate = float(gram[row[a], row[b]])
            if estimate < threshold - SCREEN:
                return estimate
            return similarity(verdicts[a].delta, verdicts[b].delta)

        for uid, source in scoring.find_copies(order, similar, threshold).items():
            verdicts[uid].verdict, verdicts[uid].copy_of, verdicts[uid].delta = "copy", source, None
            log.info("uid %d: copy of uid %d", uid, source)

    def score(
        self,
        window: int,
        block_hash: str,
        master: Params,
        verdicts: dict[int, Verdict],
        incentive: dict[int, float],
    ) -> tuple[float, torch.Tensor]:
        """Steps 3-5 for the `ok` verdicts, in place; returns the master's global loss and the global
        sequences. The model is left at θ_eval."""
        valid = [uid for uid, v in sorted(verdicts.items()) if v.verdict == "ok"]
        weights = scoring.merge_weights(incentive, valid)
        global_seqs = self.global_sequences(window, block_hash)
        self.set_params(master)
        base_global = self.loss(global_seqs)
        if not valid:
            return base_global, global_seqs
        with torch.no_grad():  # θ_eval = θ + Σ m_i Δ_i
            for uid in valid:
                verdicts[uid].merge_weight = weights[uid]
                add_(self.params, verdicts[uid].delta, weights[uid])
        own = {uid: self.eval_sequences(uid, window, block_hash) for uid in valid}
        # Every "with" loss shares θ_eval: one batched pass over all uids' pages and the global ones.
        losses = self.losses(torch.cat([own[uid] for uid in valid] + [global_seqs]))
        with_global = float(losses[-len(global_seqs) :].mean())
        offset = 0
        for uid in valid:
            v, n = verdicts[uid], len(own[uid])
            v.with_local, v.with_global = float(losses[offset : offset + n].mean()), with_global
            offset += n
            with torch.no_grad():
                saved = apply_(self.params, v.delta, -v.merge_weight)  # θ_eval − m_i Δ_i
            without = self.losses(torch.cat([own[uid], global_seqs]))
            with torch.no_grad():
                restore_(self.params, saved)  # back to θ_eval, bit for bit
            v.without_local, v.without_global = float(without[:n].mean()), float(without[n:].mean())
            v.score = scoring.score(
                v.with_local, v.without_local, v.with_global, v.without_global,
                self.settings.mechanism.local_dominance, v.merge_weight,
            )  # fmt: skip
        return base_global, global_seqs

    def propose_update(
        self, master: Params, verdicts: dict[int, Verdict], base_global: float, global_seqs: torch.Tensor
    ) -> tuple[Delta | None, dict]:
        """Step 8: U = Σ_{s_i>0} m_i Δ_i, kept only if θ + U has a lower global loss than θ."""
        helpful = [v for _, v in sorted(verdicts.items()) if v.verdict == "ok" and v.score > 0]
        info: dict = {
            "global_loss_before": base_global, "global_loss_after": base_global, "accepted": False,
            "merged_uids": [v.uid for v in helpful],
        }  # fmt: skip
        if not helpful:
            return None, info
        update = merge([v.delta for v in helpful], [v.merge_weight for v in helpful], self.shapes)
        self.set_params(master)
        apply_update(self.params, update)
        after = self.loss(global_seqs)
        if after >= base_global:
            return None, info
        info.update(global_loss_after=after, accepted=True)
        return update, info
