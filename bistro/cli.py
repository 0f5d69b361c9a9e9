"""One entry point: `bistro miner|validator|localnet|register|status|bench|export|report|data|eval`.

Parse, build one `Settings`, hand it to the command, return its exit code. Each command's code
lives in its own module and is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .config import ALIASES, PRESETS, ConfigError, Settings, build_settings, setting_paths

log = logging.getLogger("bistro")

# command -> (module, function, one-line help). The function takes (settings, args) -> exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "miner": ("bistro.cli", "run_miner", "train on your pages and upload deltas every window"),
    "validator": ("bistro.cli", "run_validator", "score every miner's delta and set weights"),
    "localnet": ("bistro.localnet.network", "main", "run a whole network on this machine"),
    "persona-miner": ("bistro.localnet.personas", "main", "a miner with a test persona (local networks)"),
    "miners": (
        "bistro.localnet.group",
        "main",
        "several miners in one process, a thread each (local networks)",
    ),
    "register": ("bistro.chain.commands", "register", "create (if needed) and register a wallet"),
    "status": ("bistro.chain.commands", "status", "print the subnet's metagraph"),
    "bench": ("bistro.bench", "main", "measure speed and learning efficiency"),
    "data": ("bistro.data.commands", "main", "prepare and inspect corpora"),
    "export": ("bistro.export", "main", "write the master as a Hugging Face transformers directory"),
    "report": ("bistro.report", "main", "render a run directory as one self-contained HTML page"),
    "doctor": ("bistro.doctor", "main", "check wallet, chain, registration, bucket and disk before starting"),
    "plan": ("bistro.plan", "main", "memory, bandwidth and disk a miner and a validator need"),
    "eval": ("bistro.lmeval", "main", "score the master on lm-evaluation-harness tasks"),
}


def run_miner(settings: Settings, args: argparse.Namespace) -> int:
    """`bistro miner`: one process, or rank r of `torchrun --nproc_per_node N` (WORLD_SIZE > 1).

    The choice lives here, above both, so that `miner` and `distributed` (whose rank 0 is a Miner)
    do not import each other."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import run_distributed

        return run_distributed(settings, args)
    from .miner import main as miner_main

    return miner_main(settings, args)


def run_validator(settings: Settings, args: argparse.Namespace) -> int:
    """`bistro validator`: one process, or rank r of `torchrun --nproc_per_node N` (WORLD_SIZE > 1),
    whose ranks split the scored uids' forward passes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import run_validator as run_ranks

        return run_ranks(settings, args)
    from .validator import main as validator_main

    return validator_main(settings, args)


class _KeyValue(argparse.Action):
    """`--plan.set FIELD=VALUE`, repeatable, into one dict."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        key, sep, value = str(values).partition("=")
        if not sep:
            parser.error(f"{option_string}: expected FIELD=VALUE, got {values!r}")
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), key: value})


def _flag_dest(path: str) -> str:
    return "cfg:" + path


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (any field as --section.field)")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None, help="size preset (tiny)")
    group.add_argument("--config", default=None, help="TOML or JSON settings file")
    group.add_argument("--print-config", action="store_true", help="print the settings and exit")
    paths = setting_paths()
    aliases_of: dict[str, list[str]] = {}
    for alias, path in ALIASES.items():
        aliases_of.setdefault(path, []).append(alias)
    for path, kind in paths.items():
        if path == "preset":
            continue
        names = [f"--{a}" for a in aliases_of.get(path, [])] + [f"--{path}"]
        kwargs: dict = dict(dest=_flag_dest(path), default=argparse.SUPPRESS, metavar="V")
        if kind in (bool, "bool"):
            kwargs.update(nargs="?", const="true")
        group.add_argument(*names, **kwargs)


