"""`bistro bench scale`: fit the plan's rates on `tiny`, check its prediction on a real `small` window.

1. Rates (`plan.Rates`), one thread, on `tiny`: the host work per parameter per uid of a validator
   (`redecode`, `sketch`, `MeanMerge`'s sums, a uid's `share` + `term` + `apply_` + `restore_`,
   `merge_mean`), `apply_update` and `model_hash` of the master, a miner's `compress` + `encode`;
   the CPU's matrix-product rate by inner width (a machine rate, timed on bare `torch.mm`), the
   forward's element-wise rate (a `tiny` forward less its matrix products) and a training step over
   a forward of the same tokens.
2. Check: one real `Validator.evaluate` window on `small` with 64 uids (the validator and 63
   miners' signed deltas, `bench/scale.py`'s network) and one miner window (`SimMiner`: train +
   compress + encode), timed; `bistro plan --hardware cpu` with the fitted rates predicts both,
   and `plan_vs_measured` is predicted over measured seconds (target: within 1.6× either way).
   Rates fitted on the window they are checked on would prove nothing: the check uses `small`.

The check window reads fewer tokens than the preset's (`CHECK_PAGES`: one eval page of one
document a page), so that 63 uids' forwards take about a minute on one core; the plan is given the
same settings, so it predicts that window.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import plan as planning
from ..config import Settings, build_settings
from ..data import Dataset
from ..delta import (
    CODECS,
    ErrorFeedback,
    MeanMerge,
    add_,
    apply_,
    delta_norm,
    low_rank_cosines,
    low_rank_part,
    merge_mean,
    restore_,
    sketch,
)
from ..delta.codec import codec_context
from ..delta.wire import expectation, redecode
from ..master import apply_update
from ..model import build_model, model_hash, sequence_losses
from ..training import Trainer
from .common import SimMiner, clone, row, sign_delta
from .window import TimedValidator, _build_network, synthetic_blobs

log = logging.getLogger("bistro.bench.scale")

TARGET = 1.6
CHECK_PAGES = {"mechanism.rows_per_page": 1, "mechanism.eval_pages": 1, "mechanism.global_pages": 1}
"""The check window's pages: one document a page, one eval page (and one control page) a uid."""
NOISE = 2.0
"""Each synthetic delta's own noise (with a rank-1 part of its own), times its norm: pairs of one
real delta at cosine ~0.1, no near-copy group (a window with copies pays own-page evidence passes: `plan.Design.copy_group_uids`)."""
WIDTHS = (32, 64, 128, 256, 512, 1024)


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_rates(repeats: int) -> tuple[tuple[int, float], ...]:
    """ns per FLOP of `torch.mm` ([2048, w] @ [w, 3w]) by inner width w, one thread."""
    out = []
    for w in WIDTHS:
        a, b = torch.randn(2048, w), torch.randn(w, 3 * w)
        a @ b
        out.append((w, _best(lambda a=a, b=b: a @ b, repeats) / (2 * 2048 * w * 3 * w) * 1e9))
    return tuple(out)


