"""`bistro register` and `bistro status` as a user runs them, and the retrying wrapper."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bistro.chain import open_chain
from bistro.chain.base import ChainError
from bistro.chain.local import LocalChain
from bistro.chain.retry import RetryingChain
from bistro.config import ChainConfig, build_settings

ROOT = Path(__file__).resolve().parents[2]


def bistro(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bistro.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.slow
def test_register_then_status_on_the_embedded_chain(tmp_path: Path) -> None:
    common = [
        "--subtensor.network", "embedded", "--subtensor.chain_endpoint", str(tmp_path / "chain.sqlite"),
        "--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "a",
    ]  # fmt: skip
    first = bistro("register", *common, "--wallet.hotkey", "h")
    assert first.returncode == 0, first.stderr
    assert "registered uid 0" in first.stdout
    assert (tmp_path / "wallets" / "a" / "hotkeys" / "h").exists()  # created without a password
    again = bistro("register", *common, "--wallet.hotkey", "h")
    assert "registered uid 0" in again.stdout  # the same uid
    second = bistro("register", *common, "--wallet.hotkey", "h2")
    assert "registered uid 1" in second.stdout
    hotkey = first.stdout.split("hotkey ")[1].split()[0]
    LocalChain(tmp_path / "chain.sqlite", ChainConfig()).add_stake(hotkey, 5.0)
    status = bistro("status", *common)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any("2 uids" in line for line in lines)
    row0 = next(line for line in lines if hotkey[:8] in line)
    assert "5.00" in row0 and "yes" in row0  # stake and validator permit
    assert "vtrust" in status.stdout


@pytest.mark.slow
def test_register_on_a_real_network_prints_the_btcli_line(tmp_path: Path) -> None:
    out = bistro(
        "register", "--subtensor.network", "test", "--netuid", "212",
        "--wallet.name", "cold", "--wallet.hotkey", "hot", "--wallet.path", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 1
    assert "btcli subnets register --wallet.name cold --wallet.hotkey hot" in out.stdout
    assert "--netuid 212 --subtensor.network test" in out.stdout


def test_open_chain_uses_the_file_named_or_the_home_default(tmp_path: Path) -> None:
    named = build_settings(overrides={"chain.chain_endpoint": str(tmp_path / "x.sqlite")})
    assert open_chain(named).block() >= 0 and (tmp_path / "x.sqlite").exists()
    default = build_settings(overrides={"dir": str(tmp_path / "home"), "chain.block_time": 0.5})
    chain = open_chain(default)
    assert (tmp_path / "home" / "chain.sqlite").exists() and chain.block_time == 0.5  # passes through


class FlakyChain(LocalChain):
    """A real local chain whose first `fail` metagraph reads find the database locked."""

    def __init__(self, *a, fail: int, **k) -> None:
        super().__init__(*a, **k)
        self.fail = fail
        self.calls = 0

    def metagraph(self):
        self.calls += 1
        if self.calls <= self.fail:
            raise sqlite3.OperationalError("database is locked")
        return super().metagraph()


def test_retrying_chain_retries_transient_failures_only(tmp_path: Path) -> None:
    flaky = FlakyChain(tmp_path / "c.sqlite", ChainConfig(block_time=0.05), fail=2)
    chain = RetryingChain(flaky, attempts=3, base_delay=0.001)
    assert chain.metagraph().n == 0 and flaky.calls == 3
    hopeless = RetryingChain(
        FlakyChain(tmp_path / "c.sqlite", ChainConfig(), fail=99), attempts=2, base_delay=0.001
    )
    with pytest.raises(ChainError) as info:
        hopeless.metagraph()
    assert info.value.transient
    refusing = RetryingChain(LocalChain(tmp_path / "c.sqlite", ChainConfig()), attempts=5, base_delay=10.0)
    with pytest.raises(ChainError, match="not registered"):  # a refusal: raised at once, no 10 s sleep
        refusing.commit(type("W", (), {"hotkey": type("K", (), {"ss58_address": "5" + "A" * 47})()})(), "b")
    refusing.add_stake("5" + "A" * 47, 1.0)  # local-only methods pass through
    assert refusing.wait_for_block(0) >= 0
