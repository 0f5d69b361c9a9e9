"""`bistro bench learning [--ablation]`: does the network learn nearly as much as one machine would?

Three arms from the same initial model (`build_model(settings.model, seed)`) on the same tokens:

- **network**: N miners (`SimMiner`: a persistent `Trainer` each, AdamW state kept across windows)
  train S steps a window from the master on their own pages; Δ = trained − master; `compress` with
  error feedback (the codec of `settings.mechanism`); `encode_delta` signed by a real hotkey; the
  validator `decode_delta`s, `drop_copies`, `Evaluator.score`s (incentive = the previous window's
  weights), `Evaluator.propose_update`s (merge rule and acceptance test of production) and
  `master.apply_update`s. The production, synchronous schedule: deltas of window w go into θ_w.
- **sequential**: one `Trainer` steps through exactly the miners' batches, interleaved, N×S steps
  of one miner's batch size a window: `learning_efficiency`.
- **ddp**: one `Trainer` with N× the batch, S steps a window, step j being the N miners' step-j
  batches, the same learning-rate schedule as a miner: `learning_efficiency_ddp`.

Every arm's held-out loss is measured after every window, on pages of the whole corpus that no
miner trains on in the run. Efficiency = (loss drop of the network) / (loss drop of a baseline),
both read at the **read-out window** of that baseline: the last window w at which the baseline still
learns, i.e. its drop over the last quarter of windows 0..w is at least `STILL_LEARNS` (10%) of its
whole drop over 0..w. A ratio of drops taken after the baseline has flattened says little: the
network catches up while the baseline stands still. `baseline_last_quarter_fraction` is that
fraction for the whole run. `tokens_efficiency`: tokens the sequential baseline needed to reach the
network's loss at the read-out window (linear between windows), over the tokens the network used.

The default plan steps each miner on 2 sequences (`Plan.batch_size`), so the N miners together take
one preset batch a step. `baseline_ddp_tokens_efficiency` is the data-parallel baseline's own tokens
efficiency against the sequential one: what averaging N batches a step can reach at all on the plan.

All arms warm the learning rate up over `min(train.warmup_steps, S)` steps: a warm-up longer than a
miner's first window would hand the baselines (N× the steps a window) a head start that says nothing
about the mechanism.

`--ablation` runs the network arm once more per row of `ABLATIONS`, each changing one setting from
the default, on the same plan and the same baselines.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import sample, scoring
from ..config import Settings, replace
from ..data import Dataset
from ..data.pages import local_pages
from ..delta import Delta, to_dense
from ..evaluator import Evaluator, Verdict
from ..master import MasterCodec, apply_update, update_to_tensors
from ..model import Params, build_model, model_hash, state_tensors
from ..training import Trainer
from .common import Plan, SimMiner, block_hash, clone
from .common import row as _row
from .mechanism import batches, decode_all, held_out_pages

log = logging.getLogger("bistro.bench.learning")


STILL_LEARNS = 0.1
"""A baseline still learns at window w if its drop over the last quarter of 0..w is at least this
fraction of its drop over 0..w."""
TARGETS = {"learning_efficiency": 0.8, "learning_efficiency_ddp": 0.95, "tokens_efficiency": 0.5,
           "compression_ratio": 146.0}  # fmt: skip

ABLATIONS: dict[str, dict[str, Any]] = {
    "topk2 64/4096 (the large presets' codec)": {
        "overrides": {"mechanism.codec": "topk2", "mechanism.compression": 64.0}
    },
    "lowrank rank 2": {"overrides": {"mechanism.rank": 2}},
    "merge sum": {"overrides": {"mechanism.merge": "sum"}},
    "plain error feedback": {"overrides": {"mechanism.ef_decay": 1.0}},
    "topk 8-bit 1/100": {"overrides": {"mechanism.codec": "topk", "mechanism.compression": 100.0}},
    "outer nesterov 0.7/0.9": {"outer": (0.7, 0.9)},
    "acceptance test off": {"accept_all": True},
    "dense": {"overrides": {"mechanism.codec": "dense"}},
    "pipelined": {"pipelined": True},
    "v1 design: topk 1/100, sum, plain ef": {
        "overrides": {
            "mechanism.codec": "topk",
            "mechanism.compression": 100.0,
            "mechanism.merge": "sum",
            "mechanism.ef_decay": 1.0,
        }
    },
}
"""Ablation rows: label -> the one setting (dotted path) or bench option it changes."""


def bandwidth_arms(miners: int) -> dict[str, dict[str, Any]]:
    """How θ_{w+1} reaches followers (`--bandwidth`), each with the bytes a follower downloads a
    window beside its learning: the raw union of the merged deltas (int64 index + fp32 value an
    entry), the merge re-compressed with the codec plus the publisher's error feedback (one
    delta-sized object), and a bounded merge set (the top quarter of the paid uids by merge weight,
    whose deltas followers fetch and merge themselves)."""
    peers = max(1, miners // 4)
    return {
        "raw union": {"overrides": {"mechanism.master_codec": "sparse"}},
        "recompressed": {"overrides": {"mechanism.master_codec": "same"}},
        "recompressed, residual decay 0.95": {
            "overrides": {"mechanism.master_codec": "same", "mechanism.master_ef_decay": 0.95}
        },
        f"merge set {peers} of {miners}": {
            "overrides": {"mechanism.master_codec": "sparse", "mechanism.merge_peers": peers}
        },
    }


@dataclass(frozen=True)
class Arm:
    """One way of running the network: setting overrides plus bench-only options."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    accept_all: bool = False
    """Apply the proposed update even when the acceptance test refuses it."""
    pipelined: bool = False
    """Score and merge the deltas of window w into θ_{w+1} (miners never wait; not production)."""
    merge_paid: bool = False
    """With a sample smaller than the network (`mechanism.max_uids_per_window`): merge the delta of
    every paid uid (weight > 0) each window, scored in it or not, at its merge weight; an unscored one
    counts with its moving average as its score. What sampling alone throws away (not production)."""
    outer: tuple[float, float] | None = None
    """(lr, momentum) of a Nesterov outer step on the master (DiLoCo), applied to each accepted update
    U as to a negative pseudo-gradient: v <- mu v + U; θ <- θ + lr (U + mu v). Not production."""