def fit_rates(settings: Settings, *, uids: int, repeats: int) -> tuple[planning.Rates, dict[str, Any]]:
    """`plan.Rates` fitted on `settings` (the suite passes `tiny`), one thread."""
    gemm = gemm_rates(repeats)
    dataset = Dataset.open(settings)
    made = synthetic_blobs(settings, dataset, uids, window=1, steps=2)
    master, digest = made["master"], made["digest"]
    shapes = {k: tuple(v.shape) for k, v in master.items()}
    n = sum(v.numel() for v in master.values())
    exps = {u: expectation(settings, 1, hk, digest, shapes) for u, (hk, _) in made["blobs"].items()}
    blobs = {u: blob for u, (_, blob) in made["blobs"].items()}
    per = n * uids * 1e-9  # seconds -> ns per parameter per uid

    def decode_all() -> list:
        return [redecode(blobs[u], exps[u]) for u in sorted(blobs)]

    decode = _best(decode_all, repeats) / per
    deltas = decode_all()
    norms = [delta_norm(d) for d in deltas]
    weights = [1.0 / uids] * uids

    def sketches() -> None:  # the copy screen's pass: sparse sketches, low-rank cosines from factors
        for d in deltas:
            sketch(d, shapes)
        low_rank_cosines([low_rank_part(d) for d in deltas])

    sketch_ns = _best(sketches, repeats) / per
    sums = _best(lambda: MeanMerge(deltas, weights, shapes, norms=norms), repeats) / per
    mm = MeanMerge(deltas, weights, shapes, norms=norms)
    params = clone(master)
    ranks = len(deltas) * settings.mechanism.rank  # the stack's rank at each matrix
    matrices = sum(v.numel() for v in master.values() if v.dim() == 2)
    theta_eval = _best(lambda: add_(clone(master), mm.update, 1.0), repeats) / (
        max(1, ranks) * matrices * 1e-9
    )
    add_(params, mm.update, 1.0)
    share_term = _best(lambda: [(mm.share(j, d), mm.term(j, d)) for j, d in enumerate(deltas)], repeats) / per
    lows = [low for d in deltas for low in (low_rank_part(d) or {}).values()]
    abs_sum = _best(lambda: [low.abs_sum() for low in lows], repeats) / per
    terms = [mm.term(j, d) for j, d in enumerate(deltas)]
    # `applied_per_module` at one forward call: each parameter cloned, its term added, copied back
    leave_one_out = _best(lambda: [restore_(params, apply_(params, t, -1.0)) for t in terms], repeats) / per
    merge = _best(lambda: merge_mean(deltas, weights, shapes, norms=norms), repeats) / per
    update = merge_mean(deltas, weights, shapes, norms=norms)
    target = clone(master)
    apply_ns = _best(lambda: apply_update(target, update), repeats) / (n * 1e-9)
    hash_ns = _best(lambda: model_hash(master), repeats) / (4 * n * 1e-9)
    g = torch.Generator().manual_seed(0)
    dense = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in master.items()}
    ef = ErrorFeedback()
    encode = _best(lambda: sign_delta(settings, 1, 1, dense, digest, ef), repeats) / (n * 1e-9)

    # The forward: a tiny eval batch, less its matrix products, gives the element-wise rate.
    cfg = settings.model
    model = build_model(cfg, seed=cfg.seed).eval()
    seqs = torch.randint(
        0, cfg.vocab_size, (2 * settings.train.eval_batch_size, cfg.sequence_length), generator=g
    )
    sequence_losses(model, seqs[:4], settings.train.eval_batch_size)
    fwd = _best(lambda: sequence_losses(model, seqs, settings.train.eval_batch_size), repeats) / seqs.numel()
    bare = planning.Rates(gemm_ns_per_flop=gemm, elementwise_ns=0.0)
    gemm_part = planning.cpu_forward_seconds_per_token(cfg, bare)
    elements = cfg.num_layers * (9 * cfg.hidden_size + 3.25 * cfg.intermediate_size) + 1.5 * cfg.vocab_size
    elementwise = max(0.0, (fwd - gemm_part) / elements * 1e9)
    # A training step over a forward of the same tokens.
    trainer_model = build_model(cfg, seed=cfg.seed)
    trainer = Trainer(trainer_model, settings.train)
    batch = torch.randint(
        0, cfg.vocab_size, (settings.train.batch_size * 2, cfg.sequence_length), generator=g
    )
    trainer.train(batch, 1)
    step = _best(lambda: trainer.train(batch, 2), repeats) / 2
    rates = planning.Rates(
        decode_ns=decode, sketch_ns=sketch_ns, merge_sums_ns=sums, share_term_ns=share_term, abs_sum_ns=abs_sum,
        leave_one_out_ns=leave_one_out, theta_eval_ns=theta_eval, merge_mean_ns=merge,
        encode_ns=encode, apply_update_ns=apply_ns, hash_ns_per_byte=hash_ns, gemm_ns_per_flop=gemm,
        elementwise_ns=elementwise, train_factor=step / (fwd * settings.train.batch_size * cfg.sequence_length),
        source=f"bistro bench scale: fitted on {settings.preset}, {uids} uids, one thread",
    )  # fmt: skip
    raw = {"parameters": n, "uids": uids, "forward_s_per_token": fwd, "train_step_s": step,
           "forward_gemm_part_s_per_token": gemm_part}  # fmt: skip
    log.info("rates fitted on %s: %s", settings.preset, rates)
    return rates, raw


