"""Shaped copiers in a real local network (the shared incentive network): each earns under 1% of
the run's pay, honest miners at least 95%, no honest uid is ever judged a copy."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("incentive_net")]  # one network, one worker

COPIERS = ("shaped_copier", "shaped_copier_05", "rotating_copier", "shaped_finetune")


def check_copiers_run(run) -> dict:
    """The figures of a local network of honest miners and the four shaped copiers, and its
    contract: every copier under 1% of the run's pay, honest miners at least 95%, no honest uid ever
    judged a copy (docs/mechanism.md "Shaped copies" quotes three such runs)."""
    import json

    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in
               (run / "nodes/validator-0/validator/windows.jsonl").read_text().splitlines()]  # fmt: skip
    by_persona: dict[str, list[dict]] = {}
    for u in summary["uids"]:
        by_persona.setdefault(u["persona"], []).append(u)
    honest = {str(u["uid"]) for u in by_persona["honest"]}
    copy_verdicts = sum(r["uids"].get(uid, {}).get("verdict") == "copy" for r in records for uid in honest)
    figures = {
        "honest_paid_share": summary["honest_paid_share"],
        **{p: by_persona[p][0]["paid_share"] for p in COPIERS},
        "honest_copy_verdicts": copy_verdicts,
        "windows": summary["windows_completed"],
    }
    assert summary["crashed"] == [], summary["crashed"]
    assert summary["honest_paid_share"] >= 0.95, figures
    for p in COPIERS:
        assert by_persona[p][0]["paid_share"] < 0.01, (p, figures)
    assert copy_verdicts == 0, figures
    return figures


def test_shaped_copiers_beside_honest_miners_earn_under_one_percent_each(incentive_net) -> None:
    """The shared incentive network: 8 honest miners, the four shaped copiers and four other cheats,
    a sample of 4 scored a window, 12 windows of `tiny`."""
    print(check_copiers_run(incentive_net))
