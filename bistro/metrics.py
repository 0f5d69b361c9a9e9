"""What a miner or validator shows a dashboard: a Prometheus endpoint and, optionally, W&B.

Off unless asked for: `--metrics.port N` serves `http://HOST:N/metrics` (prometheus-client, its own
registry, a daemon thread); `--wandb.project P` logs each window to Weights & Biases
(`--wandb.mode offline` writes the run under `<dir>/wandb`, no account needed; `wandb sync` uploads
it later). Both are fed the same thing once per window: the validator's windows.jsonl record, the
miner's window summary. Verdict labels are the `bistro.verdicts.V` values the validator records.

    bistro_window{role}                      last window done
    bistro_window_verdicts{verdict}          uids with each verdict in the last window (all V, zeros too)
    bistro_verdicts_total{verdict}           the same, summed over windows
    bistro_eval_loss{uid,pages,delta}        loss on local/global pages with/without the uid's delta
    bistro_score{uid} bistro_moving_average{uid} bistro_weight{uid}
    bistro_fetch_seconds bistro_scoring_seconds bistro_window_seconds
    bistro_bytes_total{direction}            bytes fetched (validator) / uploaded (miner)
    bistro_master_window                     the master this node holds
    bistro_master_hash_age_seconds           since the held master's hash last changed
    bistro_master_global_loss{stage}         publisher: global loss before/after the master step
    bistro_train_loss bistro_tokens_per_second bistro_upload_seconds bistro_incentive   (miner)
    bistro_window_length_seconds             blocks per window x block time (what fetch must fit in)
    bistro_window_timestamp_seconds          unix time of the last window done (or of the start)
    bistro_weights_set_timestamp_seconds     validator: unix time weights last reached the chain (or start)
    bistro_canary_failures_total             validator: windows skipped because our own bucket failed
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .config import Settings
from .verdicts import V

log = logging.getLogger("bistro.metrics")


class Metrics:
    """One node's metrics. `window(record)` once per window; `close()` at exit."""

    def __init__(self, settings: Settings, role: str, uid: int, hotkey: str) -> None:
        self.cfg = settings.metrics
        self.role, self.uid, self.hotkey = role, uid, hotkey
        self.registry = CollectorRegistry()
        self._define()
        self.server = None
        self.port: int | None = None
        if self.cfg.port:
            self.server, _ = start_http_server(self.cfg.port, addr=self.cfg.host, registry=self.registry)
            self.port = self.server.server_port
            log.info("metrics on http://%s:%d/metrics", self.cfg.host, self.port)
        self.wandb = _wandb_run(settings, role, uid, hotkey) if self.cfg.wandb_project else None
        self._hash: str | None = None
        self._hash_since = time.time()

    def _define(self) -> None:
        r, ns = self.registry, "bistro"
        self.g_window = Gauge("window", "Last window done", ["role"], namespace=ns, registry=r)
        self.g_verdicts = Gauge(
            "window_verdicts", "Uids per verdict, last window", ["verdict"], namespace=ns, registry=r
        )
        self.c_verdicts = Counter(
            "verdicts", "Uids per verdict, all windows", ["verdict"], namespace=ns, registry=r
        )
        self.g_loss = Gauge(
            "eval_loss",
            "Loss with/without a uid's delta",
            ["uid", "pages", "delta"],
            namespace=ns,
            registry=r,
        )
        self.g_score = Gauge("score", "Score of the last window", ["uid"], namespace=ns, registry=r)
        self.g_avg = Gauge("moving_average", "Moving average of scores", ["uid"], namespace=ns, registry=r)
        self.g_weight = Gauge("weight", "Weight set for the uid", ["uid"], namespace=ns, registry=r)
        self.g_fetch = Gauge(
            "fetch_seconds", "Seconds to fetch and check the window's deltas", namespace=ns, registry=r
        )
        self.g_scoring = Gauge("scoring_seconds", "Seconds to score the window", namespace=ns, registry=r)
        self.g_seconds = Gauge(
            "window_seconds", "Seconds of the whole window's work", namespace=ns, registry=r
        )
        self.c_bytes = Counter("bytes", "Bytes moved", ["direction"], namespace=ns, registry=r)
        self.g_master = Gauge("master_window", "Window of the master held", namespace=ns, registry=r)
        self.g_age = Gauge(
            "master_hash_age_seconds",
            "Seconds since the held master's hash changed",
            namespace=ns,
            registry=r,
        )
        self.g_age.set_function(lambda: time.time() - self._hash_since)
        self.g_master_loss = Gauge(
            "master_global_loss", "Global loss around the master step", ["stage"], namespace=ns, registry=r
        )
        self.g_train_loss = Gauge(
            "train_loss", "Miner: mean training loss of the window", namespace=ns, registry=r
        )
        self.g_tps = Gauge("tokens_per_second", "Miner: training throughput", namespace=ns, registry=r)
        self.g_upload = Gauge("upload_seconds", "Miner: seconds of the last upload", namespace=ns, registry=r)
        self.g_incentive = Gauge("incentive", "Miner: its incentive on the chain", namespace=ns, registry=r)
        self.g_length = Gauge(
            "window_length_seconds", "Blocks per window times the block time", namespace=ns, registry=r
        )
        self.g_window_time = Gauge(
            "window_timestamp_seconds",
            "Unix time of the last window done (or start)",
            namespace=ns,
            registry=r,
        )
        self.g_weights_time = Gauge(
            "weights_set_timestamp_seconds",
            "Validator: unix time weights last reached the chain (or start)",
            namespace=ns,
            registry=r,
        )
        self.c_canary = Counter(
            "canary_failures", "Validator: windows skipped, own bucket failed", namespace=ns, registry=r
        )
        self.c_mismatch = Counter(
            "master_mismatch", "Validator: publisher updates found tampered", namespace=ns, registry=r
        )
        self.c_checks = Counter(
            "publisher_checks", "Validator: publisher updates checked, by outcome", ["status"],
            namespace=ns, registry=r,
        )  # fmt: skip
        # "since the start" until the first window: an alert on their age waits for the node
        self.g_window_time.set_to_current_time()
        self.g_weights_time.set_to_current_time()
        for v in V:  # every verdict is a series from the start: a dashboard sums zeros, not gaps
            self.g_verdicts.labels(v.value).set(0)
            self.c_verdicts.labels(v.value)

    # --- per window ----------------------------------------------------------------------------------

    def window(self, record: dict[str, Any]) -> None:
        """Update every metric from one window's record (the validator's windows.jsonl line, or the
        miner's summary); never raises for a missing field."""
        self.g_window.labels(self.role).set(record["window"])
        self.g_window_time.set_to_current_time()
        self._master(record.get("master_window"), record.get("master_hash"))
        for key, gauge in (("fetch_seconds", self.g_fetch), ("score_seconds", self.g_scoring),
                           ("seconds", self.g_seconds), ("loss", self.g_train_loss),
                           ("tokens_per_s", self.g_tps), ("upload_seconds", self.g_upload),
                           ("incentive", self.g_incentive)):  # fmt: skip
            if isinstance(record.get(key), int | float):
                gauge.set(record[key])
        for key, direction in (("bytes_fetched", "in"), ("bytes_uploaded", "out")):
            if record.get(key):
                self.c_bytes.labels(direction).inc(record[key])
        for stage in ("before", "after"):
            if isinstance(record.get(f"global_loss_{stage}"), int | float):
                self.g_master_loss.labels(stage).set(record[f"global_loss_{stage}"])
        if "uids" in record:
            self._uids(record["uids"])
        if self.wandb is not None:
            self.wandb.log(flatten(record), step=int(record["window"]))

    def window_length(self, seconds: float) -> None:
        """The window's length in seconds (a dashboard plots fetch and scoring seconds against it)."""
        self.g_length.set(seconds)

    def weights_set(self) -> None:
        """The validator's weights reached the chain."""
        self.g_weights_time.set_to_current_time()

    def canary_failed(self) -> None:
        """Our own bucket failed the canary: the window is skipped for every uid."""
        self.c_canary.inc()

    def publisher_check(self, status: str) -> None:
        """One publisher update checked: ok, unverifiable or tampered (`bistro_master_mismatch_total`)."""
        self.c_checks.labels(status).inc()
        if status == "tampered":
            self.c_mismatch.inc()

    def _master(self, window: int | None, digest: str | None) -> None:
        if window is not None:
            self.g_master.set(window)
        if digest and digest != self._hash:
            self._hash, self._hash_since = digest, time.time()

    def _uids(self, uids: dict[str, dict[str, Any]]) -> None:
        counts = dict.fromkeys((v.value for v in V), 0)
        for gauge in (self.g_loss, self.g_score, self.g_avg, self.g_weight):
            gauge.clear()  # uids that left the sample leave the dashboard too
        for uid, r in uids.items():
            verdict = str(r.get("verdict"))
            counts[verdict] = counts.get(verdict, 0) + 1
            for pages in ("local", "global"):
                for delta in ("with", "without"):
                    value = r.get(f"{delta}_{pages}")
                    if isinstance(value, int | float):
                        self.g_loss.labels(uid, pages, delta).set(value)
            self.g_score.labels(uid).set(r.get("score") or 0.0)
            self.g_avg.labels(uid).set(r.get("moving_average") or 0.0)
            self.g_weight.labels(uid).set(r.get("weight") or 0.0)
        for verdict, n in counts.items():
            self.g_verdicts.labels(verdict).set(n)
            if n:
                self.c_verdicts.labels(verdict).inc(n)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested record as W&B keys (`uids/3/score`); verdicts become `verdicts/<name>`."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            out[name] = value
        elif isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
    if not prefix and isinstance(record.get("uids"), dict):
        for r in record["uids"].values():
            key = f"verdicts/{r.get('verdict')}"
            out[key] = out.get(key, 0) + 1
    return out


def _wandb_run(settings: Settings, role: str, uid: int, hotkey: str):
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb.project needs wandb: pip install 'bistro[wandb]'") from None
    cfg = settings.metrics
    directory = Path(cfg.wandb_dir).expanduser() if cfg.wandb_dir else settings.home / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity or None,
        mode=cfg.wandb_mode,
        dir=str(directory),
        name=f"{role}-{uid}",
        group=f"netuid-{settings.chain.netuid}",
        config={"role": role, "uid": uid, "hotkey": hotkey, **settings.to_dict()},
        settings=wandb.Settings(silent=True, console="off"),
    )
