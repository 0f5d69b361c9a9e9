"""The real Bittensor network, through the `bittensor` SDK (11.x, the lean client).

NOT RUN AGAINST A LIVE CHAIN: this machine has no network. The mapping from the SDK's results to
our `Metagraph`, commitments and errors is tested with a stub of the few SDK calls used here
(tests/test_chain_subtensor.py), built from the SDK's own result types. Check it on testnet
(`--subtensor.network test --netuid 212`) before relying on it.

SDK calls used (all on one blocking `bittensor.SyncClient`):
- `client.block`, `client.block_info(b).hash`: block and block hash.
- `client.subnets.metagraph(netuid, commitments=False)`: uids, hotkeys, stake, incentive, dividends,
  permits, last updates. `client.weights.weights(netuid)`: each validator's last weights.
- `client.subnets.commitments(netuid)`: commitments keyed by hotkey, with the uid.
- `client.submit_call(calls.Commitments.set_commitment(...), wallet, signer="hotkey")`: commit.
- `client.execute(SetWeights(...), wallet)`: the SDK normalises, quantises to u16, chooses plain or
  timelocked commit-reveal as the subnet requires, and preflights registration and rate limit.
- `client.neurons.uid(hotkey, netuid)`: registration lookup (registering itself is left to btcli).

The SDK is imported only when this adapter is built, so other commands start fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import ChainConfig
from .base import Chain, ChainError, Metagraph
from .local import MAX_COMMITMENT_BYTES, check_weights


def network_of(cfg: ChainConfig) -> str:
    """What to hand the SDK: a ws:// chain_endpoint wins over the network name."""
    if cfg.chain_endpoint.startswith(("ws://", "wss://")):
        return cfg.chain_endpoint
    return cfg.network


def _stake(value: Any) -> float:
    """A Balance (or a plain number) as a float in its own unit."""
    return float(value.tao) if hasattr(value, "tao") else float(value)


class SubtensorChain(Chain):
    """One subnet on a Bittensor network."""

    def __init__(self, cfg: ChainConfig, client: Any = None) -> None:
        self.cfg = cfg
        self.netuid = cfg.netuid
        if client is None:
            from bittensor import SyncClient

            client = SyncClient(network_of(cfg))
        self.client = client

    def _sdk(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the SDK; a connection failure is transient, a chain refusal is not."""
        from bittensor import (
            BittensorError,
            ConnectionNotReady,
            RpcConnectionError,
        )
        from bittensor import (
            ChainError as SdkChainError,
        )

        try:
            return fn(*args, **kwargs)
        except (RpcConnectionError, ConnectionNotReady, ConnectionError, TimeoutError) as e:
            raise ChainError(f"{what}: cannot reach {network_of(self.cfg)}: {e}", transient=True) from e
        except SdkChainError as e:
            raise ChainError(f"{what} refused by the chain: {e}") from e
        except BittensorError as e:
            raise ChainError(f"{what} failed: {e}") from e

    def block(self) -> int:
        return int(self._sdk("block", lambda: self.client.block))

    def block_hash(self, block: int) -> str:
        info = self._sdk("block_hash", self.client.block_info, block)
        if info is None or not info.hash:
            raise ChainError(f"block {block} does not exist yet")
        return str(info.hash)

    def metagraph(self) -> Metagraph:
        mg = self._sdk("metagraph", self.client.subnets.metagraph, self.netuid, commitments=False)
        if mg is None:
            raise ChainError(f"subnet {self.netuid} does not exist on {network_of(self.cfg)}")
        weights = self._sdk("weights", self.client.weights.weights, self.netuid)
        neurons = sorted(mg.neurons, key=lambda n: n.uid)
        return Metagraph(
            netuid=self.netuid,
            block=int(mg.block),
            uids=np.array([n.uid for n in neurons], dtype=np.int64),
            hotkeys=[n.hotkey for n in neurons],
            S=np.array([_stake(n.total_stake) for n in neurons], dtype=np.float64),
            I=np.array([n.incentive for n in neurons], dtype=np.float64),
            D=np.array([n.dividends for n in neurons], dtype=np.float64),
            validator_permit=np.array([bool(n.validator_permit) for n in neurons], dtype=bool),
            last_update=np.array([n.last_update for n in neurons], dtype=np.int64),
            weights={int(u): {int(d): float(w) for d, w in row.items()} for u, row in weights.items()},
        )

    def commitments(self) -> dict[int, str]:
        found = self._sdk("commitments", self.client.subnets.commitments, self.netuid)
        out: dict[int, str] = {}
        for c in found.values():
            value = c.value
            # Deregistered hotkeys keep their commitment on chain (uid None); a sealed one has no value.
            if c.uid is not None and value is not None and int(c.uid) not in out:
                out[int(c.uid)] = value  # the SDK lists newest first
        return out

    def commit(self, wallet: Any, data: str) -> None:
        raw = data.encode()
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment is {len(raw)} bytes; at most {MAX_COMMITMENT_BYTES} are allowed")
        from bittensor import calls

        call = calls.Commitments.set_commitment(
            netuid=self.netuid, info={"fields": [[{f"Raw{len(raw)}": raw}]]}
        )
        result = self._sdk("commit", self.client.submit_call, call, wallet, signer="hotkey")
        if not result.success:
            raise ChainError(f"commit refused by the chain: {result.message}")

    def set_weights(self, wallet: Any, uids: Sequence[int], weights: Sequence[float]) -> None:
        uid_arr, values = check_weights(uids, weights)
        from bittensor import SetWeights

        intent = SetWeights(netuid=self.netuid, uids=uid_arr.tolist(), weights=values.tolist())
        result = self._sdk("set_weights", self.client.execute, intent, wallet)
        if not result.success:
            raise ChainError(f"set_weights refused by the chain: {result.message}")

    def register(self, wallet: Any) -> int:
        """The wallet's uid if it is registered; registering costs TAO and is left to btcli."""
        hotkey = wallet.hotkey.ss58_address
        uid = self._sdk("register", self.client.neurons.uid, hotkey, self.netuid)
        if uid is None:
            raise ChainError(
                f"hotkey {hotkey} is not registered on netuid {self.netuid}: register it with "
                f"`btcli subnets register --wallet.name {wallet.name} --wallet.hotkey {wallet.hotkey_str} "
                f"--netuid {self.netuid} --subtensor.network {network_of(self.cfg)}`"
            )
        return int(uid)