SAMPLE_16 = 4
"""Uids scored a window in the 16-miner arm: 4 of 16 keeps a subnet's ratio of uids to scored
slots (48 miners with 12 scored, 256 with 64)."""
NEW_RULES = f"sampled {SAMPLE_16} of 16, recompressed"
"""The 16-miner arm of `learning_efficiency_ddp_16`: sampled scoring and the bounded update."""


def sixteen_arms() -> list[Arm]:
    """16 miners: every bandwidth design with every uid scored, then the new rules (a sample of
    `SAMPLE_16` scored and merged a window, the recompressed update), then the same sample with
    every paid uid merged (`Arm.merge_paid`)."""
    arms = [Arm(label, **spec) for label, spec in bandwidth_arms(16).items() if "decay" not in label]
    sampled = {"mechanism.master_codec": "same", "mechanism.max_uids_per_window": SAMPLE_16}
    arms.append(Arm(NEW_RULES, overrides=sampled))
    arms.append(Arm(f"sampled {SAMPLE_16} of 16, every paid uid merged (not production)", overrides=sampled,
                    merge_paid=True))  # fmt: skip
    return arms


def plan_16(quick: bool, windows: int = 0) -> Plan:
    """16 miners under the new rules (`--bandwidth`): the default plan's steps and batch a miner."""
    if quick:
        return Plan(miners=16, windows=windows or 2, steps=2, held_out=2, batch_size=2)
    return Plan(miners=16, windows=windows or 12, steps=5, held_out=8, batch_size=2)


