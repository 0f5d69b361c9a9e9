"""`bistro bench mechanism`: what the mechanism keeps of centralized training, and what it costs.

1. Learning efficiency: moved to `bistro bench learning` (bench/learning.py), which runs the parts
   kept here (`batches`, `held_out_pages`, `decode_all`) against a sequential and a data-parallel
   baseline.
3. Validator overhead: `Evaluator.score` for 8 uids over the bare `sequence_losses` passes that its
   scoring rule needs (the own-page rule: every uid's eval pages and as many control pages, at θ, at
   θ_eval and at θ_eval without the uid; the global pages at θ and θ_eval), on the same model and
   sequences, interleaved, medians. The ratio is what the merge, the leave-one-out and the
   bookkeeping cost on top of the forward passes.
4./5. Miner duty cycle and the 256-uid validator window: `bench/window.py`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace as dc_replace
from typing import Any

import torch

from ..config import Settings
from ..data import Dataset
from ..data.pages import global_pages, local_pages
from ..delta import DeltaRejected, decode_delta
from ..delta.wire import expectation
from ..evaluator import Evaluator, Verdict
from ..model import build_model, model_hash, sequence_losses
from . import window as scale_window
from .common import Params, Plan, block_hash, row

log = logging.getLogger("bistro.bench.mechanism")

EFFICIENCY_TARGET = 0.8
OVERHEAD_TARGET = 1.2


def plan_for(settings: Settings, quick: bool) -> Plan:
    """The size of the runs whose blobs the overhead and scale measurements use."""
    if quick:
        return Plan(miners=2, windows=2, steps=2, held_out=2)
    return Plan(miners=4, windows=5, steps=settings.train.steps_per_window, held_out=8)


# --- pages ---------------------------------------------------------------------------------------


def batches(sequences: torch.Tensor, steps: int, batch_size: int) -> torch.Tensor:
    """The rows a single-process `Trainer.train(sequences, steps)` steps through, in order."""
    rows = torch.arange(steps * batch_size) % len(sequences)
    return sequences[rows].view(steps, batch_size, -1)


def held_out_pages(settings: Settings, dataset: Dataset, plan: Plan) -> list[int]:
    """Pages of the whole corpus that no miner trains on in any window of the run."""
    ps = dataset.page_settings
    trained = {
        p for w in range(plan.windows) for uid in range(plan.miners) for p in local_pages(
            settings.chain.netuid, uid, w, ps)
    }  # fmt: skip
    wide = dc_replace(ps, global_pages=min(ps.num_pages, plan.held_out + len(trained)))
    candidates = global_pages(settings.chain.netuid, -1, "held-out", wide)
    return [p for p in candidates if p not in trained][: plan.held_out]


# --- decoding, as the validator does -----------------------------------------------------------------


def decode_all(
    settings: Settings, shapes: dict, window: int, digest: str, blobs: dict[int, tuple[str, bytes]]
) -> dict[int, Verdict]:
    """The validator's step 2 on blobs in hand: {uid: (hotkey, blob)} -> verdicts."""
    verdicts = {}
    for uid, (hotkey, blob) in sorted(blobs.items()):
        v = verdicts[uid] = Verdict(uid)
        try:
            v.delta = decode_delta(blob, expectation(settings, window, hotkey, digest, shapes)).delta
            v.verdict = "ok"
        except DeltaRejected as e:
            v.verdict = e.reason.value
            log.warning("window %d uid %d rejected: %s", window, uid, e)
    return verdicts


# --- 3. validator overhead ---------------------------------------------------------------------------


