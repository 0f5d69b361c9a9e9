"""`bistro report DIR`: one self-contained page, opened in headless Chromium; what renders is checked
in the DOM Chromium built and in the pixels of its screenshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bistro.cli import main as cli
from bistro.report import PALETTE, REJECTED, VERDICT_COLOURS, _summary_table, load_run

WINDOWS = 6
PERSONAS = {2: "honest", 3: "honest", 4: "poison"}


def chromium() -> str:
    """Debian's chromium: installed here if missing (the test set-up, as `make test` does)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium")
    return found


def browse(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
         "--window-size=1000,2000", *mode, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def verdict(uid: int, w: int) -> str:
    if uid == 4:
        return "norm_too_large" if w % 2 else "non_finite"
    return "missing" if w == 0 else "ok"


def localnet_dir(tmp: Path) -> Path:
    """A run directory as `bistro localnet` leaves it, with known numbers."""
    run = tmp / "net"
    windows = run / "nodes" / "validator-0" / "validator"
    windows.mkdir(parents=True)
    records = [
        {"window": w, "master_window": w + 1, "global_loss_after": 8.3 - 0.1 * w,
         "uids": {str(u): {"verdict": verdict(u, w), "score": 0.01 * w if u < 4 else 0.0,
                           "weight": (0.5 if u < 4 else 0.0) if w else 0.0, "moving_average": 0.001 * w}
                  for u in PERSONAS}}
        for w in range(WINDOWS)
    ]  # fmt: skip
    (windows / "windows.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"window": 9, "ui'
    )
    network = {"uids": [{"uid": 0, "name": "validator-0", "role": "validator", "persona": "validator"}]
               + [{"uid": u, "name": f"miner-{u}", "role": "miner", "persona": p} for u, p in PERSONAS.items()]}  # fmt: skip
    (run / "network.json").write_text(json.dumps(network))
    summary = {
        "windows_completed": WINDOWS, "master_windows": list(range(WINDOWS + 1)),
        "master_loss": [8.4 - 0.2 * w for w in range(WINDOWS + 1)], "honest_incentive_share": 0.987,
        "honest_paid_share": 0.912,
        "wall_seconds": 321.0, "crashed": [],
        "incentive_history": [{"window": w, "incentive": {"0": 0.0, "2": 0.1 * w, "3": 0.09 * w, "4": 0.0}}
                              for w in range(WINDOWS)],
        "uids": [{"uid": u, "persona": p, "incentive": 0.5 if p == "honest" else 0.0, "weight": 0.5,
                  "moving_average": 0.005, "rejections": {"non_finite": 3} if p == "poison" else {"missing": 1}}
                 for u, p in PERSONAS.items()],
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def dom(page: Path, tmp: Path) -> str:
    out = browse(page, tmp, "--dump-dom")
    assert out.returncode == 0 and "<svg" in out.stdout, out.stderr[-2000:]
    return out.stdout


def colours(png: Path) -> set[tuple[int, int, int]]:
    return {rgb for _, rgb in Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.mark.slow
def test_report_of_a_localnet_dir_renders_in_chromium(tmp_path: Path) -> None:
    run = localnet_dir(tmp_path)
    assert cli(["report", str(run)]) == 0
    page = run / "report.html"
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in text
    html = dom(page, tmp_path)
    assert "<title>bistro run net</title>" in html
    # four figures: master loss (one line), incentive and weights (a line per miner), verdicts
    assert html.count('<svg class="chart"') == 3 and html.count('<svg class="verdicts"') == 1
    assert html.count('class="series" data-label="held-out loss"') == 1
    for label in ("2 honest", "3 honest", "4 poison"):
        assert html.count(f'class="series" data-label="{label}"') == 2, label  # incentive and weight
    cells = [line for line in html.split("<rect") if 'class="cell"' in line]
    assert len(cells) == len(PERSONAS) * WINDOWS  # the half-written last line is left out
    assert sum('data-verdict="non_finite"' in c for c in cells) == WINDOWS // 2
    assert sum('data-verdict="ok"' in c for c in cells) == 2 * (WINDOWS - 1)
    assert html.count("<tr>") == 1 + len(PERSONAS) and "honest share of the run's pay 0.912" in html
    shot = tmp_path / "shot.png"
    out = browse(page, tmp_path, f"--screenshot={shot}")
    assert out.returncode == 0 and shot.stat().st_size > 0, out.stderr[-2000:]
    seen = colours(shot)
    # the lines, the ok cells and the poison uid's rejected cells are all painted
    for colour in (
        PALETTE[0],
        PALETTE[1],
        PALETTE[2],
        VERDICT_COLOURS["ok"],
        VERDICT_COLOURS["missing"],
        REJECTED,
    ):
        assert rgb(colour) in seen, colour


@pytest.mark.slow
def test_report_of_a_validators_windows_file(tmp_path: Path) -> None:
    run = localnet_dir(tmp_path)
    only = tmp_path / "windows.jsonl"
    shutil.copy(run / "nodes" / "validator-0" / "validator" / "windows.jsonl", only)
    out = tmp_path / "v.html"
    assert cli(["report", str(only), "--out", str(out)]) == 0
    html = dom(out, tmp_path)
    assert "a validator does not" in html  # no incentive without the chain
    assert html.count('class="series" data-label="global loss of θ_w+1"') == 1
    assert html.count('class="series" data-label="uid 4"') == 1  # weights only
    assert html.count("<tr>") == 1 + len(PERSONAS)


def test_report_of_nothing_is_an_error(tmp_path: Path) -> None:
    assert cli(["report", str(tmp_path)]) == 1
    assert cli(["report", str(tmp_path / "absent")]) == 1


def test_the_summary_table_quotes_shares_of_the_runs_pay(tmp_path: Path) -> None:
    """Each uid's share is of its incentive summed over every window, not of the last window's."""
    run = load_run(localnet_dir(tmp_path))
    table = _summary_table(run)
    windows = sum(range(WINDOWS))
    share = {2: 0.1 * windows / (0.19 * windows), 3: 0.09 * windows / (0.19 * windows)}
    for uid, expected in share.items():
        assert f"<td>{round(expected, 4)}</td>" in table, (uid, table)
    assert "share of the run&#x27;s pay" in table or "share of run&#x27;s pay" in table, table