def plan_for(settings: Settings, quick: bool) -> Plan:
    if quick:
        return Plan(miners=2, windows=3, steps=2, held_out=2)
    # 4 miners x 5 steps x 48 windows at 2 sequences a miner step: together one preset batch (8) a
    # step, as one sequential step is. At the preset's 8 a miner (32 a step together) the data-parallel
    # baseline itself reaches only 0.46 of the sequential baseline's tokens at the read-out: the
    # combined batch is above what early training can use, and `tokens_efficiency` would measure
    # that, not the mechanism (docs/performance.md, "The learning plan's batch"). CPU: see docs/performance.md.
    return Plan(miners=4, windows=48, steps=5, held_out=8, batch_size=2)


def bench_settings(settings: Settings, plan: Plan) -> Settings:
    """The plan's steps a window and batch, and a warm-up no longer than one miner window."""
    warmup = min(settings.train.warmup_steps, plan.steps)
    batch = plan.batch_size or settings.train.batch_size
    return replace(settings, **{"train.steps_per_window": plan.steps, "train.warmup_steps": warmup,
                                "train.batch_size": batch})  # fmt: skip


def _loss(evaluator: Evaluator, params: Params, held: torch.Tensor) -> float:
    evaluator.set_params(params)
    return evaluator.loss(held)


def window_batches(settings: Settings, dataset: Dataset, plan: Plan, window: int) -> torch.Tensor:
    """[N, S, batch, L]: the rows miner i steps through in window w (what `Trainer.train` cycles)."""
    bs, netuid, ps = settings.train.batch_size, settings.chain.netuid, dataset.page_settings
    return torch.stack([
        batches(dataset.sequences(local_pages(netuid, uid, window, ps)), plan.steps, bs)
        for uid in range(plan.miners)
    ])  # fmt: skip


# --- baselines -------------------------------------------------------------------------------------


