"""`bistro bench mechanism`: what the mechanism keeps of centralized training, and what it costs.

1. Learning efficiency. Same model (`build_model(settings.model, seed)`), same seed, same tokens:
   (a) centralized: one `Trainer` on exactly the batches the N miners train on, interleaved, N×S
       optimizer steps of the same batch size per window;
   (b) the mechanism in process: N miners, each a persistent `Trainer` (AdamW state kept across
       windows, as `bistro.miner` does), train S steps from the master on their local pages;
       Δ = trained − master; `compress` with `ErrorFeedback`; `encode_delta` signed by the miner's
       sr25519 hotkey; the validator `decode_delta`s against `evaluator.expectation`, drops copies,
       `Evaluator.score`s (incentive = the previous window's `weights_from_averages`, as the chain
       would hand it back; uniform at first), `Evaluator.propose_update`s, and `master.apply_update`s.
       The production schedule is synchronous (`master.py`): deltas of window w, trained from θ_w,
       are scored against and merged into θ_w, giving θ_{w+1}. The one-window pipeline (scored
       against and applied to θ_{w+1}, so miners never wait) is measured beside it.
   Efficiency = (held-out loss drop of b) / (held-out loss drop of a); held-out pages are drawn
   from the whole corpus and exclude every page any miner trains on. Also in tokens: the tokens
   the centralized run needed to reach b's final loss over the tokens b used.
2. Compression ratio of the default codec: dense fp32 bytes / len(signed blob), on the blobs of (1).
3. Validator overhead: `Evaluator.score` for 8 uids over the bare `sequence_losses` passes that its
   scoring rule needs, on the same model and sequences, interleaved, medians.
4./5. Miner duty cycle and the 256-uid validator window: `bench/scale.py`.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

import bittensor_core
import torch

from .. import scoring
from ..config import Settings, replace
from ..data import Dataset
from ..data.pages import eval_pages, global_pages, local_pages
from ..delta import CODECS, DeltaRejected, ErrorFeedback, compress, decode_delta, encode_delta
from ..evaluator import Evaluator, Verdict, expectation
from ..master import apply_update
from ..miner import codec_context
from ..model import build_model, model_hash, sequence_losses, state_tensors
from ..training import Trainer

log = logging.getLogger("bistro.bench.mechanism")

Params = dict[str, torch.Tensor]

EFFICIENCY_TARGET = 0.8
OVERHEAD_TARGET = 1.2


@dataclass(frozen=True)
class Arm:
    """One way of running the mechanism."""

    codec: str
    compression: float
    pipelined: bool = False

    @property
    def label(self) -> str:
        size = "" if self.codec == "dense" else f" {self.compression:g}x"
        return f"{self.codec}{size}" + (" pipelined" if self.pipelined else "")


@dataclass(frozen=True)
class Plan:
    """How big the learning-efficiency run is."""

    miners: int
    windows: int
    steps: int
    """Optimizer steps per miner per window (the centralized run takes miners × steps)."""
    held_out: int
    """Held-out pages."""
    arms: tuple[Arm, ...]


def plan_for(settings: Settings, quick: bool) -> Plan:
    m = settings.mechanism
    default = Arm(m.codec, m.compression)
    if quick:
        arms = (default, dc_replace(default, pipelined=True))
        return Plan(miners=2, windows=2, steps=2, held_out=2, arms=arms)
    arms = (
        default,
        dc_replace(default, pipelined=True),
        Arm("dense", 1.0),
        Arm("mask", 30.0),
        Arm("mask", 100.0),
        Arm("mask", 300.0),
    )
    unique = tuple(dict.fromkeys(arms))  # the default may already be one of the sweep's arms
    return Plan(miners=4, windows=5, steps=settings.train.steps_per_window, held_out=8, arms=unique)


def clone(params: Params) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


def block_hash(window: int) -> str:
    """A stand-in for the hash of the window's last block (the chain's, in production)."""
    return hashlib.sha256(f"bench-block-{window}".encode()).hexdigest()


def keypair(uid: int) -> bittensor_core.Keypair:
    """A real sr25519 hotkey, the same every run."""
    return bittensor_core.Keypair.create_from_seed(hashlib.sha256(f"bench-hotkey-{uid}".encode()).digest())


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


# --- (a) centralized -------------------------------------------------------------------------------


def centralized(settings: Settings, dataset: Dataset, plan: Plan, held: torch.Tensor) -> dict[str, Any]:
    """One Trainer on the union of the miners' batches, interleaved, N×S steps a window."""
    bs, netuid = settings.train.batch_size, settings.chain.netuid
    model = build_model(settings.model, seed=settings.model.seed)
    trainer = Trainer(model, settings.train, settings.device)
    curve = [_loss(model, held, settings)]
    start = time.perf_counter()
    for w in range(plan.windows):
        per_miner = [
            batches(dataset.sequences(local_pages(netuid, uid, w, dataset.page_settings)), plan.steps, bs)
            for uid in range(plan.miners)
        ]
        # step j of miner i becomes step j*N + i: every miner's batches, round robin
        rows = torch.stack(per_miner, dim=1).reshape(-1, per_miner[0].shape[-1])
        trainer.train(rows, plan.steps * plan.miners)
        curve.append(_loss(model, held, settings))
        log.info("centralized window %d/%d: held-out loss %.4f", w + 1, plan.windows, curve[-1])
    tokens = plan.miners * plan.steps * bs * settings.model.sequence_length
    return {"curve": curve, "tokens_per_window": tokens, "seconds": time.perf_counter() - start}


