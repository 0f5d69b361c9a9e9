"""A clean install: with torch installed first (as the README says), `pip install .` alone gives a
working `bistro localnet` (the embedded corpus ships as package data) whose exported model loads in
`transformers`; what needs the `s3sim` extra says so by name instead of failing on an import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.network(seconds=200)]

LOAD = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("ROMEO:", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]))
"""


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_plain_pip_install_runs_a_localnet(tmp_path: Path) -> None:
    # the project's files as a fresh clone has them (no venv, no caches), outside the repo
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "*.egg-info", "build",
                                                            "__pycache__", ".pytest_cache", ".ruff_cache"))  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for step in (["torch==2.13.0"], [str(src)]):
        out = run(pip + step, tmp_path, 1500)
        assert out.returncode == 0, out.stderr[-3000:]
    assert (
        run([str(venv / "bin" / "python"), "-c", "import moto"], tmp_path, 60).returncode != 0
    )  # a plain install

    bistro, net = str(venv / "bin" / "bistro"), tmp_path / "net"
    out = run(
        [bistro, "localnet", "--miners", "2", "--windows", "2", "--block-time", "1", "--dir", str(net)],
        tmp_path,
        900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((net / "summary.json").read_text())
    assert summary["windows_completed"] == 2 and summary["crashed"] == []
    assert summary["model"]["window"] >= 1 and "a sample" in out.stdout
    loaded = run([str(venv / "bin" / "python"), "-c", LOAD, summary["model"]["dir"]], tmp_path, 300)
    assert loaded.returncode == 0 and loaded.stdout.startswith("ROMEO:"), loaded.stderr[-3000:]

    # the loopback S3 server is an extra, and the error names it
    s3 = run([bistro, "localnet", "--storage", "s3", "--miners", "1", "--windows", "1", "--dir", str(tmp_path / "s3")],
             tmp_path, 300)  # fmt: skip
    assert s3.returncode != 0 and "pip install 'bistro[s3sim]'" in s3.stdout + s3.stderr
    bench = run([bistro, "bench", "storage", "--quick"], tmp_path, 300)
    assert bench.returncode == 2 and "bistro[s3sim]" in bench.stdout + bench.stderr
