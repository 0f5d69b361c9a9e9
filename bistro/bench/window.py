"""The network-level parts of `bistro bench mechanism`: miner duty cycle and a 256-uid validator window.

4. Miner duty cycle: the real `bistro.miner.Miner` against a `LocalChain` in a temporary directory,
   local buckets, and a master published ahead by `master.Publisher` (a real sparse update every
   window, so each sync replays and hash-checks one update, as a follower does). A subclass only
   records times around the real methods. Per window: busy = from the step's start to the upload's
   completion (sync, train, compress, encode, upload); the headline is the fraction of busy time
   spent inside optimizer steps (`TrainStats.step_seconds`). The fraction of wall time is reported
   too; it is set by how many steps an operator fits into a window, not by the code.
5. Scale: 256 registered uids (the validator and 255 miners, Bittensor's maximum) on a `LocalChain`,
   one signed delta per miner pre-generated into its own committed local bucket, then one real
   `Validator.evaluate` window: fetch (gather + decode_delta for every uid), drop copies,
   `Evaluator.score`, the master step and publication, moving averages, set_weights. If the parts
   measured on the full set project past the `tiny` window (blocks_per_window × the chain's block
   time), the window runs with `max_uids_per_window` set to the largest scored sample that fits,
   and says so. Peak memory: resident set size sampled during the window.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .. import protocol
from ..chain.local import LocalChain
from ..config import Settings, protocol_settings, replace
from ..data import Dataset
from ..delta import Sparse, delta_norm, similarity
from ..evaluator import Evaluator
from ..manifest import delta_sha256
from ..master import MasterCodec, Publisher, apply_update
from ..miner import Miner
from ..model import build_model, model_hash, state_tensors
from ..storage import open_store
from ..validator import Validator
from ..wallet import open_wallet
from .common import SimMiner, clone, keypair, row, sign_delta

log = logging.getLogger("bistro.bench.window")

DUTY_TARGET = 0.9


def _network(settings: Settings, tmp: Path, **extra: Any) -> Settings:
    """Settings for a throwaway embedded network under `tmp`."""
    return replace(
        settings,
        **{
            "chain.network": "embedded", "chain.chain_endpoint": str(tmp / "chain.sqlite"),
            "chain.weights_rate_limit": 0, "chain.immunity_period": 10_000,
            "chain.tempo": settings.mechanism.blocks_per_window, "storage.backend": "local",
            "storage.root": str(tmp), "storage.bucket": "", "wallet.path": str(tmp / "wallets"), **extra,
        },
    )  # fmt: skip


def _join(chain: LocalChain, kp: Any, bucket: str, stake: float = 0.0) -> int:
    """Register a bare hotkey (LocalChain reads only `wallet.hotkey`), commit its bucket."""
    wallet = SimpleNamespace(hotkey=kp)
    uid = chain.register(wallet)
    chain.commit(wallet, bucket)
    if stake:
        chain.add_stake(kp.ss58_address, stake)
    return uid


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the process's peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """Samples the resident set size in a thread while a block runs."""

    def __enter__(self) -> RssPeak:
        self.before = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


# --- synthetic signed deltas -------------------------------------------------------------------------


def synthetic_blobs(settings: Settings, dataset: Dataset, count: int, window: int, steps: int,
                    uids: list[int] | None = None, noise: float = 0.5,
                    distinct_low_rank: bool = False) -> dict[str, Any]:  # fmt: skip
    """Signed deltas for `count` uids, trained from the initial master: two real miners train one
    window each; uid i sends real delta (i mod 2) plus its own noise of `noise` times its norm
    (0.5: two uids of one real delta at cosine 0.8, a near-copy pair by `copy_threshold`, which the
    mechanism suite's window pays for; 2: at 0.2) and every blob goes through the real
    compress / encode path. lowrank compares the deltas' rank-1 parts too, and added noise leaves
    a matrix's top direction that of the real delta: `distinct_low_rank` gives each uid's noise a
    rank-1 part of its own that dominates it (no near-copy group at all).
    Returns {"blobs": {uid: (hotkey, blob)}, "master", "digest"}."""
    uids = list(range(count)) if uids is None else uids
    master = state_tensors(build_model(settings.model, seed=settings.model.seed))
    master = clone(master)
    digest = model_hash(master)
    trained = replace(settings, **{"train.steps_per_window": steps})
    real = [SimMiner(trained, dataset, uid).train(window, master) for uid in range(min(2, count))]
    norms = [torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())) for delta in real]
    blobs = {}
    for n, uid in enumerate(uids):
        base, norm = real[n % len(real)], float(norms[n % len(real)])
        g = torch.Generator().manual_seed(protocol.seed("bench-noise", uid, window))
        own = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
        if distinct_low_rank:  # a rank-1 part of its own, larger than any matrix's top direction
            for v in own.values():
                if v.dim() == 2:
                    v.add_(
                        torch.outer(
                            torch.randn(v.shape[0], generator=g), torch.randn(v.shape[1], generator=g)
                        )
                    )
        scale = noise * norm / float(torch.sqrt(sum((x.double() ** 2).sum() for x in own.values())))
        delta = {k: base[k] + scale * own[k] for k in base}
        blobs[uid] = (keypair(uid).ss58_address, sign_delta(settings, uid, window, delta, digest, None))
        if (n + 1) % 64 == 0:
            log.info("signed %d/%d deltas", n + 1, len(uids))
    return {"blobs": blobs, "master": master, "digest": digest}


# --- 4. miner duty cycle ------------------------------------------------------------------------------


class TimedMiner(Miner):
    """The real miner; only records when each of its steps starts and ends."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.records: dict[int, dict[str, float]] = {}

    def step(self, window: int) -> None:
        rec = self.records[window] = {"start": time.perf_counter()}
        super().step(window)
        rec["step_end"] = time.perf_counter()

    def sync(self, window: int) -> bool:
        t0 = time.perf_counter()
        ok = super().sync(window)
        self.records[window]["sync"] = time.perf_counter() - t0
        return ok

    def honest(self, window: int) -> tuple[bytes, object]:
        t0 = time.perf_counter()
        out = super().honest(window)
        self.records[window]["produce"] = time.perf_counter() - t0
        return out

    def train(self, window: int):
        t0 = time.perf_counter()
        delta, stats = super().train(window)
        rec = self.records[window]
        rec["train"], rec["steps"] = time.perf_counter() - t0, sum(stats.step_seconds)
        return delta, stats

    def encode(self, window: int, wire: dict[str, torch.Tensor]) -> bytes:
        t0 = time.perf_counter()
        blob = super().encode(window, wire)
        self.records[window]["encode"] = time.perf_counter() - t0
        return blob

    def upload(self, window: int, blob: bytes) -> None:
        rec = self.records[window]
        rec["upload_called"] = time.perf_counter()
        super().upload(window, blob)
        self.pending.add_done_callback(lambda f: rec.__setitem__("uploaded", time.perf_counter()))


def _sparse_update(master: dict[str, torch.Tensor], density: float, g: torch.Generator) -> dict:
    """A merged update of the size N topk deltas make: `density` of every tensor, random."""
    out = {}
    for name, p in master.items():
        k = max(1, int(p.numel() * density))
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
        out[name] = Sparse(idx, torch.randn(k, generator=g) * 1e-4)
    return out


def _publish_masters(settings: Settings, tmp: Path, chain: LocalChain, windows: int) -> None:
    """The top validator's bucket, holding θ_0 and real updates up to θ_windows."""
    kp = keypair(100_000)
    _join(chain, kp, "bench-validator", stake=1000.0)
    publisher = Publisher(
        open_store("bench-validator", settings.storage, root=tmp), kp, settings.chain.netuid,
        protocol_settings(settings),
    )  # fmt: skip
    master = clone(state_tensors(build_model(settings.model, seed=settings.model.seed)))
    shapes = {k: tuple(v.shape) for k, v in master.items()}
    recode = MasterCodec.for_settings(settings, shapes)  # what the publisher sends (master_codec)
    digest = model_hash(master)
    publisher.checkpoint(0, master, digest)
    g = torch.Generator().manual_seed(0)
    density = 4 / settings.mechanism.compression  # four miners' top-k, merged
    for w in range(windows):
        update = _sparse_update(master, density, g)
        if recode is not None:
            recode.start(digest)
            update = recode.encode(update, w)
        apply_update(master, update)
        new = model_hash(master)
        # what a follower checks before applying it: the publisher's own uid (0, in every drawn
        # sample of this small network) stands for the merged miners
        norm = delta_norm(update)
        manifest = {"merge": settings.mechanism.merge, "uids": [0], "blobs": [""], "weights": [1.0],
                    "norms": [norm], "clip": [1.0], "valid": [0], "step": 1.0,
                    "update_sha256": delta_sha256(update), "residual_sha256": ""}  # fmt: skip
        if recode is not None:
            wire = recode.commit(update, new)
            publisher.update(w, update, digest, new, wire=wire, fmt=recode.fmt, manifest=manifest)
        else:
            publisher.update(w, update, digest, new, manifest=manifest)
        digest = new
    publisher.latest(windows, digest, [0])


def _step_seconds(settings: Settings, dataset: Dataset, steps: int) -> float:
    """Seconds one miner window of training takes here (to size the windows)."""
    miner = SimMiner(replace(settings, **{"train.steps_per_window": steps}), dataset, 0)
    master = clone(miner.params)
    miner.train(0, master)  # warm-up
    t0 = time.perf_counter()
    miner.train(1, master)
    return time.perf_counter() - t0


def duty_cycle(settings: Settings, dataset: Dataset, *, quick: bool) -> dict[str, Any]:
    steps = 2 if quick else settings.train.steps_per_window
    windows = 2 if quick else 5
    bpw = settings.mechanism.blocks_per_window
    train_s = _step_seconds(settings, dataset, steps)
    window_s = max(1.5, 2.0 * train_s + 1.0)  # room for the slowest window, measured
    with tempfile.TemporaryDirectory(prefix="bistro-bench-duty-") as name:
        tmp = Path(name)
        s = _network(settings, tmp, **{"chain.block_time": window_s / bpw, "wallet.name": "miner",
                                       "dir": str(tmp / "miner"), "train.steps_per_window": steps})  # fmt: skip
        chain = LocalChain(tmp / "chain.sqlite", s.chain)
        _publish_masters(s, tmp, chain, windows + 8)
        chain.register(open_wallet(s.wallet, create=True))
        log.info("miner duty cycle: %d windows of %.1fs (%d steps, ~%.1fs of training each)",
                 windows + 1, window_s, steps, train_s)  # fmt: skip
        miner = TimedMiner(s)
        miner.run(max_windows=windows + 1)
        chain.close()
    records = [miner.records[w] for w in sorted(miner.records)][1:]  # the first window loads θ in full
    done = [r for r in records if "uploaded" in r and "steps" in r]
    if not done:
        raise RuntimeError("miner duty cycle: no window trained and uploaded")
    steps_s = sum(r["steps"] for r in done)
    busy_s = sum(r["uploaded"] - r["start"] for r in done)

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in done) / len(done)

    parts = {
        "sync_s": mean("sync"), "train_s": mean("train"), "steps_s": steps_s / len(done),
        "compress_s": mean("produce") - mean("train") - mean("encode"), "encode_s": mean("encode"),
        "upload_s": sum(r["uploaded"] - r["upload_called"] for r in done) / len(done),
        "busy_s": busy_s / len(done), "step_s": sum(r["step_end"] - r["start"] for r in done) / len(done),
    }  # fmt: skip
    out = {
        "windows": len(done), "window_seconds": window_s, "steps_per_window": steps, **parts,
        "busy_fraction": steps_s / busy_s, "wall_fraction": steps_s / (len(done) * window_s),
        "step_fraction": steps_s / sum(r["step_end"] - r["start"] for r in done),
    }  # fmt: skip
    out["rows"] = [
        row("miner duty cycle (steps / busy)", out["busy_fraction"], "x", target=">= 0.9",
             ok=out["busy_fraction"] >= DUTY_TARGET),
        row("  steps / whole window step (with state save)", out["step_fraction"], "x"),
        row("  steps / wall time", out["wall_fraction"], "x"),
    ]  # fmt: skip
    log.info("miner duty cycle: %s", {k: round(v, 3) for k, v in out.items() if isinstance(v, float)})
    return out