def _loss(model: torch.nn.Module, sequences: torch.Tensor, settings: Settings) -> float:
    return float(sequence_losses(model, sequences, settings.train.eval_batch_size).mean())


# --- (b) the mechanism -------------------------------------------------------------------------------


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


def decode_all(
    settings: Settings, shapes: dict, window: int, digest: str, blobs: dict[int, tuple[str, bytes]]
) -> dict[int, Verdict]:
    """The validator's step 2 on blobs in hand: {uid: (hotkey, blob)} -> verdicts."""
    verdicts = {}
    for uid, (hotkey, blob) in sorted(blobs.items()):
        v = verdicts[uid] = Verdict(uid, uploaded=float(uid))
        try:
            v.delta = decode_delta(blob, expectation(settings, window, hotkey, digest, shapes)).delta
            v.verdict = "ok"
        except DeltaRejected as e:
            v.verdict = e.reason.value
            log.warning("window %d uid %d rejected: %s", window, uid, e)
    return verdicts


def mechanism(
    settings: Settings, dataset: Dataset, plan: Plan, arm: Arm, held: torch.Tensor
) -> dict[str, Any]:
    """N miners and one validator for `plan.windows` windows; the held-out loss after each."""
    s = replace(settings, **{"mechanism.codec": arm.codec, "mechanism.compression": arm.compression,
                             "train.steps_per_window": plan.steps})  # fmt: skip
    m = s.mechanism
    evaluator = Evaluator(s, build_model(s.model, seed=s.model.seed).to(s.device).eval(), dataset)
    current = clone(evaluator.params)  # θ_w: what miners train from
    following = clone(current)  # θ_{w+1} (pipelined only)
    miners = [SimMiner(s, dataset, uid) for uid in range(plan.miners)]
    weights: dict[int, float] = {}
    averages: dict[int, float] = {}
    curve = [_master_loss(evaluator, current, held)]
    wire_bytes: list[int] = []
    accepted = 0
    start = time.perf_counter()
    for w in range(plan.windows):
        digest = model_hash(current)
        blobs = {mi.uid: (mi.keypair.ss58_address, mi.produce(w, current, digest)) for mi in miners}
        wire_bytes += [len(b) for _, b in blobs.values()]
        verdicts = decode_all(s, evaluator.shapes, w, digest, blobs)
        evaluator.drop_copies(verdicts)
        target = following if arm.pipelined else current
        base, global_seqs = evaluator.score(w, block_hash(w), target, verdicts, weights)
        update, _ = evaluator.propose_update(target, verdicts, base, global_seqs)
        if arm.pipelined:
            current = clone(following)  # miners of window w+1 train from θ_{w+1}
        if update is not None:
            apply_update(target, update)  # pipelined: θ_{w+2}; sync: θ_{w+1}
            accepted += 1
        scores = {uid: v.score for uid, v in verdicts.items()}
        averages = scoring.update_averages(averages, scores, scores, m.ma_alpha)
        weights = scoring.weights_from_averages(averages, m.temperature, m.eligibility)
        curve.append(_master_loss(evaluator, target, held))  # the master holding every delta so far
        log.info(
            "%s window %d/%d: held-out loss %.4f, update %s, weights %s", arm.label, w + 1, plan.windows,
            curve[-1], "accepted" if update is not None else "refused",
            " ".join(f"{u}:{x:.2f}" for u, x in sorted(weights.items())),
        )  # fmt: skip
    params = sum(p.numel() for p in current.values())
    return {
        "curve": curve,
        "accepted_updates": accepted,
        "wire_bytes": statistics.mean(wire_bytes),
        "ratio": 4 * params / statistics.mean(wire_bytes),
        "seconds": time.perf_counter() - start,
    }


