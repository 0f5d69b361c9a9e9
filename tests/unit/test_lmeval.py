"""`bistro eval` through lm-evaluation-harness, offline: a small local multiple-choice task
(tests/assets/lmeval) scored on an exported model by lm-eval's HFLM, checked against a hand count
of the same per-choice loglikelihoods computed here with the model itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs lm-eval: pip install -e '.[eval]'")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "assets" / "lmeval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny model, its weights moved off the seed's, exported the way `bistro export` writes it."""
    from bistro.config import build_settings
    from bistro.data import Dataset
    from bistro.export import save_model
    from bistro.model import build_model, state_tensors

    d = tmp_path_factory.mktemp("eval")
    settings = build_settings("tiny", overrides={"dir": str(d)})
    g = torch.Generator().manual_seed(5)
    params = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g)
              for k, v in state_tensors(build_model(settings.model)).items()}  # fmt: skip
    save_model(settings, params, Dataset.open(settings).tokenizer, d / "model", {"window": 7})
    return d / "model"


def hand_count(model_dir: Path) -> dict[str, float]:
    """acc and acc_norm as lm-eval defines them, from our own forward passes: the continuation is
    " " + choice, its tokens those of context+continuation past the context's; acc_norm divides the
    loglikelihood by the choice's length in characters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    for row in rows:
        ctx = tok(row["question"], add_special_tokens=False).input_ids
        lls = []
        for choice in row["choices"]:
            whole = tok(row["question"] + " " + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx) :]
            assert whole[: len(ctx)] == ctx and cont
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(ctx) - 1 :]
            lls.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        hits += max(range(len(lls)), key=lls.__getitem__) == row["answer"]
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == row["answer"]
    return {"acc": hits / len(rows), "acc_norm": hits_norm / len(rows)}


def test_scores_parses_lm_evals_results() -> None:
    from bistro.lmeval import scores

    got = scores({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": float("nan"), "exact,strict": 1}})
    assert got == {"t": {"acc": 0.5, "exact/strict": 1.0}}


@pytest.mark.slow
def test_bistro_eval_matches_a_hand_count(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    p = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "eval", "--tasks", "bistro_tiny_mc", "--model", str(exported),
         "--include-path", str(TASKS), "--out", str(out), "--dir", str(tmp_path), "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **OFFLINE},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["window"] == 7 and doc["hash"]
    expected = hand_count(exported)
    got = doc["tasks"]["bistro_tiny_mc"]
    assert got["acc"] == pytest.approx(expected["acc"], abs=1e-9), (got, expected)
    assert got["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-9), (got, expected)

    # in the report of a run directory that holds it
    from bistro.report import load_run, render

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "windows.jsonl").write_text(json.dumps({"window": 1, "uids": {}}) + "\n")
    (run_dir / "eval.json").write_text(out.read_text())
    page = render(load_run(run_dir))
    assert "Benchmark scores of θ_7 (lm-eval)" in page
    assert f"<td>bistro_tiny_mc</td><td>acc</td><td>{got['acc']:.4g}</td>" in page


def test_eval_scores_on_the_metrics_endpoint(tmp_path: Path) -> None:
    from bistro.config import build_settings
    from bistro.lmeval import EvalMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = EvalMetrics(build_settings("tiny", overrides={"metrics.port": port, "dir": str(tmp_path)}))
    try:
        metrics.update({"window": 9, "tasks": {"arc_easy": {"acc": 0.25, "acc_norm": 0.5}}})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        metrics.close()
    assert 'bistro_eval_score{metric="acc",task="arc_easy"} 0.25' in text
    assert 'bistro_eval_score{metric="acc_norm",task="arc_easy"} 0.5' in text
    assert "bistro_eval_window 9.0" in text


def test_eval_without_a_master_fails_clearly(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "eval", "--tasks", "bistro_tiny_mc", "--model", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE},
    )  # fmt: skip
    assert p.returncode == 1
    assert "not a transformers model directory" in p.stdout + p.stderr