def large_matrix_rates(settings: Settings, *, uids: int = 8, repeats: int = 3) -> dict[str, float]:
    """The host rates of `fit_rates` on `uids` deltas of one 4096 × 4096 matrix (a 7B layer's
    shape) in `settings`' codec, one thread, ns per parameter per uid: `plan.Rates`' defaults, per
    parameter of a large matrix, where `tiny`'s small tensors add a cost per tensor."""
    shape = (4096, 4096)
    shapes, n = {"w": shape}, shape[0] * shape[1]
    ctx = codec_context(settings, 1)
    codec = CODECS[settings.mechanism.codec]
    g = torch.Generator().manual_seed(0)
    wires = [codec.encode({"w": torch.randn(shape, generator=g) * 1e-3}, ctx) for _ in range(uids)]
    per = n * uids * 1e-9
    decode = _best(lambda: [codec.decode(w, ctx, shapes) for w in wires], repeats) / per
    deltas = [codec.decode(w, ctx, shapes) for w in wires]
    norms, weights = [delta_norm(d) for d in deltas], [1.0 / uids] * uids
    sketches = _best(lambda: ([sketch(d, shapes) for d in deltas],
                              low_rank_cosines([low_rank_part(d) for d in deltas])), repeats) / per  # fmt: skip
    sums = _best(lambda: MeanMerge(deltas, weights, shapes, norms=norms), repeats) / per
    mm = MeanMerge(deltas, weights, shapes, norms=norms)
    share_term = _best(lambda: [(mm.share(j, d), mm.term(j, d)) for j, d in enumerate(deltas)], repeats) / per
    lows = [low for d in deltas for low in low_rank_part(d).values()]
    abs_sum = _best(lambda: [low.abs_sum() for low in lows], repeats) / per
    params = {"w": torch.zeros(shape)}
    terms = [mm.term(j, d) for j, d in enumerate(deltas)]
    leave_one_out = _best(lambda: [restore_(params, apply_(params, t, -1.0)) for t in terms], repeats) / per
    theta_eval = _best(lambda: add_(params, mm.update, 1.0), repeats) / (
        n * uids * settings.mechanism.rank * 1e-9
    )
    return {"decode_ns": decode, "sketch_ns": sketches, "merge_sums_ns": sums, "share_term_ns": share_term,
            "abs_sum_ns": abs_sum, "leave_one_out_ns": leave_one_out, "theta_eval_ns": theta_eval}  # fmt: skip


def _sequences_per_page(dataset: Dataset, pages: int = 64) -> float:
    return statistics.mean(len(dataset.sequences([p])) for p in range(pages))


class RecordingValidator(TimedValidator):
    """The timed validator; keeps the window's master step record (which uids were merged)."""

    master_info: dict

    def _window_record(self, window, verdicts, weights, master_info, seconds) -> dict:  # noqa: ANN001
        self.master_info = master_info
        return super()._window_record(window, verdicts, weights, master_info, seconds)


