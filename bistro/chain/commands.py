"""`bistro register` and `bistro status`: thin commands over the chain layer."""

from __future__ import annotations

import argparse

from ..config import Settings
from . import open_chain
from .base import ChainError, Metagraph


def _network(settings: Settings) -> str:
    cfg = settings.chain
    return cfg.chain_endpoint if cfg.chain_endpoint.startswith(("ws://", "wss://")) else cfg.network


def btcli_register_line(settings: Settings) -> str:
    """The btcli command that registers this wallet on a real network."""
    w = settings.wallet
    return (
        f"btcli subnets register --wallet.name {w.name} --wallet.hotkey {w.hotkey} "
        f"--wallet.path {w.path} --netuid {settings.chain.netuid} --subtensor.network {_network(settings)}"
    )


def register(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Embedded chain: create the wallet if missing (no password) and register it. Real network: say how."""
    if not settings.chain.embedded:
        print("Registration on a real network costs TAO and is done with btcli. Run:")
        print(f"  {btcli_register_line(settings)}")
        return 1
    from ..wallet import open_wallet

    wallet = open_wallet(settings.wallet, create=True)
    chain = open_chain(settings)
    try:
        uid = chain.register(wallet)
    except ChainError as e:
        print(f"registration refused: {e}")
        return 1
    stake = float(getattr(args, "stake", 0.0) or 0.0)
    if stake > 0:
        chain.add_stake(wallet.hotkey.ss58_address, stake)
    print(
        f"registered uid {uid} hotkey {wallet.hotkey.ss58_address} on netuid {chain.netuid}"
        + (f" with {stake:g} stake" if stake > 0 else "")
    )
    return 0


def _short(text: str, keep: int = 8) -> str:
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def _weights_text(row: dict[int, float] | None, top: int = 3) -> str:
    if not row:
        return ""
    best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    more = f" +{len(row) - top}" if len(row) > top else ""
    return " ".join(f"{u}:{w:.2f}" for u, w in best) + more


def metagraph_table(mg: Metagraph, commitments: dict[int, str]):  # -> rich.table.Table
    """The metagraph as a rich table (uid, hotkey, stake, incentive, dividends, trust, permit, …)."""
    from rich.table import Table

    table = Table(title=f"netuid {mg.netuid} at block {mg.block}: {mg.n} uids")
    for name in ("uid", "hotkey", "stake", "incentive", "dividends", "vtrust", "vpermit", "last update"):
        table.add_column(name, justify="left" if name == "hotkey" else "right")
    table.add_column("last weights")
    table.add_column("bucket")
    weights = mg.weights or {}
    for k in range(mg.n):
        uid = int(mg.uids[k])
        table.add_row(
            str(uid),
            _short(mg.hotkeys[k]),
            f"{mg.S[k]:.2f}",
            f"{mg.I[k]:.4f}",
            f"{mg.D[k]:.4f}",
            f"{mg.validator_trust[k]:.4f}" if mg.validator_trust is not None else "",
            "yes" if mg.validator_permit[k] else "",
            str(int(mg.last_update[k])),
            _weights_text(weights.get(uid)),
            _short(commitments.get(uid, ""), 24),
        )
    return table


def status(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Print the subnet's metagraph as a table."""
    from rich.console import Console

    chain = open_chain(settings)
    try:
        mg = chain.metagraph()
        commitments = chain.commitments()
    except ChainError as e:
        print(f"cannot read the chain: {e}")
        return 1
    Console(width=160).print(metagraph_table(mg, commitments))
    return 0