def _add_command_flags(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "localnet":
        parser.add_argument("--miners", type=int, default=4, help="number of miners")
        parser.add_argument("--validators", type=int, default=1, help="number of validators")
        parser.add_argument("--windows", type=int, default=10, help="windows to run")
        parser.add_argument("--personas", default="", help="comma list, one per miner")
        parser.add_argument("--block-time", type=float, default=None, help="seconds per block")
        parser.add_argument("--json", action="store_true", help="print summary.json at the end")
        parser.add_argument(
            "--nproc-per-miner", type=int, default=1, help="run each miner under torchrun on N processes"
        )
        parser.add_argument(
            "--miners-per-process", type=int, default=1, metavar="K",
            help="K miners (each its own uid, wallet, bucket) in one `bistro miners` process, a thread each",
        )  # fmt: skip
        parser.add_argument(
            "--validator-threads", type=int, default=0, metavar="N",
            help="torch threads of each validator (0: two for a lone validator on 2+ cores, else one)",
        )  # fmt: skip
        parser.add_argument(
            "--validator-flags", action="append", default=[], metavar="I:FLAGS",
            help="node-local flags for validator I alone, e.g. 1:--mechanism.link_bytes_per_second=3000",
        )  # fmt: skip
        parser.add_argument(
            "--metrics-ports", type=int, default=0, metavar="BASE",
            help="node k serves Prometheus metrics on port BASE+k (listed in network.json)",
        )  # fmt: skip
    elif name == "bench":
        parser.add_argument("suite", nargs="?", default="all", help="all, or one suite's name")
        parser.add_argument("--json", dest="json_path", default=None, help="write results here")
        parser.add_argument("--quick", action="store_true", help="smaller, faster measurements")
        parser.add_argument("--ablation", action="store_true", help="learning: one run per ablation row")
        parser.add_argument(
            "--bandwidth", action="store_true",
            help="learning: how the master reaches followers (raw union, recompressed, merge set), 4 and 16 miners",
        )  # fmt: skip
        parser.add_argument(
            "--windows", type=int, default=0, help="learning: windows of the plans (0: theirs)"
        )
    elif name == "export":
        parser.add_argument("--out", required=True, help="directory to write (save_pretrained)")
        parser.add_argument(
            "--checkpoint", default=None, help="a local safetensors file instead of the bucket"
        )
        parser.add_argument("--window", type=int, default=None, help="θ of this window (default: newest)")
        parser.add_argument("--sample", action="store_true", help="print a short generation from the export")
        parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload to this Hub repo")
    elif name == "report":
        parser.add_argument("run_dir", metavar="DIR", help="a localnet dir, a validator dir or windows.jsonl")
        parser.add_argument("--out", default=None, help="HTML file to write (default: DIR/report.html)")
    elif name == "data":
        parser.add_argument("action", choices=["prepare"], help="what to do")
    elif name == "plan":
        parser.add_argument("--nproc", type=int, default=1, help="miner ranks (FSDP2 with --train.fsdp)")
        parser.add_argument("--uids", type=int, default=256, help="uids a validator downloads from")
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")
        parser.add_argument("--hardware", default=None, help="cpu, 1xH100, 8xH100 or 4xH200: add time")
        parser.add_argument("--link-gbit", type=float, default=1.0, help="the node's link, Gbit/s")
        parser.add_argument("--design", choices=["current", "new"], default="current",
                            help="the code as it is, or every knob of plan.NEW_DESIGN")  # fmt: skip
        parser.add_argument("--rates", default=None, help="a `bistro bench scale --json` file's fitted rates")
        parser.add_argument(
            "--schedule", choices=["serial", "pipelined"], default=None, help="as --plan.schedule"
        )
        parser.add_argument("--plan.set", dest="plan_set", action=_KeyValue, default={}, metavar="FIELD=V",
                            help="a plan.Design field (repeatable), e.g. --plan.set scored_uids=32")  # fmt: skip
    elif name == "register":
        parser.add_argument(
            "--stake", type=float, default=0.0, help="embedded chain: stake to add (validators)"
        )
    elif name == "doctor":
        parser.add_argument(
            "--role", choices=["miner", "validator"], default="miner", help="the node you will start"
        )
    elif name == "eval":
        from .lmeval import add_flags

        add_flags(parser)
    elif name == "miners":
        parser.add_argument("--members", required=True, help="NAME=PERSONA[@METRICS_PORT],... one per miner")
        parser.add_argument("--nodes-dir", required=True, help="each miner's directory is NODES_DIR/NAME")
        parser.add_argument("--windows", type=int, default=0, help="stop after N windows each (0: run on)")
    elif name in ("miner", "validator", "persona-miner"):
        parser.add_argument("--windows", type=int, default=0, help="stop after N windows (0: run on)")
        if name == "persona-miner":
            parser.add_argument("--persona", default="honest", help="honest, a cheat, or hostile:<behaviour>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bistro",
        description="BISTRO: incentivized decentralized training of one language model on Bittensor.",
        epilog=(
            "Every command takes the settings flags: --wallet.name, --wallet.hotkey, --wallet.path, "
            "--subtensor.network, --subtensor.chain_endpoint, --netuid (212), --bucket, --device, "
            "--preset, --storage {local,s3}, --s3.endpoint_url, --logging.debug, --config FILE, "
            "--print-config, and any setting as --section.field (bistro COMMAND --help lists them all)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_command_flags(name, p)
        _add_setting_flags(p)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Preset, then --config file, then flags."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    return build_settings(args.preset or "tiny", args.config, overrides)


class JsonLines(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, node, logger, window, uid, verdict (when
    the record carries them, `log.info(..., extra={"window": w})`), message, and exc on errors."""

    FIELDS = ("window", "uid", "verdict")

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "node": self.node,
            "logger": record.name,
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value if isinstance(value, int | float | str | bool) else str(value)
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(debug: bool, json_lines: bool = False, node: str = "bistro") -> None:
    """Rich's console lines, or with `json_lines` (`--logging.json`) one JSON object a line on
    stdout, labelled with `node`."""
    if json_lines:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonLines(node))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, log_time_format="%H:%M:%S", rich_tracebacks=False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[handler],
        force=True,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _resolve(command: str) -> Callable[[Settings, argparse.Namespace], int] | None:
    module, func, _ = COMMANDS[command]
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), func, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    if args.print_config:
        print(json.dumps(settings.to_dict(), indent=2))
        return 0
    setup_logging(
        settings.debug, settings.log_json, f"{args.command}:{settings.wallet.name}/{settings.wallet.hotkey}"
    )
    handler = _resolve(args.command)
    if handler is None:
        print(f"bistro {args.command}: not built yet", file=sys.stderr)
        return 2
    try:
        return int(handler(settings, args) or 0)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
