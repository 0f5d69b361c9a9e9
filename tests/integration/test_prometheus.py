"""The dashboard and alert rules in deploy/ against a real Prometheus scraping a running localnet.

Every panel query of deploy/grafana/bistro.json and every alert expression of
deploy/prometheus/rules.yml is evaluated through Prometheus' HTTP API and must return series;
promtool checks the rules and the configurations; stopping the validator makes BistroNodeDown fire.
Needs Debian's `prometheus` package (`make prometheus`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.network(seconds=60)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "bistro.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPARISON = re.compile(r" (==|!=|>=|<=|>|<) ")

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Debian's prometheus package (prometheus, promtool): make prometheus",
)


def panel_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def as_bool(expr: str) -> str:
    """An alert's condition as a 0/1 series whether or not it holds (`a > b` -> `a > bool b`): a
    firing-only expression returns nothing while all is well, which would prove nothing."""
    ops = COMPARISON.findall(expr)
    assert len(ops) == 1, f"one comparison per alert expression, not {ops}: {expr}"
    return COMPARISON.sub(lambda m: f" {m.group(1)} bool ", expr)


def test_dashboard_and_rules_are_well_formed() -> None:
    queries = panel_queries()
    assert len(queries) >= 15
    names = set(re.findall(r"bistro_[a-z_]+", " ".join(queries)))
    for metric in ("bistro_master_global_loss", "bistro_master_hash_age_seconds", "bistro_window_verdicts",
                   "bistro_score", "bistro_weight", "bistro_fetch_seconds", "bistro_scoring_seconds",
                   "bistro_window_length_seconds", "bistro_bytes_total", "bistro_train_loss",
                   "bistro_tokens_per_second"):  # fmt: skip
        assert metric in names, metric
    alerts = {r["alert"] for r in alert_rules()}
    assert {"BistroNodeDown", "BistroValidatorNotScoring", "BistroValidatorNotSettingWeights",
            "BistroMasterStuck", "BistroMinerMissingWindows", "BistroPeerFaultsRising",
            "BistroOwnBucketCanaryFailing"} <= alerts  # fmt: skip
    assert as_bool("up == 0") == "up == bool 0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base(n: int) -> int:
    """A base port with n free ports after it."""
    for _ in range(50):
        base = free_port()
        if base + n >= 65536:
            continue
        try:
            for k in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
    raise RuntimeError("no free run of ports")


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def query(port: int, expr: str) -> list:
    doc = api(port, "/api/v1/query", query=expr)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def promtool(*args: str) -> None:
    p = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def node_pids(run_dir: Path, name: str) -> list[int]:
    """Processes whose command line runs the node `name` of the localnet in run_dir."""
    needle = str(run_dir / "nodes" / name).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@needs_prometheus
def test_promtool_checks_the_shipped_rules_and_config() -> None:
    promtool("check", "rules", str(RULES))
    promtool("check", "config", str(CONFIG))


@pytest.mark.slow
@needs_prometheus
def test_every_panel_and_alert_has_series_and_a_stopped_validator_alerts(tmp_path: Path) -> None:
    run_dir = tmp_path / "net"
    base = free_base(3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    net = subprocess.Popen(
        [sys.executable, "-m", "bistro.cli", "localnet", "--preset", "tiny", "--miners", "2",
         "--validators", "1", "--windows", "40", "--block-time", "1", "--metrics-ports", str(base),
         "--dir", str(run_dir)],
        stdout=open(tmp_path / "localnet.log", "w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    prom = None
    try:
        deadline = time.time() + 120
        while not (run_dir / "network.json").exists():
            assert net.poll() is None, (tmp_path / "localnet.log").read_text()[-3000:]
            assert time.time() < deadline, "the localnet wrote no network.json"
            time.sleep(0.5)
        members = json.loads((run_dir / "network.json").read_text())["uids"]
        targets = {role: [f"127.0.0.1:{m['metrics_port']}" for m in members if m["role"] == role]
                   for role in ("validator", "miner")}  # fmt: skip
        assert [m["metrics_port"] for m in members] == [base, base + 1, base + 2]
        # the shipped rules with short `for:`, the shipped config with short intervals
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "2s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"].removeprefix("bistro-")]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        promtool("check", "rules", str(tmp_path / "rules.yml"))
        promtool("check", "config", str(tmp_path / "prometheus.yml"))
        port = free_port()
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        expressions = {**{f"panel: {q}": q for q in panel_queries()},
                       **{f"alert {r['alert']}: {r['expr']}": as_bool(r["expr"]) for r in alert_rules()}}  # fmt: skip
        empty = dict(expressions)
        deadline = time.time() + 240
        while empty and time.time() < deadline:
            assert net.poll() is None, (tmp_path / "localnet.log").read_text()[-3000:]
            time.sleep(2)
            try:
                empty = {k: q for k, q in empty.items() if not query(port, q)}
            except OSError:  # prometheus still starting
                continue
        assert not empty, f"no series for: {list(empty)}"
        # all is well: no alert fires on a healthy network
        up = query(port, 'up{job=~"bistro-.*"}')
        assert sorted(float(s["value"][1]) for s in up) == [1.0, 1.0, 1.0]
        firing = [a for a in api(port, "/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert not firing, firing

        for pid in node_pids(run_dir, "validator-0"):
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 60
        fired: list = []
        while not fired and time.time() < deadline:
            time.sleep(1)
            alerts = api(port, "/api/v1/alerts")["data"]["alerts"]
            fired = [
                a for a in alerts if a["labels"]["alertname"] == "BistroNodeDown" and a["state"] == "firing"
            ]
        assert fired, "BistroNodeDown did not fire after the validator was killed"
        assert {a["labels"]["instance"] for a in fired} == set(targets["validator"])
        assert fired[0]["labels"]["job"] == "bistro-validator"
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        if net.poll() is None:
            net.send_signal(signal.SIGINT)
            try:
                net.wait(timeout=60)
            except subprocess.TimeoutExpired:
                net.kill()
        for name in ("validator-0", "miner-0", "miner-1"):
            for pid in node_pids(run_dir, name):
                os.kill(pid, signal.SIGKILL)