def _master_loss(evaluator: Evaluator, master: Params, held: torch.Tensor) -> float:
    evaluator.set_params(master)
    return evaluator.loss(held)


def tokens_efficiency(central: dict[str, Any], final_loss: float, windows: int) -> float | None:
    """Tokens the centralized run needed to reach `final_loss`, over the tokens the mechanism used
    (linear between windows); None if centralized never got that low (efficiency above 1)."""
    curve = central["curve"]
    for j in range(1, len(curve)):
        if curve[j] <= final_loss:
            frac = (curve[j - 1] - final_loss) / (curve[j - 1] - curve[j])
            return (j - 1 + frac) / windows
    return None


def learning(settings: Settings, dataset: Dataset, plan: Plan) -> dict[str, Any]:
    held_pages = held_out_pages(settings, dataset, plan)
    held = dataset.sequences(held_pages)
    log.info(
        "learning efficiency: %d miners x %d windows x %d steps; %d held-out pages (%d sequences); arms: %s",
        plan.miners, plan.windows, plan.steps, len(held_pages), len(held), ", ".join(a.label for a in plan.arms),
    )  # fmt: skip
    central = centralized(settings, dataset, plan, held)
    drop_central = central["curve"][0] - central["curve"][-1]
    arms = {}
    for arm in plan.arms:
        out = mechanism(settings, dataset, plan, arm, held)
        drop = out["curve"][0] - out["curve"][-1]
        out["efficiency"] = drop / drop_central
        out["tokens_efficiency"] = tokens_efficiency(central, out["curve"][-1], plan.windows)
        arms[arm.label] = out
        log.info("%s: efficiency %.3f, ratio %.0fx", arm.label, out["efficiency"], out["ratio"])
    return {
        "miners": plan.miners, "windows": plan.windows, "steps_per_window": plan.steps,
        "held_out_pages": held_pages, "centralized": central, "arms": arms,
    }  # fmt: skip


# --- 3. validator overhead ---------------------------------------------------------------------------


def overhead(settings: Settings, dataset: Dataset, blobs: dict[int, tuple[str, bytes]], master: Params,
             window: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    """`Evaluator.score` vs the bare forward passes its scoring rule needs, alternately, medians."""
    evaluator = Evaluator(settings, build_model(settings.model, seed=settings.model.seed).eval(), dataset)
    digest = model_hash(master)
    verdicts = decode_all(settings, evaluator.shapes, window, digest, blobs)
    uids = [u for u, v in verdicts.items() if v.verdict == "ok"]
    bh = block_hash(window)
    ps, netuid = dataset.page_settings, settings.chain.netuid
    own = {u: dataset.sequences(eval_pages(netuid, u, window, bh, ps)) for u in uids}
    glob = dataset.sequences(global_pages(netuid, window, bh, ps))
    model, bs = evaluator.model, settings.train.eval_batch_size

    def score() -> None:
        evaluator.score(window, bh, master, verdicts, {})

    def bare() -> None:  # base, one shared "with" pass, one "without" pass per uid
        sequence_losses(model, glob, bs)
        sequence_losses(model, torch.cat([own[u] for u in uids] + [glob]), bs)
        for u in uids:
            sequence_losses(model, torch.cat([own[u], glob]), bs)

    def own_only() -> None:  # the literal count: 2 per uid on its eval pages, the global once
        sequence_losses(model, glob, bs)
        for u in uids:
            sequence_losses(model, own[u], bs)
            sequence_losses(model, own[u], bs)

    times: dict[str, list[float]] = {"score": [], "bare": [], "own_only": []}
    fns = {"score": score, "bare": bare, "own_only": own_only}
    score()  # warm-up: page cache, allocator
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
    }  # fmt: skip