def overhead(settings: Settings, dataset: Dataset, blobs: dict[int, tuple[str, bytes]], master: Params,
             window: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    """`Evaluator.score` vs the bare forward passes its scoring rule needs, alternately, medians."""
    evaluator = Evaluator(settings, build_model(settings.model, seed=settings.model.seed).eval(), dataset)
    digest = model_hash(master)
    verdicts = decode_all(settings, evaluator.shapes, window, digest, blobs)
    uids = [u for u, v in verdicts.items() if v.verdict == "ok"]
    bh = block_hash(window)
    # The sequences Evaluator.score reads: each uid's eval pages, then its control pages.
    own = {u: evaluator.eval_sequences(u, window, bh) for u in uids}
    pages = {u: torch.cat([own[u], evaluator.other_sequences(u, window, bh)]) for u in uids}
    glob = evaluator.global_sequences(window, bh)
    model, bs = evaluator.model, settings.train.eval_batch_size

    def score() -> None:
        evaluator.score(window, bh, master, verdicts, {})

    def bare() -> None:  # the passes Evaluator.score makes, on one fixed model
        sequence_losses(model, glob, bs)  # L(θ) on the global pages
        sequence_losses(model, torch.cat([pages[u] for u in uids]), bs)  # L(θ) on every uid's pages
        sequence_losses(model, torch.cat([pages[u] for u in uids] + [glob]), bs)  # θ_eval, one batch
        for u in uids:  # θ_eval without uid u, on its pages
            sequence_losses(model, pages[u], bs)

    def own_only() -> None:  # the literal count: 2 per uid on its eval pages, the global once
        sequence_losses(model, glob, bs)
        for u in uids:
            sequence_losses(model, own[u], bs)
            sequence_losses(model, own[u], bs)

    times: dict[str, list[float]] = {"score": [], "bare": [], "own_only": []}
    fns = {"score": score, "bare": bare, "own_only": own_only}
    rows = {name: _rows_forwarded(model, fns[name]) for name in ("score", "bare")}  # also the warm-up
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        log.info("validator overhead repeat %d/%d: score %.2fs bare %.2fs", r + 1, repeats,
                 times["score"][-1], times["bare"][-1])  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "uids": len(uids), "repeats": repeats, "score_s": med["score"], "bare_s": med["bare"],
        "own_only_s": med["own_only"], "overhead": med["score"] / med["bare"],
        "over_own_pages_only": med["score"] / med["own_only"],
        "overhead_of_fastest": min(times["score"]) / min(times["bare"]), "times": times,
        "score_rows": rows["score"], "bare_rows": rows["bare"],
    }  # fmt: skip


def _rows_forwarded(model: torch.nn.Module, fn: Callable[[], None]) -> int:
    """How many sequences `fn` runs through `model`: the baseline must make the passes the scoring
    rule makes, or the ratio measures a rule nobody runs."""
    count = 0

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal count
        count += len(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return count


# --- the suite ---------------------------------------------------------------------------------------


def run(settings: Settings, *, quick: bool) -> dict:
    dataset = Dataset.open(settings)
    plan = plan_for(settings, quick)
    # The learning arms moved to `bistro bench learning` (bench/learning.py); the functions above
    # stay as the parts it runs. Here: what scoring and training cost.
    rows: list[dict[str, Any]] = []
    synthetic = scale_window.synthetic_blobs(
        settings, dataset, count=2 if quick else 8, window=plan.windows, steps=plan.steps
    )
    over = overhead(
        settings, dataset, synthetic["blobs"], synthetic["master"], plan.windows, 2 if quick else 5
    )
    rows.append(
        row(
            f"validator score / bare forwards ({over['uids']} uids)",
            over["score_s"],
            "s",
            baseline=over["bare_s"],
        )
    )
    rows.append(row("  fastest score / fastest bare", over["overhead_of_fastest"], "x", target="<= 1.2",
                     ok=over["overhead_of_fastest"] <= OVERHEAD_TARGET))  # fmt: skip
    rows.append(row("  score / own-page forwards only", over["score_s"], "s", baseline=over["own_only_s"]))

    duty = scale_window.duty_cycle(settings, dataset, quick=quick)
    rows += duty.pop("rows")
    window = scale_window.scale_window(settings, dataset, quick=quick, steps=plan.steps)
    rows += window.pop("rows")
    headline = {
        "validator_overhead": over["overhead_of_fastest"],
        "validator_overhead_median": over["overhead"],
        "miner_duty_cycle": duty["busy_fraction"],
        "miner_duty_cycle_wall": duty["wall_fraction"],
        "scale_seconds_per_window_256": window["seconds"],
        "scale_peak_memory_mb": window["peak_rss_mb"],
        "scale_uids_scored": window["scored"],
    }  # fmt: skip
    return {"rows": rows, "headline": headline, "validator_overhead": over,
            "duty_cycle": duty, "scale": window, "quick": quick}  # fmt: skip
