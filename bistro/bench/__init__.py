"""`bistro bench [SUITE] [--json FILE] [--quick]`: measure, side by side with a baseline, as ratios.

Each suite is a module `bistro/bench/<suite>.py` with
`run(settings: Settings, *, quick: bool) -> dict` (`learning` also takes `ablation`) returning
`{"rows": [{"name": str, "value": float, "unit": str, "baseline": float | None, "ratio": float | None,
"target": str | None, "ok": bool | None}, ...], **raw_figures}`.
The suites share the production code paths; they never reimplement them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from ..config import Settings
from ..localnet.s3server import S3SimUnavailable

log = logging.getLogger("bistro.bench")

SUITES = ("storage", "data", "delta", "mechanism", "learning", "scale")


def _available() -> list[str]:
    return [s for s in SUITES if importlib.util.find_spec(f"bistro.bench.{s}") is not None]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bistro bench")
    for col in ("suite", "measure", "value", "unit", "baseline", "ratio", "target", "met"):
        table.add_column(col)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    for suite, result in results.items():
        for row in result.get("rows", []):
            ok = row.get("ok")
            table.add_row(
                suite, row["name"], fmt(row.get("value")), row.get("unit", ""), fmt(row.get("baseline")),
                fmt(row.get("ratio")), row.get("target") or "", "" if ok is None else ("yes" if ok else "NO"),
            )  # fmt: skip
    Console().print(table)


def main(settings: Settings, args: argparse.Namespace) -> int:
    names = _available() if args.suite == "all" else [args.suite]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if importlib.util.find_spec(f"bistro.bench.{name}") is None:
            log.error("no benchmark suite %r (have: %s)", name, ", ".join(_available()))
            return 2
        log.info("bench %s …", name)
        extra: dict[str, Any] = {}
        if name == "learning":
            extra = {"ablation": bool(getattr(args, "ablation", False)),
                     "bandwidth": bool(getattr(args, "bandwidth", False)),
                     "windows": int(getattr(args, "windows", 0) or 0)}  # fmt: skip
        try:
            results[name] = importlib.import_module(f"bistro.bench.{name}").run(
                settings, quick=args.quick, **extra
            )
        except S3SimUnavailable as e:
            if args.suite != "all":
                log.error("bench %s: %s", name, e)
                return 2
            log.warning("bench %s left out: %s", name, e)
    print_table(results)
    if args.json_path:
        flat: dict[str, Any] = {}
        for result in results.values():
            flat.update(result.get("headline", {}))
        flat["suites"] = results
        Path(args.json_path).write_text(json.dumps(flat, indent=2, default=str))
        log.info("wrote %s", args.json_path)
    return 0