# --- the suite ---------------------------------------------------------------------------------------


def _row(name: str, value: float | None, unit: str, *, baseline: float | None = None, target: str | None = None,
         ok: bool | None = None) -> dict[str, Any]:  # fmt: skip
    ratio = None if baseline in (None, 0) or value is None else value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            "ok": ok}  # fmt: skip


def run(settings: Settings, *, quick: bool) -> dict:
    from . import scale

    dataset = Dataset.open(settings)
    plan = plan_for(settings, quick)
    learn = learning(settings, dataset, plan)
    default = plan.arms[0].label
    central = learn["centralized"]
    drop_central = central["curve"][0] - central["curve"][-1]
    rows = [_row("centralized held-out loss drop", drop_central, "nats")]
    for label, arm in learn["arms"].items():
        is_default = label == default
        ok = (arm["efficiency"] >= EFFICIENCY_TARGET and arm["ratio"] >= 100) if is_default else None
        rows.append(_row(f"learning efficiency {label}", arm["efficiency"], "x", target=">= 0.8 at >= 100x"
                         if is_default else None, ok=ok))  # fmt: skip
        rows.append(_row(f"  tokens efficiency {label}", arm["tokens_efficiency"], "x"))
        rows.append(_row(f"  compression {label}", arm["ratio"], "x"))

    synthetic = scale.synthetic_blobs(
        settings, dataset, count=2 if quick else 8, window=plan.windows, steps=plan.steps
    )
    over = overhead(
        settings, dataset, synthetic["blobs"], synthetic["master"], plan.windows, 2 if quick else 5
    )
    rows.append(
        _row(
            f"validator score / bare forwards ({over['uids']} uids)",
            over["score_s"],
            "s",
            baseline=over["bare_s"],
        )
    )
    rows.append(_row("  fastest score / fastest bare", over["overhead_of_fastest"], "x", target="<= 1.2",
                     ok=over["overhead_of_fastest"] <= OVERHEAD_TARGET))  # fmt: skip
    rows.append(_row("  score / own-page forwards only", over["score_s"], "s", baseline=over["own_only_s"]))

    duty = scale.duty_cycle(settings, dataset, quick=quick)
    rows += duty.pop("rows")
    window = scale.scale_window(settings, dataset, quick=quick, steps=plan.steps)
    rows += window.pop("rows")
    headline = {
        "learning_efficiency": learn["arms"][default]["efficiency"],
        "learning_efficiency_pipelined": learn["arms"].get(f"{default} pipelined", {}).get("efficiency"),
        "tokens_efficiency": learn["arms"][default]["tokens_efficiency"],
        "compression_ratio": learn["arms"][default]["ratio"],
        "validator_overhead": over["overhead_of_fastest"],
        "validator_overhead_median": over["overhead"],
        "miner_duty_cycle": duty["busy_fraction"],
        "miner_duty_cycle_wall": duty["wall_fraction"],
        "scale_seconds_per_window_256": window["seconds"],
        "scale_peak_memory_mb": window["peak_rss_mb"],
        "scale_uids_scored": window["scored"],
        **{f"learning_efficiency[{label}]": arm["efficiency"] for label, arm in learn["arms"].items()},
    }  # fmt: skip
    return {"rows": rows, "headline": headline, "learning": learn, "validator_overhead": over,
            "duty_cycle": duty, "scale": window, "quick": quick}  # fmt: skip
