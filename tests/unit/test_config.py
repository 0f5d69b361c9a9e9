"""Settings: precedence (preset < file < flags), the seed's exact commands, preset sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from bistro.cli import build_parser, settings_from_args
from bistro.config import PRESETS, ConfigError, build_settings, param_count, replace

ROOT = Path(__file__).resolve().parents[2]

SEED_MINER = (
    "--wallet.name A --wallet.hotkey B --subtensor.network test --netuid 212 --bucket X --device cpu"
).split()


def parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    return args, settings_from_args(args)


def test_precedence_preset_then_file_then_flags(tmp_path: Path) -> None:
    base = build_settings("tiny")
    assert base.train.lr == PRESETS["tiny"]["train"]["lr"]
    toml = tmp_path / "s.toml"
    toml.write_text("[train]\nlr = 0.5\nbatch_size = 3\n[mechanism]\ntemperature = 2.0\n")
    from_file = build_settings("tiny", toml)
    assert (from_file.train.lr, from_file.train.batch_size) == (0.5, 3)
    assert from_file.mechanism.temperature == 2.0
    _, flagged = parse("miner", "--preset", "tiny", "--config", str(toml), "--train.lr", "0.25")
    assert flagged.train.lr == 0.25  # flag beats file
    assert flagged.train.batch_size == 3  # file beats preset
    assert flagged.mechanism.temperature == 2.0


def test_json_file_with_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"chain.netuid": 7, "wallet": {"name": "w"}}))
    s = build_settings("small", path)
    assert (s.chain.netuid, s.wallet.name, s.preset) == (7, "w", "small")


def test_seed_miner_command_parses() -> None:
    args, s = parse("miner", *SEED_MINER)
    assert args.command == "miner"
    assert (s.wallet.name, s.wallet.hotkey) == ("A", "B")
    assert (s.chain.network, s.chain.netuid) == ("test", 212)
    assert (s.storage.bucket, s.device) == ("X", "cpu")


def test_seed_flags_and_aliases() -> None:
    _, s = parse(
        "validator",
        "--wallet.path", "/w", "--subtensor.chain_endpoint", "ws://127.0.0.1:9944",
        "--storage", "s3", "--s3.endpoint_url", "http://127.0.0.1:9000", "--logging.debug",
    )  # fmt: skip
    assert s.wallet.path == "/w"
    assert s.chain.chain_endpoint == "ws://127.0.0.1:9944"
    assert (s.storage.backend, s.storage.endpoint_url, s.debug) == ("s3", "http://127.0.0.1:9000", True)
    assert parse("miner")[1].chain.netuid == 212  # the default subnet


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--train.lr", "-1"], "train.lr"),
        (["--mechanism.codec", "zip"], "mechanism.codec"),
        (["--netuid", "x"], "chain.netuid"),
        (["--device", "tpu"], "device"),
        (["--mechanism.eval_pages", "99"], "mechanism.eval_pages"),
    ],
)
def test_bad_values_name_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse("miner", *argv)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        build_settings("tiny", path)


def test_replace_returns_validated_copy() -> None:
    s = build_settings("tiny")
    t = replace(s, **{"mechanism.codec": "mask", "device": "cpu"})
    assert t.mechanism.codec == "mask" and s.mechanism.codec == "lowrank"
    with pytest.raises(ConfigError):
        replace(s, **{"mechanism.codec": "nope"})


# Stated sizes: tiny 1-2M, small ~10M, 150M, 1B, 7B (within 10%).
SIZES = {
    "tiny": (1.0e6, 2.0e6),
    "small": (9e6, 11e6),
    "150M": (135e6, 165e6),
    "1B": (0.9e9, 1.2e9),
    "7B": (6.3e9, 7.7e9),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_model_of_stated_size(preset: str) -> None:
    cfg = build_settings(preset).model
    from bistro.model import llama_config

    with torch.device("meta"):  # shapes only: 7B would not fit in this machine's memory
        model = LlamaForCausalLM(llama_config(cfg))
    n = sum(p.numel() for p in model.parameters())
    lo, hi = SIZES[preset]
    assert lo <= n <= hi, n
    assert param_count(cfg) == n
    if preset == "7B":
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (
            4096,
            32,
            32,
            11008,
        )


@pytest.mark.slow
@pytest.mark.parametrize("script", ["miner.py", "validator.py"])
def test_root_scripts_list_the_seed_flags(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--wallet.name", "--wallet.hotkey", "--wallet.path", "--subtensor.network",
                 "--subtensor.chain_endpoint", "--netuid", "--bucket", "--device", "--preset",
                 "--storage", "--s3.endpoint_url", "--logging.debug"):  # fmt: skip
        assert flag in out.stdout, flag


@pytest.mark.slow
def test_seed_command_reaches_the_miner() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "miner.py"), *SEED_MINER, "--print-config"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    cfg = json.loads(out.stdout)
    assert cfg["storage"]["bucket"] == "X" and cfg["chain"]["network"] == "test"
