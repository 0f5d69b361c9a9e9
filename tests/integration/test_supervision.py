"""deploy/: the systemd units (`systemd-analyze verify`) and the pm2 ecosystem file with the real
pm2 from npm (`make pm2`): pm2 starts a validator and a miner on the embedded chain, the validator
is killed with SIGKILL, pm2 starts it again and it goes on from its state file: no window lost,
none scored twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.network(seconds=90)

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ECOSYSTEM = ROOT / "deploy" / "pm2" / "ecosystem.config.js"
PM2 = (
    Path(os.environ.get("BISTRO_PM2", Path.home() / ".cache" / "bistro" / "pm2"))
    / "node_modules"
    / ".bin"
    / "pm2"
)
INSTALLED = "/opt/bistro/.venv/bin/bistro"


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_systemd_units_verify(tmp_path: Path, role: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): units not verified")
    text = (UNITS / f"bistro-{role}@.service").read_text()
    assert INSTALLED in text and f"bistro {role} " in text and "Restart=always" in text
    bistro = Path(sys.executable).with_name("bistro")
    if not bistro.exists():
        pytest.skip(f"no bistro script next to {sys.executable} to stand in for {INSTALLED}")
    unit = tmp_path / f"bistro-{role}@test.service"
    unit.write_text(text.replace(INSTALLED, str(bistro)))
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # and verify does catch a broken unit: the same with a command that does not exist
    unit.write_text(text.replace(INSTALLED, str(tmp_path / "nowhere" / "bistro")))
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def wait_for(what: str, check, timeout: float, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(not PM2.exists(), reason=f"needs pm2 from npm at {PM2}: make pm2")
def test_pm2_restarts_a_killed_validator_that_resumes_its_window(tmp_path: Path) -> None:
    cfg = tmp_path / "local.toml"
    cfg.write_text(
        f'[chain]\nchain_endpoint = "{tmp_path / "chain.sqlite"}"\nblock_time = 2.0\n'
        f'[storage]\nroot = "{tmp_path}"\n[wallet]\npath = "{tmp_path / "wallets"}"\n[train]\nthreads = 1\n'
    )
    for name, stake in (("validator", "1000"), ("miner", "0")):
        p = subprocess.run(
            [sys.executable, "-m", "bistro.cli", "register", "--config", str(cfg), "--wallet.name", name,
             "--stake", stake], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
    env = {
        **os.environ,
        "PM2_HOME": str(tmp_path / "pm2"),
        "BISTRO_PYTHON": sys.executable,
        "BISTRO_CONFIG": str(cfg),
        "BISTRO_VALIDATOR_DIR": str(tmp_path / "validator"),
        "BISTRO_MINER_DIR": str(tmp_path / "miner"),
        "BISTRO_VALIDATOR_METRICS_PORT": str(free_port()),
        "BISTRO_MINER_METRICS_PORT": str(free_port()),
        "BISTRO_CWD": str(tmp_path),
    }

    def pm2(*args: str) -> str:
        p = subprocess.run([str(PM2), *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    def app(name: str) -> dict:
        return next(a for a in json.loads(pm2("jlist")) if a["name"] == name)

    jsonl = tmp_path / "validator" / "validator" / "windows.jsonl"
    try:
        pm2("start", str(ECOSYSTEM))
        first = app("bistro-validator")
        assert first["pm2_env"]["status"] == "online"
        wait_for("two scored windows", lambda: len(records(jsonl)) >= 2, 300)
        pid = app("bistro-validator")["pid"]
        os.kill(pid, signal.SIGKILL)
        state = json.loads((tmp_path / "validator" / "validator" / "state.json").read_text())
        last = state["last_window"]
        again = wait_for(
            "pm2 to start the validator again",
            lambda: (
                (a := app("bistro-validator"))["pid"] not in (0, pid)
                and a["pm2_env"]["status"] == "online"
                and a
            ),
            60,
        )
        assert again["pm2_env"]["restart_time"] >= 1
        wait_for(
            "two windows after the restart", lambda: max(r["window"] for r in records(jsonl)) >= last + 2, 180
        )
        windows = [r["window"] for r in records(jsonl)]
        assert len(windows) == len(set(windows)), f"a window scored twice: {windows}"
        assert windows == list(range(windows[0], windows[-1] + 1)), f"a window lost: {windows}"
        # its log (--logging.json) says where it resumed
        log = [json.loads(line) for line in Path(again["pm2_env"]["pm_out_log_path"]).read_text().splitlines()
               if line.startswith("{")]  # fmt: skip
        resumed = [d for d in log if d["message"].startswith("resumed: last window")]
        assert resumed and resumed[-1]["message"].startswith(f"resumed: last window {last},"), resumed
        scored = [d["window"] for d in log if d["message"].startswith("window") and "scored" in d["message"]]
        assert set(windows) == set(scored), (windows, scored)
        assert all(d["node"] == "validator:validator/default" for d in log)
        assert app("bistro-miner")["pm2_env"]["status"] == "online"
    finally:
        subprocess.run([str(PM2), "kill"], capture_output=True, env=env, timeout=120)
