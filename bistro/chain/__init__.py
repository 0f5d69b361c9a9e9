"""The chain layer: `open_chain(settings)` gives the embedded SQLite chain or the Bittensor adapter."""

from __future__ import annotations

from ..config import Settings
from .base import Chain, ChainError, Metagraph

__all__ = ["Chain", "ChainError", "Metagraph", "open_chain"]


def open_chain(settings: Settings, *, retry: bool = True) -> Chain:
    """The chain `settings.chain` names, wrapped to retry transient failures unless `retry` is False.

    `embedded`: the SQLite file at `chain_endpoint`, or `<dir>/chain.sqlite`. Anything else, or a
    ws:// `chain_endpoint` whatever `network` says (`python3 miner.py --subtensor.chain_endpoint
    ws://…` names no network): the Bittensor network. The SDK is imported only then.
    """
    cfg = settings.chain
    if cfg.embedded:
        from .local import LocalChain

        chain: Chain = LocalChain(cfg.chain_endpoint or settings.home / "chain.sqlite", cfg)
    else:
        from .subtensor import SubtensorChain

        chain = SubtensorChain(cfg)
    if not retry:
        return chain
    from .retry import RetryingChain

    return RetryingChain(chain)