def sequential(settings: Settings, dataset: Dataset, plan: Plan, evaluator: Evaluator,
               held: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """One Trainer on the miners' batches, interleaved (step j of miner i is step j*N + i)."""
    model = build_model(settings.model, seed=settings.model.seed)
    trainer = Trainer(model, settings.train, settings.device)
    return _baseline(
        "sequential", settings, dataset, plan, evaluator, held, trainer, plan.miners * plan.steps
    )


def ddp(settings: Settings, dataset: Dataset, plan: Plan, evaluator: Evaluator,
        held: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """One Trainer with N× the batch, S steps a window: each step averages the N miners' step-j
    gradients, as data-parallel training over N machines would."""
    big = replace(settings, **{"train.batch_size": plan.miners * settings.train.batch_size})
    model = build_model(settings.model, seed=settings.model.seed)
    trainer = Trainer(model, big.train, settings.device)
    return _baseline("ddp", settings, dataset, plan, evaluator, held, trainer, plan.steps)


def _baseline(name: str, settings: Settings, dataset: Dataset, plan: Plan, evaluator: Evaluator,
              held: torch.Tensor, trainer: Trainer, steps: int) -> dict[str, Any]:  # fmt: skip
    """`steps` optimizer steps a window over the N miners' batches, step j's side by side."""
    params = state_tensors(trainer.model)
    curve = [_loss(evaluator, params, held)]
    start = time.process_time()
    for w in range(plan.windows):
        b = window_batches(settings, dataset, plan, w)  # [N, S, bs, L]
        trainer.train(
            b.transpose(0, 1).reshape(-1, b.shape[-1]), steps
        )  # [S*N*bs, L], step j's rows together
        curve.append(_loss(evaluator, params, held))
        log.info("%s window %d/%d: held-out loss %.4f", name, w + 1, plan.windows, curve[-1])
    return {"curve": curve, "cpu_seconds": time.process_time() - start}


# --- the network -----------------------------------------------------------------------------------


def network(settings: Settings, dataset: Dataset, plan: Plan, held: torch.Tensor, arm: Arm) -> dict[str, Any]:
    """N miners and one validator; the held-out loss of the master after each window."""
    s = replace(settings, **arm.overrides) if arm.overrides else settings
    m = s.mechanism
    evaluator = Evaluator(s, build_model(s.model, seed=s.model.seed).to(s.device).eval(), dataset)
    master = clone(evaluator.params)  # θ_w: what miners train from
    following = clone(master)  # θ_{w+1}: where pipelined deltas go
    miners = [SimMiner(s, dataset, uid) for uid in range(plan.miners)]
    weights: dict[int, float] = {}
    averages: dict[int, float] = {}
    curve = [_loss(evaluator, master, held)]
    wire, refused, refused_good = [], 0, 0
    follower_bytes: list[int] = []
    merged_uids: list[int] = []
    master_codec = MasterCodec.for_settings(s, evaluator.shapes)
    momentum: Params = {}
    start = time.process_time()
    for w in range(plan.windows):
        digest = model_hash(master)
        blobs = {mi.uid: (mi.keypair.ss58_address, mi.produce(w, master, digest)) for mi in miners}
        wire += [len(b) for _, b in blobs.values()]
        drawn = scored_uids(s, w, sorted(blobs))
        verdicts = decode_all(s, evaluator.shapes, w, digest, {u: blobs[u] for u in drawn})
        target = following if arm.pipelined else master
        evaluator.drop_copies(verdicts, w, block_hash(w), target)
        base, global_seqs = evaluator.score(w, block_hash(w), target, verdicts, weights)
        scores = {uid: v.score for uid, v in verdicts.items()}
        if arm.merge_paid:
            merge_paid_uids(s, evaluator, w, digest, blobs, verdicts, weights, averages)
        recompress = None
        if master_codec is not None:  # the bench's master is one lineage: the residual always holds
            master_codec.start("bench")
            recompress = lambda u, w=w: master_codec.encode(u, w)  # noqa: E731
        update, info = evaluator.propose_update(target, verdicts, base, global_seqs, None, recompress)
        merged_uids.append(len(info["merged_uids"]))
        if master_codec is not None:
            if update is not None:
                sent = master_codec.commit(update, "bench")
                follower_bytes.append(sum(t.numel() * t.element_size() for t in sent.values()))
            else:
                master_codec.discard()
                follower_bytes.append(0)
        elif m.merge_peers:  # followers fetch the merge set's deltas and merge them themselves
            follower_bytes.append(sum(len(blobs[u][1]) for u in info["merged_uids"]) if update else 0)
        else:  # the raw union, as `Publisher.update` writes it
            tensors = update_to_tensors(update) if update is not None else {}
            follower_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        if update is None and evaluator.refused is not None:
            refused += 1
            trial = clone(target)
            apply_update(trial, evaluator.refused)
            refused_good += int(_loss(evaluator, trial, held) < _loss(evaluator, target, held))
            if arm.accept_all:
                update = evaluator.refused
        if arm.pipelined:
            master = clone(following)
        if update is not None and arm.outer is not None:
            update = outer_step(update, momentum, evaluator.shapes, *arm.outer)
        if update is not None:
            apply_update(target, update)
        # a uid is judged in the windows it is drawn in; the others keep their averages
        averages = {**averages, **scoring.update_averages(averages, scores, scores, m.ma_alpha)}
        weights = scoring.weights_from_averages(averages, m.temperature, m.eligibility)
        curve.append(_loss(evaluator, target, held))  # the master holding every update so far
        log.info("%s window %d/%d: held-out loss %.4f, update %s", arm.label, w + 1, plan.windows, curve[-1],
                 "applied" if update is not None else "refused")  # fmt: skip
    params = sum(p.numel() for p in master.values())
    mean_bytes = statistics.mean(wire)
    return {
        "curve": curve, "wire_bytes": mean_bytes, "ratio": 4 * params / mean_bytes,
        "refused_updates": refused, "refused_good_updates": refused_good,
        # tensor bytes a follower downloads a window to reach θ_{w+1} (mean over accepted windows;
        # the signed object adds a header of a few KiB)
        "follower_bytes_per_window": statistics.mean([b for b in follower_bytes if b] or [0]),
        "follower_bytes_max": max(follower_bytes or [0]),
        "merged_uids_per_window": statistics.mean(merged_uids or [0]),
        "scored_uids_per_window": min(m.max_uids_per_window, plan.miners),
        "master_codec": m.master_codec, "merge_peers": m.merge_peers,
        "cpu_seconds": time.process_time() - start,
    }  # fmt: skip


def scored_uids(settings: Settings, window: int, uids: list[int]) -> list[int]:
    """The window's scored sample (`sample.scored_sample`, as the validator draws it, on the
    bench's stand-in seed hashes); every uid when the network is no larger than the sample."""
    size = settings.mechanism.max_uids_per_window
    if len(uids) <= size:
        return uids
    hashes = {x: block_hash(x) for x in sample.hash_windows(window)}
    return sample.scored_sample(settings.chain.netuid, window, hashes, uids, size)


def merge_paid_uids(
    settings: Settings, evaluator: Evaluator, window: int, digest: str, blobs: dict[int, tuple[str, bytes]],
    verdicts: dict[int, Verdict], weights: dict[int, float], averages: dict[int, float],
) -> None:  # fmt: skip
    """`Arm.merge_paid`: the paid uids the sample left out join `verdicts` as `ok`, their moving
    average as their score; every merge weight is then taken again over the larger set."""
    extra = {u: blobs[u] for u in blobs if u not in verdicts and weights.get(u, 0.0) > 0}
    for uid, v in decode_all(settings, evaluator.shapes, window, digest, extra).items():
        if v.verdict == "ok":
            v.score = float(averages.get(uid, 0.0))
            verdicts[uid] = v
    valid = [u for u, v in verdicts.items() if v.verdict == "ok"]
    for uid, m in scoring.merge_weights(weights, valid).items():
        verdicts[uid].merge_weight = m


def outer_step(update: Delta, momentum: Params, shapes: dict, lr: float, mu: float) -> Delta:
    """DiLoCo's Nesterov outer step on a merged update (dense): v <- mu v + U; step = lr (U + mu v)."""
    dense = to_dense(update, shapes)
    for name, u in dense.items():
        v = momentum.setdefault(name, torch.zeros_like(u))
        v.mul_(mu).add_(u)
        dense[name] = lr * (u + mu * v)
    return dense


# --- read-out --------------------------------------------------------------------------------------


def last_quarter_fraction(curve: list[float], upto: int) -> float:
    """The baseline's drop over the last quarter of windows 0..upto, over its drop over 0..upto."""
    whole = curve[0] - curve[upto]
    if whole <= 0:
        return 0.0
    return (curve[upto - upto // 4] - curve[upto]) / whole if upto >= 4 else 1.0


def readout_window(curve: list[float]) -> int:
    """The last window at which the baseline still learns (`STILL_LEARNS`); at least 4."""
    windows = len(curve) - 1
    for w in range(windows, 0, -1):
        if last_quarter_fraction(curve, w) >= STILL_LEARNS:
            return w
    return min(windows, 4)


def efficiency(net: list[float], base: list[float], at: int) -> float:
    drop = base[0] - base[at]
    return (net[0] - net[at]) / drop if drop > 0 else float("nan")


def tokens_efficiency(net: list[float], base: list[float], at: int) -> float | None:
    """Windows of the baseline needed to reach the network's loss at `at` (linear between windows),
    over `at`: with the same tokens a window, the ratio of tokens. None if the baseline never got
    that low in the run."""
    target = net[at]
    for j in range(1, len(base)):
        if base[j] <= target:
            frac = (base[j - 1] - target) / (base[j - 1] - base[j])
            return (j - 1 + max(0.0, frac)) / at
    return None


def summarize(net: dict[str, Any], seq: list[float], dp: list[float]) -> dict[str, Any]:
    curve = net["curve"]
    at_seq, at_ddp = readout_window(seq), readout_window(dp)
    last = len(curve) - 1
    return {
        "learning_efficiency": efficiency(curve, seq, at_seq),
        "learning_efficiency_ddp": efficiency(curve, dp, at_ddp),
        "tokens_efficiency": tokens_efficiency(curve, seq, at_seq),
        "tokens_efficiency_ddp": tokens_efficiency(curve, dp, at_ddp),
        "readout_window": at_seq, "readout_window_ddp": at_ddp,
        "learning_efficiency_final": efficiency(curve, seq, last),
        "learning_efficiency_ddp_final": efficiency(curve, dp, last),
        "tokens_efficiency_final": tokens_efficiency(curve, seq, last),
    }  # fmt: skip


# --- the suite -------------------------------------------------------------------------------------


def learning(settings: Settings, plan: Plan, arms: list[Arm]) -> dict[str, Any]:
    dataset = Dataset.open(settings)
    s = bench_settings(settings, plan)
    held_pages = held_out_pages(s, dataset, plan)
    held = dataset.sequences(held_pages)
    log.info("learning: %d miners x %d windows x %d steps, warm-up %d; %d held-out pages (%d sequences)",
             plan.miners, plan.windows, plan.steps, s.train.warmup_steps, len(held_pages), len(held))  # fmt: skip
    evaluator = Evaluator(s, build_model(s.model, seed=s.model.seed).eval(), dataset)
    seq = sequential(s, dataset, plan, evaluator, held)
    dp = ddp(s, dataset, plan, evaluator, held)
    out: dict[str, Any] = {}
    for arm in arms:
        net = network(s, dataset, plan, held, arm)
        net.update(summarize(net, seq["curve"], dp["curve"]))
        out[arm.label] = net
        log.info("%s: efficiency %.3f (ddp %.3f), tokens %s, ratio %.1fx", arm.label, net["learning_efficiency"],
                 net["learning_efficiency_ddp"], net["tokens_efficiency"], net["ratio"])  # fmt: skip
    return {
        "miners": plan.miners, "windows": plan.windows, "steps_per_window": plan.steps,
        "batch_size": s.train.batch_size,
        # The data-parallel baseline's own tokens efficiency against the sequential one: what any
        # arm that averages N batches a step can reach on this plan.
        "ddp_tokens_efficiency": tokens_efficiency(dp["curve"], seq["curve"], readout_window(seq["curve"])),
        "warmup_steps": s.train.warmup_steps, "held_out_pages": held_pages,
        "baseline_last_quarter_fraction": last_quarter_fraction(seq["curve"], plan.windows),
        "baseline_last_quarter_fraction_ddp": last_quarter_fraction(dp["curve"], plan.windows),
        "sequential": seq, "ddp": dp, "arms": out,
    }  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> Path:
    """Held-out loss of every arm per window, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(result["sequential"]["curve"], label="sequential (N×S steps)", color="black", lw=2)
    ax.plot(result["ddp"]["curve"], label="data parallel (N× batch)", color="gray", lw=2, ls="--")
    for label, arm in result["arms"].items():
        ax.plot(arm["curve"], label=f"network: {label} ({arm['ratio']:.0f}x)", lw=1.2)
    ax.set_xlabel("window")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(f"{result['miners']} miners x {result['steps_per_window']} steps a window, "
                 f"{result.get('batch_size', '?')} sequences a miner step")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(
    settings: Settings, *, quick: bool, ablation: bool = False, bandwidth: bool = False, windows: int = 0
) -> dict:
    """The suite. `bandwidth`: the arms of `bandwidth_arms` on the plan, then 16 miners (`plan_16`)
    under the new rules (`learning_efficiency_ddp_16`) beside the raw union and a merge set; `windows`
    overrides the plans' windows (a shorter run, say so when quoting it)."""
    plan = plan_for(settings, quick)
    if windows:
        plan = Plan(plan.miners, windows, plan.steps, plan.held_out, plan.batch_size)
    arms = [Arm("default")]
    if ablation:
        arms += [Arm(label, **spec) for label, spec in ABLATIONS.items()]
    if bandwidth:
        arms += [Arm(label, **spec) for label, spec in bandwidth_arms(plan.miners).items()]
    result = learning(settings, plan, arms)
    sixteen = None
    if bandwidth:
        p16 = plan_16(quick, windows)
        sixteen = learning(settings, p16, sixteen_arms())
        result["sixteen"] = sixteen
    name = "learning_ablation.png" if ablation else "learning.png"
    result["png"] = str(plot(result, settings.home / "bench" / name))
    default = result["arms"]["default"]
    rows = [
        _row("sequential held-out loss drop", result["sequential"]["curve"][0] - result["sequential"]["curve"][-1],
             "nats"),
        _row("ddp held-out loss drop", result["ddp"]["curve"][0] - result["ddp"]["curve"][-1], "nats"),
        _row("baseline drop, last quarter / whole", result["baseline_last_quarter_fraction"], "x"),
    ]  # fmt: skip
    for label, arm in result["arms"].items():
        rows += _arm_rows(label, arm, is_default=label == "default")
    headline = {
        **{key: default[key] for key in ("learning_efficiency", "learning_efficiency_ddp", "tokens_efficiency")},
        "compression_ratio": default["ratio"],
        "baseline_last_quarter_fraction": result["baseline_last_quarter_fraction"],
        "learning_readout_window": default["readout_window"],
        "learning_readout_window_ddp": default["readout_window_ddp"],
        "learning_efficiency_final": default["learning_efficiency_final"],
        "learning_efficiency_ddp_final": default["learning_efficiency_ddp_final"],
        "learning_efficiency_pipelined": result["arms"].get("pipelined", {}).get("learning_efficiency"),
        "learning_windows": plan.windows,
        "learning_batch_size": result["batch_size"],
        "baseline_ddp_tokens_efficiency": result["ddp_tokens_efficiency"],
        "learning_cpu_seconds": result["sequential"]["cpu_seconds"] + result["ddp"]["cpu_seconds"]
        + default["cpu_seconds"],
        "follower_bytes_per_window": default["follower_bytes_per_window"],
    }  # fmt: skip
    if sixteen is not None:
        new_rules = sixteen["arms"][NEW_RULES]
        headline["learning_efficiency_ddp_16"] = new_rules["learning_efficiency_ddp_final"]
        headline["learning_windows_16"] = sixteen["windows"]
        headline["bandwidth"] = {
            f"{n} miners, {label}": {
                "learning_efficiency_ddp_final": arm["learning_efficiency_ddp_final"],
                "learning_efficiency_ddp": arm["learning_efficiency_ddp"],
                "follower_bytes_per_window": arm["follower_bytes_per_window"],
                "merged_uids_per_window": arm["merged_uids_per_window"],
            }
            for n, res in ((plan.miners, result), (16, sixteen))
            for label, arm in res["arms"].items()
        }
        for label, arm in sixteen["arms"].items():
            rows += _arm_rows(f"{label} (16 miners)", arm, is_default=False)
    return {"rows": rows, "headline": headline, "learning": result, "quick": quick}


def _arm_rows(label: str, arm: dict[str, Any], is_default: bool) -> list[dict[str, Any]]:
    def row(key: str, name: str, value: float | None, unit: str = "x") -> dict[str, Any]:
        target = TARGETS.get(key) if is_default else None
        ok = None if target is None or value is None else value >= target
        return _row(
            f"{name} {label}", value, unit, target=None if target is None else f">= {target:g}", ok=ok
        )

    return [
        row("learning_efficiency", "learning efficiency (vs sequential)", arm["learning_efficiency"]),
        row("learning_efficiency_ddp", "  learning efficiency vs ddp", arm["learning_efficiency_ddp"]),
        row("tokens_efficiency", "  tokens efficiency", arm["tokens_efficiency"]),
        row("compression_ratio", "  compression", arm["ratio"]),
        row("", "  refused updates", float(arm["refused_updates"]), "windows"),
        row("", "  follower download", float(arm["follower_bytes_per_window"]), "bytes/window"),
    ]