def check_window(settings: Settings, rates: planning.Rates, *, uids: int, steps: int) -> dict[str, Any]:
    """One real validator window of `uids` (the validator among them) and one miner window on
    `settings`, timed, beside the plan's prediction with `rates` on `--hardware cpu`."""
    dataset = Dataset.open(settings)
    seq_page = _sequences_per_page(dataset)
    window = 1
    with tempfile.TemporaryDirectory(prefix="bistro.bench.scale-") as name:
        tmp = Path(name)
        log.info(
            "check: %s, %d uids: training 2 miners and signing %d deltas", settings.preset, uids, uids - 1
        )
        s = _build_network(settings, dataset, tmp, uids, window, steps, noise=NOISE, distinct_low_rank=True)
        first = TimedValidator(s)
        first.evaluate(window - 1)  # publishes θ_window; nothing to score yet
        validator = RecordingValidator(s)
        log.info("check: one validator window over %d uids", uids - 1)
        t0 = time.perf_counter()
        validator.evaluate(window)
        measured = time.perf_counter() - t0
    times = dict(validator.evaluator.times)
    merged = len(getattr(validator, "master_info", {}).get("merged_uids", []))
    log.info("check: validator window %.1fs (%s)", measured, {k: round(v, 2) for k, v in times.items()})
    # One miner window: train `train.steps_per_window` steps, compress and encode.
    miner = SimMiner(settings, dataset, 1)
    master = clone(miner.params)
    digest = model_hash(master)
    miner.train(0, master)  # warm-up
    t0 = time.perf_counter()
    miner.produce(1, master, digest)
    miner_measured = time.perf_counter() - t0
    design = planning.Design(sequences_per_page=seq_page, merged_fraction=merged / (uids - 1), host_threads=1)
    p = planning.make_plan(
        settings, uids=uids - 1, hardware="cpu", link_gbit=10.0, design=design, rates=rates
    )
    va, mi = p["validator"], p["miner"]
    miner_pred = mi["breakdown_s"]["train"] + mi["breakdown_s"]["compress"]
    out = {
        "preset": settings.preset, "uids": uids, "scored": uids - 1, "measured_s": measured,
        "predicted_s": va["seconds_per_window"], "plan_vs_measured": va["seconds_per_window"] / measured,
        "stages_s": times, "predicted_breakdown_s": va["breakdown_s"], "sequences_per_page": seq_page,
        "miner_measured_s": miner_measured, "miner_predicted_s": miner_pred,
        "miner_plan_vs_measured": miner_pred / miner_measured, "steps_per_window": settings.train.steps_per_window,
        "merged": merged,
    }  # fmt: skip
    return out


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the rates are one thread's, and so is the check
    try:
        fit = build_settings("tiny", overrides={"train.threads": 1})
        log.info("scale: fitting rates on tiny")
        rates, raw = fit_rates(fit, uids=4 if quick else 16, repeats=1 if quick else 3)
        check_preset, uids = ("tiny", 5) if quick else ("small", 64)
        check = build_settings(check_preset, overrides={"train.threads": 1, "mechanism.host_threads": 1, **CHECK_PAGES,
                                                        "train.steps_per_window": 2 if quick else 10})  # fmt: skip
        result = check_window(check, rates, uids=uids, steps=2)
        large = large_matrix_rates(build_settings("7B"), uids=2 if quick else 8, repeats=1 if quick else 3)
        log.info("scale: host rates on one 4096 x 4096 matrix (7B's codec): %s", large)
    finally:
        torch.set_num_threads(threads)
    ratio = result["plan_vs_measured"]
    ok = 1 / TARGET <= ratio <= TARGET
    rows = [
        row(f"validator window, {check_preset}, {uids - 1} uids scored", result["measured_s"], "s",
            baseline=result["predicted_s"]),
        row("  plan_vs_measured (plan cpu / measured)", ratio, "x", target=f"within {TARGET}x", ok=ok),
        row(f"miner window, {check_preset}", result["miner_measured_s"], "s", baseline=result["miner_predicted_s"]),
        row("  miner plan_vs_measured", result["miner_plan_vs_measured"], "x", target=f"within {TARGET}x",
            ok=1 / TARGET <= result["miner_plan_vs_measured"] <= TARGET),
    ]  # fmt: skip
    import dataclasses

    headline = {"plan_vs_measured": ratio, "miner_plan_vs_measured": result["miner_plan_vs_measured"]}
    return {"rows": rows, "headline": headline, "rates": dataclasses.asdict(rates), "large_matrix": large, "fit": raw,
            "check": result, "quick": quick, **headline}  # fmt: skip
