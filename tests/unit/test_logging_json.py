"""`--logging.json`: one JSON object a line (time, level, node, window, uid, verdict, message)."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bistro.cli import build_parser, settings_from_args, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]


def test_the_flag_sets_the_setting() -> None:
    args = build_parser().parse_args(["validator", "--logging.json"])
    assert settings_from_args(args).log_json is True
    assert settings_from_args(build_parser().parse_args(["validator"])).log_json is False


def test_a_real_logger_writes_one_object_a_line(capsys, restore_logging) -> None:
    setup_logging(False, True, "validator:val/default")
    log = logging.getLogger("bistro.validator")
    log.info("uid %d: rejected (%s): %s", 3, "bad_signature", "nope", extra={"window": 7, "uid": 3,
             "verdict": "bad_signature"})  # fmt: skip
    log.warning("plain line")
    log.debug("not shown at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("window %d: scoring failed", 8, extra={"window": 8})
    lines = capsys.readouterr().out.splitlines()
    docs = [json.loads(line) for line in lines]
    assert len(docs) == 3
    first, second, third = docs
    assert first["message"] == "uid 3: rejected (bad_signature): nope"
    assert (first["level"], first["node"], first["logger"]) == (
        "info",
        "validator:val/default",
        "bistro.validator",
    )
    assert (first["window"], first["uid"], first["verdict"]) == (7, 3, "bad_signature")
    assert (
        abs(datetime.datetime.fromisoformat(first["time"]).timestamp() - datetime.datetime.now().timestamp())
        < 60
    )
    assert second["level"] == "warning" and not {"window", "uid", "verdict"} & set(second)
    assert third["window"] == 8 and "ValueError: boom" in third["exc"]


@pytest.mark.slow
def test_a_node_process_logs_json_lines(tmp_path: Path) -> None:
    """A real `bistro validator` process that cannot start (no wallet registered on a fresh embedded
    chain) says so as JSON lines, and nothing else on stdout."""
    from bistro.config import WalletConfig
    from bistro.wallet import open_wallet

    open_wallet(WalletConfig(name="v", hotkey="default", path=str(tmp_path / "wallets")), create=True)
    p = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "validator", "--logging.json", "--dir", str(tmp_path),
         "--subtensor.network", "embedded", "--subtensor.chain_endpoint", str(tmp_path / "chain.sqlite"),
         "--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "v", "--storage.root", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines, p.stderr[-2000:]
    docs = [json.loads(line) for line in lines]
    assert all(d["node"] == "validator:v/default" for d in docs)
    assert any(d["level"] == "error" and "not registered" in d["message"] for d in docs), docs
