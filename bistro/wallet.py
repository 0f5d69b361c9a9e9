"""Bittensor wallets: the standard files under `<path>/<name>/`, through the SDK."""

from __future__ import annotations

from pathlib import Path

from bittensor import Wallet

from .config import WalletConfig


class WalletError(Exception):
    """The wallet's hotkey files are missing or unreadable."""


def open_wallet(cfg: WalletConfig, *, create: bool = False) -> Wallet:
    """Open the wallet `cfg` names; with `create`, make missing keys without a password.

    Passwordless keys are for local networks; on a real network make them with `btcli`.
    """
    path = str(Path(cfg.path).expanduser())
    wallet = Wallet(cfg.name, cfg.hotkey, path=path)
    hotkey_file = Path(path) / cfg.name / "hotkeys" / cfg.hotkey
    if create:
        if not (Path(path) / cfg.name / "coldkeypub.txt").exists():
            wallet.create_new_coldkey(use_password=False, suppress=True)
        if not hotkey_file.exists():
            wallet.create_new_hotkey(use_password=False, suppress=True)
    if not hotkey_file.exists():
        raise WalletError(
            f"no hotkey {cfg.hotkey!r} in wallet {cfg.name!r} under {path}: create it with "
            f"`btcli wallet new_hotkey --wallet.name {cfg.name} --wallet.hotkey {cfg.hotkey}` "
            f"(or `bistro register` on a local network)"
        )
    try:
        wallet.hotkey  # noqa: B018 - unlock now so a bad file fails here, not mid-window
    except Exception as e:  # noqa: BLE001 - the SDK raises several kinds for unreadable keys
        raise WalletError(f"cannot read hotkey {cfg.name}/{cfg.hotkey}: {type(e).__name__}") from None
    return wallet
