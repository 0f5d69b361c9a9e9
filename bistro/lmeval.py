"""`bistro eval`: the master's benchmark scores with EleutherAI's lm-evaluation-harness.

    bistro eval --tasks hellaswag,arc_easy,piqa                 θ newest, from the publisher's bucket
    bistro eval --tasks arc_easy --window W                     θ_W (as `bistro export --window`)
    bistro eval --tasks arc_easy --model DIR                    an exported transformers directory
    bistro eval --tasks my_task --include-path DIR              tasks defined by YAML files in DIR
    bistro eval --tasks arc_easy --every 50 --metrics.port 9110 again every 50 windows, served

The master is read and checked as `bistro export` reads it (the top validator's signatures, the
hash its updates sign), exported to `<dir>/eval/model`, and loaded by lm-eval's own Hugging Face
wrapper (`HFLM`). Results go to `--out` (default `<dir>/eval.json`; `bistro report` shows an
`eval.json` it finds in the run directory), to `bistro_eval_score{task,metric}` on the metrics
endpoint, and to W&B when `--wandb.project` is set. lm-eval (`pip install 'bistro[eval]'`) is
imported only here. Its tasks download their data from the Hugging Face Hub unless a task's YAML
points at local files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from .config import Settings

log = logging.getLogger("bistro.eval")


class EvalError(Exception):
    """lm-eval is missing, or a task or the model could not be evaluated."""


def evaluate(
    model_dir: Path,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score the transformers model in `model_dir` on `tasks`: {task: {metric: value}} (numbers only:
    `acc`, `acc_norm`, their `_stderr`, ...)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError(f"bistro eval needs lm-eval: pip install 'bistro[eval]' ({e})") from None
    lm = HFLM(pretrained=str(model_dir), tokenizer=str(model_dir), device=device, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise EvalError(f"lm-eval: {e}") from None
    if out is None:
        raise EvalError("lm-eval returned no results")
    return scores(out["results"])


def scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` ({task: {"acc,none": 0.5, "alias": ...}}) as {task: {"acc": 0.5}}: finite
    numbers only, the filter name dropped (`none`) or kept after a slash."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else f"{name}/{filt}"] = float(value)
        out[task] = row
    return out


def master_dir(settings: Settings, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The directory to score and what it is: `--model DIR` as given, else θ (from the bucket, or
    `--checkpoint`) exported to `<dir>/eval/model`."""
    if args.model:
        path = Path(args.model).expanduser()
        if not (path / "config.json").exists():
            raise EvalError(f"{path}: not a transformers model directory (no config.json)")
        meta_file = path / "bistro.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return path, {"window": meta.get("window"), "hash": meta.get("hash"), "source": str(path)}
    from .export import ExportError, export

    out = settings.home / "eval" / "model"
    try:
        done = export(
            settings, out, checkpoint=Path(args.checkpoint) if args.checkpoint else None, window=args.window
        )
    except ExportError as e:
        raise EvalError(str(e)) from None
    return out, {"window": done.window, "hash": done.hash, "source": args.checkpoint or "bucket"}


class EvalMetrics:
    """`bistro_eval_score{task,metric}` and `bistro_eval_window` on `--metrics.port`, and a W&B run."""

    def __init__(self, settings: Settings) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.score = Gauge(
            "bistro_eval_score", "lm-eval score of the master", ["task", "metric"], registry=self.registry
        )
        self.window = Gauge("bistro_eval_window", "Window of the master scored", registry=self.registry)
        self.server = None
        self.port: int | None = None
        cfg = settings.metrics
        if cfg.port:
            self.server, _ = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
            self.port = self.server.server_port
            log.info("metrics on http://%s:%d/metrics", cfg.host, self.port)
        self.wandb = None
        if cfg.wandb_project:
            from .metrics import _wandb_run

            self.wandb = _wandb_run(settings, "eval", -1, "")

    def update(self, doc: dict[str, Any]) -> None:
        for task, row in doc["tasks"].items():
            for metric, value in row.items():
                self.score.labels(task, metric).set(value)
        if doc.get("window") is not None:
            self.window.set(doc["window"])
        if self.wandb is not None:
            flat = {f"eval/{t}/{m}": v for t, row in doc["tasks"].items() for m, v in row.items()}
            self.wandb.log(flat, step=int(doc["window"] or 0))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def run_once(settings: Settings, args: argparse.Namespace, tasks: list[str]) -> dict[str, Any]:
    """Export (or take) the master, score it, write the JSON; the document written."""
    model, info = master_dir(settings, args)
    start = time.time()
    results = evaluate(
        model, tasks, include_path=args.include_path, limit=args.limit, batch_size=args.batch_size,
        device=settings.device, num_fewshot=args.num_fewshot,
    )  # fmt: skip
    doc = {
        "format": "bistro-eval/1",
        **info,
        "model_dir": str(model),
        "tasks": results,
        "limit": args.limit,
        "seconds": round(time.time() - start, 1),
        "time": time.time(),
    }
    out = Path(args.out).expanduser() if args.out else settings.home / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    for task, row in results.items():
        log.info(
            "θ_%s %s: %s", info.get("window"), task, "  ".join(f"{k} {v:.4f}" for k, v in sorted(row.items()))
        )
    log.info("results in %s", out)
    return doc


def main(settings: Settings, args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        log.error("--tasks: name at least one lm-eval task")
        return 2
    metrics = EvalMetrics(settings)
    try:
        while True:
            try:
                doc = run_once(settings, args, tasks)
            except EvalError as e:
                log.error("%s", e)
                if not args.every:
                    return 1
            else:
                metrics.update(doc)
            if not args.every:
                return 0
            seconds = args.every * settings.mechanism.blocks_per_window * _block_time(settings)
            log.info("next evaluation in %.0fs (%d windows)", seconds, args.every)
            time.sleep(seconds)
    except KeyboardInterrupt:
        return 130
    finally:
        metrics.close()


def _block_time(settings: Settings) -> float:
    try:
        from .chain import open_chain

        return float(open_chain(settings).block_time)
    except Exception:  # noqa: BLE001 -- any chain failure: Bittensor's 12 s
        return 12.0


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`bistro eval`'s own flags (the settings flags come on top)."""
    parser.add_argument(
        "--tasks", required=True, help="lm-eval tasks, comma separated (hellaswag,arc_easy,piqa)"
    )
    parser.add_argument("--model", default=None, metavar="DIR", help="an exported transformers directory")
    parser.add_argument("--checkpoint", default=None, help="a local safetensors θ instead of the bucket")
    parser.add_argument("--window", type=int, default=None, help="θ of this window (default: newest)")
    parser.add_argument("--include-path", default=None, metavar="DIR", help="more task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--out", default=None, help="results JSON (default: <dir>/eval.json)")
    parser.add_argument("--every", type=int, default=0, metavar="N", help="evaluate again every N windows")