# --- 5. a validator window with 256 uids --------------------------------------------------------------


class TimedEvaluator(Evaluator):
    """The real evaluator; only records how long each stage takes."""

    times: dict[str, float]

    def _timed(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out

    def drop_copies(self, *args):
        return self._timed("drop_copies", super().drop_copies, *args)

    def score(self, *args):
        return self._timed("score", super().score, *args)

    def propose_update(self, *args):
        return self._timed("propose_update", super().propose_update, *args)


class TimedValidator(Validator):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.evaluator = TimedEvaluator(settings, self.model, self.dataset)
        self.evaluator.times = {}

    def fetch(self, window, mg, uids, block_hash=""):
        return self.evaluator._timed("fetch", super().fetch, window, mg, uids, block_hash)


def _build_network(
    settings: Settings,
    dataset: Dataset,
    tmp: Path,
    n_uids: int,
    window: int,
    steps: int,
    noise: float = 0.5,
    distinct_low_rank: bool = False,
) -> Settings:
    # Blocks of 50 ms, so the window's seed block (whose hash picks the eval pages) exists at once;
    # no Yuma epoch but the first (consensus is not what this measures).
    s = _network(settings, tmp, **{"chain.max_uids": n_uids, "wallet.name": "validator",
                                   "dir": str(tmp / "validator"), "chain.block_time": 0.05,
                                   "chain.tempo": 1_000_000})  # fmt: skip
    chain = LocalChain(tmp / "chain.sqlite", s.chain)
    wallet = open_wallet(s.wallet, create=True)
    chain.register(wallet)
    chain.add_stake(wallet.hotkey.ss58_address, 1000.0)
    miners = list(range(1, n_uids))
    made = synthetic_blobs(
        s, dataset, len(miners), window, steps, uids=miners, noise=noise, distinct_low_rank=distinct_low_rank
    )
    for uid in miners:
        hotkey, blob = made["blobs"][uid]
        if _join(chain, keypair(uid), f"bench-miner-{uid}") != uid:
            raise RuntimeError("uids were not given out in order")
        open_store(f"bench-miner-{uid}", s.storage, root=tmp).put(
            protocol.delta_key(s.chain.netuid, window, hotkey), blob
        )
    m = s.mechanism
    chain.wait_for_block(
        protocol.seed_block(window, m.blocks_per_window, m.upload_grace_blocks) + 1, timeout=60
    )
    chain.close()
    return s


def _projection(validator: TimedValidator, window: int, k_pairs: int) -> dict[str, float]:
    """Per-uid costs measured on the full set: fetch + decode, one similarity, one uid's score."""
    mg = validator.chain.metagraph()
    uids = [int(u) for u in mg.uids if int(u) != validator.uid]
    t0 = time.perf_counter()
    verdicts = validator.fetch(window, mg, uids)
    fetch_s = time.perf_counter() - t0
    ok = [v for v in verdicts.values() if v.verdict == "ok"]
    if len(ok) < 2:
        raise RuntimeError(
            f"scale: only {len(ok)} valid deltas: {[v.verdict for v in verdicts.values()][:5]}"
        )
    pairs = [(ok[i], ok[i + 1]) for i in range(min(k_pairs, len(ok) - 1))]
    t0 = time.perf_counter()
    for a, b in pairs:
        similarity(a.delta, b.delta)
    pair_s = (time.perf_counter() - t0) / len(pairs)
    sample = {v.uid: v for v in ok[:8]}
    t0 = time.perf_counter()
    validator.evaluator.score(window, "00" * 32, validator.master, sample, {})
    uid_s = (time.perf_counter() - t0) / len(sample)
    return {"uids": len(uids), "valid": len(ok), "fetch_s_per_uid": fetch_s / len(uids),
            "similarity_s_per_pair": pair_s, "score_s_per_uid": uid_s}  # fmt: skip


def projected_seconds(p: dict[str, float], k: int) -> float:
    """One window scoring k uids, if no copies are found: k fetches, k(k-1)/2 similarities, k scores."""
    return k * p["fetch_s_per_uid"] + k * (k - 1) / 2 * p["similarity_s_per_pair"] + k * p["score_s_per_uid"]


def scale_window(settings: Settings, dataset: Dataset, *, quick: bool, steps: int) -> dict[str, Any]:
    n_uids = 4 if quick else 256
    window = 1
    budget = settings.mechanism.blocks_per_window * settings.chain.block_time
    with tempfile.TemporaryDirectory(prefix="bistro-bench-scale-") as name:
        tmp = Path(name)
        log.info("scale: registering %d uids and signing %d deltas", n_uids, n_uids - 1)
        s = _build_network(settings, dataset, tmp, n_uids, window, steps)
        first = TimedValidator(s)
        first.evaluate(window - 1)  # publishes θ_window; nothing to score yet
        proj = _projection(first, window, 4 if quick else 12)
        full = projected_seconds(proj, proj["uids"])
        k = proj["uids"]
        while k > 1 and projected_seconds(proj, k) > 0.8 * budget:
            k -= 1
        log.info("scale: all %d uids would take ~%.0fs (window %.0fs): scoring %d a window",
                 proj["uids"], full, budget, k)  # fmt: skip
        validator = TimedValidator(replace(s, **{"mechanism.max_uids_per_window": k}))
        with RssPeak() as rss:
            t0 = time.perf_counter()
            validator.evaluate(window)
            seconds = time.perf_counter() - t0
    times = validator.evaluator.times
    out = {
        "registered": n_uids, "miners": proj["uids"], "scored": k, "seconds": seconds,
        "window_budget_s": budget, "projected_all_s": full, "stages_s": times, **proj,
        "peak_rss_mb": rss.peak, "rss_before_mb": rss.before, "rotation_windows": -(-proj["uids"] // k),
    }  # fmt: skip
    sampled = "" if k == proj["uids"] else f", scored sample {k}"
    out["rows"] = [
        row(f"validator window, {n_uids} uids{sampled}", seconds, "s", baseline=budget,
             target="within the window", ok=seconds <= budget),
        row(f"  projected, all {proj['uids']} scored", full, "s", baseline=budget),
        row("  peak RSS during the window", rss.peak, "MiB"),
        *[row(f"  {stage}", t, "s") for stage, t in times.items()],
    ]  # fmt: skip
    log.info("scale: %s", {k: v for k, v in out.items() if k != "rows"})
    return out
