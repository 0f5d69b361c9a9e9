"""The real Bittensor network, through the `bittensor` SDK (11.x, the lean client).

NOT RUN AGAINST A LIVE CHAIN: this machine has no network. The adapter is tested over a real
`bittensor.SyncClient` whose only fake is the SDK's chain-access seam (the `FakeSubstrate` from the
SDK's own source release), fed with runtime-API records encoded and decoded by the real runtime
codec (tests/unit/test_chain_subtensor.py). Check it on testnet (`--subtensor.network test --netuid
212`, and `bistro doctor`) before relying on it.

SDK calls used (all on one blocking `bittensor.SyncClient`, each bounded by `call_timeout`):
- `client.block`, `client.finalized_block`, `client.block_info(b).hash`: blocks; seeds come only
  from finalized blocks, so every validator derives the same pages around a reorg.
- `client.block_time()`: seconds per block, from the chain's Aura slot (12 s on finney and test).
- `client.at(b)`: one snapshot for `subnets.metagraph(netuid, commitments=False)` (uids, hotkeys,
  stake in the subnet's alpha, incentive, dividends, permits, last updates),
  `weights.weights(netuid)` and `neurons.all(netuid)` (validator trust), all at the same block.
- `client.subnets.commitments(netuid)`: commitments keyed by hotkey, with the uid.
- `client.submit_call(calls.Commitments.set_commitment(...), wallet, signer="hotkey")`: commit.
- `client.execute(SetWeights(..., version_key), wallet)`: the SDK clips to MaxWeightsLimit,
  quantises to u16, and sends `set_mechanism_weights`, or `commit_timelocked_mechanism_weights`
  when the subnet runs commit-reveal (the chain reveals those itself: nobody waits for it). It
  preflights registration, rate limit and the minimum number of weights and raises before sending.
- `client.query(SubtensorModule.WeightsVersionKey | MaxWeightsLimit, [netuid])`.
- `client.neurons.uid(hotkey, netuid)`: registration lookup (registering itself is left to btcli).

Every exception that leaves an SDK call becomes a `ChainError`: transient when the cause is the
connection (unreachable, dropped, timed out), not transient otherwise (a refusal, or a runtime whose
storage or types this SDK does not know: retrying at once would only repeat it). The SDK is
imported only when this adapter is built, so other commands start fast.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from ..config import ChainConfig
from .base import Chain, ChainError, Metagraph
from .local import MAX_COMMITMENT_BYTES, U16_MAX, check_weights

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_WEIGHTS_LIMIT = ("SubtensorModule", "MaxWeightsLimit")
WEIGHTS_VERSION_KEY = ("SubtensorModule", "WeightsVersionKey")


def network_of(cfg: ChainConfig) -> str:
    """What to hand the SDK: a ws:// chain_endpoint wins over the network name."""
    if cfg.chain_endpoint.startswith(("ws://", "wss://")):
        return cfg.chain_endpoint
    return cfg.network


def stake_amount(value: Any) -> float:
    """A Balance in its own unit (the subnet's alpha, or TAO on subnet 0), or a plain number.

    `.tao` raises UnitMismatchError on alpha, so the unit-agnostic `.amount` (rao / 1e9) is read.
    """
    if hasattr(value, "rao"):
        return int(value.rao) / 1e9
    return float(value)


def _is_transient(error: BaseException) -> bool:
    """Whether an SDK failure comes from the connection (worth retrying) rather than the chain."""
    from bittensor import ConnectionNotReady, RpcConnectionError

    if isinstance(error, RpcConnectionError | ConnectionNotReady | ConnectionError | TimeoutError):
        return True
    if isinstance(error, asyncio.TimeoutError | concurrent.futures.TimeoutError | OSError):
        return True
    # the transport's own request failures (no answer, too many retries), and websocket closes
    return type(error).__name__ in {"MaxRetriesExceeded", "ConnectionClosed", "ConnectionClosedError"}


def _reason(error: BaseException) -> str:
    code = getattr(error, "code", None)
    text = str(error) or type(error).__name__
    return f"{text} [{code.value}]" if code is not None and hasattr(code, "value") else text


def commitment_text(fields: list) -> str | None:
    """The UTF-8 text of a commitment's Raw fields, or None (no Raw field, or not UTF-8).

    The SDK renders bytes that are not UTF-8 as a `0x…` string, which must never be taken for a
    bucket name, so the bytes are decoded here, strictly.
    """
    raw = b""
    for entry in fields or []:
        items = entry.items() if isinstance(entry, dict) else []
        for variant, value in items:
            if str(variant).startswith("Raw") and isinstance(value, str):
                try:
                    raw += bytes.fromhex(value.removeprefix("0x"))
                except ValueError:
                    return None
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _call_in_daemon_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """`fn(*args)` on a daemon thread of its own. An SDK call stuck in a socket read cannot be
    cancelled; a daemon thread is left behind when its wait times out, where an executor's worker
    would be joined at exit and hang the node's shutdown (SIGTERM included) forever."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which maps it
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="sdk").start()
    return future


class SubtensorChain(Chain):
    """One subnet on a Bittensor network."""

    def __init__(self, cfg: ChainConfig, client: Any = None) -> None:
        self.cfg = cfg
        self.netuid = cfg.netuid
        if client is None:
            from bittensor import SyncClient

            client = SyncClient(network_of(cfg))
        self.client = client
        # A call that hangs keeps its worker; a few workers bound how many can hang at once.
        self._block_time: float | None = None

    def _sdk(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the SDK with a bounded wait; whatever it raises leaves as a ChainError."""
        future = _call_in_daemon_thread(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.cfg.call_timeout)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise ChainError(
                f"{what}: no answer from {network_of(self.cfg)} within {self.cfg.call_timeout:g}s",
                transient=True,
            ) from e
        except Exception as e:  # noqa: BLE001 - every SDK failure is mapped, by cause, and re-raised
            if _is_transient(e):
                raise ChainError(
                    f"{what}: cannot reach {network_of(self.cfg)}: {_reason(e)}", transient=True
                ) from e
            raise ChainError(
                f"{what} failed on {network_of(self.cfg)}: {type(e).__name__}: {_reason(e)}"
            ) from e

    # --- blocks -----------------------------------------------------------------------------------

    @property
    def block_time(self) -> float:  # type: ignore[override] - read from the chain once
        if self._block_time is None:
            seconds = float(self._sdk("block_time", self.client.block_time))
            if not 0 < seconds < 3600:
                raise ChainError(f"block_time: the chain reports {seconds!r} seconds per block")
            self._block_time = seconds
        return self._block_time

    def block(self) -> int:
        return int(self._sdk("block", lambda: self.client.block))

    def finalized_block(self) -> int:
        """The newest finalized block."""
        return int(self._sdk("finalized_block", lambda: self.client.finalized_block))

    def block_hash(self, block: int) -> str:
        """The hash of `block` once it is finalized (waits up to `finality_timeout` for that)."""
        deadline = time.monotonic() + self.cfg.finality_timeout
        while (final := self.finalized_block()) < block:
            if block > self.block():
                raise ChainError(f"block {block} does not exist yet")
            if time.monotonic() >= deadline:
                raise ChainError(
                    f"block {block} not finalized within {self.cfg.finality_timeout:g}s (finalized: {final})",
                    transient=True,
                )
            time.sleep(min(self.block_time / 2, max(deadline - time.monotonic(), 0.01)))
        info = self._sdk("block_hash", self.client.block_info, block)
        if info is None or not info.hash:
            raise ChainError(f"block {block} has no hash on {network_of(self.cfg)}")
        return str(info.hash)

    # --- reads ------------------------------------------------------------------------------------

    def metagraph(self) -> Metagraph:
        snap = self._sdk("metagraph", self.client.at)
        mg = self._sdk("metagraph", snap.subnets.metagraph, self.netuid, commitments=False)
        if mg is None:
            raise ChainError(f"subnet {self.netuid} does not exist on {network_of(self.cfg)}")
        weights = self._sdk("weights", snap.weights.weights, self.netuid)
        lite = self._sdk("validator_trust", snap.neurons.all, self.netuid)
        try:
            return self._map_metagraph(mg, weights, lite)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ChainError(f"metagraph of subnet {self.netuid} has an unexpected shape: {e!r}") from e

    def _map_metagraph(self, mg: Any, weights: dict, lite: list) -> Metagraph:
        neurons = sorted(mg.neurons, key=lambda n: n.uid)
        trust = {int(n.uid): int(n.raw.get("validator_trust") or 0) / U16_MAX for n in lite}
        return Metagraph(
            netuid=self.netuid,
            block=int(mg.block),
            uids=np.array([n.uid for n in neurons], dtype=np.int64),
            hotkeys=[str(n.hotkey) for n in neurons],
            S=np.array([stake_amount(n.total_stake) for n in neurons], dtype=np.float64),
            I=np.array([float(n.incentive) for n in neurons], dtype=np.float64),
            D=np.array([float(n.dividends) for n in neurons], dtype=np.float64),
            validator_permit=np.array([bool(n.validator_permit) for n in neurons], dtype=bool),
            last_update=np.array([int(n.last_update) for n in neurons], dtype=np.int64),
            weights={int(u): {int(d): float(w) for d, w in row.items()} for u, row in weights.items()},
            validator_trust=np.array([trust.get(int(n.uid), 0.0) for n in neurons], dtype=np.float64),
        )

    def commitments(self) -> dict[int, str]:
        found = self._sdk("commitments", self.client.subnets.commitments, self.netuid)
        out: dict[int, str] = {}
        for c in found.values():  # the SDK lists newest first
            # Deregistered hotkeys keep their commitment on chain (uid None); a sealed one has no value.
            if c.uid is None or int(c.uid) in out:
                continue
            text = commitment_text(c.fields)
            if text is None and c.fields:
                log.warning("uid %s: commitment is not UTF-8 text: ignored", c.uid)
                continue
            if text is None:
                text = c.value  # a revealed timelocked commitment: the SDK's decrypted text
                if text is None or text.startswith("0x"):
                    continue
            out[int(c.uid)] = text
        return out

    # --- writes -----------------------------------------------------------------------------------

    def commit(self, wallet: Any, data: str) -> None:
        raw = data.encode()
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment is {len(raw)} bytes; at most {MAX_COMMITMENT_BYTES} are allowed")
        from bittensor import calls

        call = calls.Commitments.set_commitment(
            netuid=self.netuid, info={"fields": [[{f"Raw{len(raw)}": raw}]]}
        )
        result = self._sdk(
            "commit", self.client.submit_call, call, wallet, signer="hotkey", wait_for_finalization=False
        )
        if not result.success:
            raise ChainError(f"commit refused by the chain: {result.message}")

    def version_key(self) -> int:
        """`--subtensor.version_key`, or the subnet's `weights_version` when that is -1."""
        if self.cfg.version_key >= 0:
            return self.cfg.version_key
        value = self._sdk("weights_version", self.client.query, WEIGHTS_VERSION_KEY, [self.netuid])
        return int(value or 0)

    def _warn_if_clipped(self, weights: np.ndarray) -> None:
        raw = self._sdk("max_weights_limit", self.client.query, MAX_WEIGHTS_LIMIT, [self.netuid])
        limit = (int(raw) if raw is not None else U16_MAX) / U16_MAX
        total = float(weights.sum())
        if len(weights) > 1 and total > 0 and limit < 1.0 and weights.max() / total > limit:
            log.warning(
                "weights clipped by the subnet's MaxWeightsLimit: the largest weight is %.4f of "
                "the total, the limit %.4f (%d/65535); the excess is spread over the other %d uids",
                weights.max() / total, limit, int(raw), len(weights) - 1,
            )  # fmt: skip

    def set_weights(self, wallet: Any, uids: Sequence[int], weights: Sequence[float]) -> None:
        uid_arr, values = check_weights(uids, weights)
        from bittensor import SetWeights

        self._warn_if_clipped(values)
        key = self.version_key()
        intent = SetWeights(
            netuid=self.netuid, uids=uid_arr.tolist(), weights=values.tolist(), version_key=key
        )
        result = self._sdk("set_weights", self.client.execute, intent, wallet, wait_for_finalization=False)
        if not result.success:
            raise ChainError(f"set_weights refused by the chain: {result.message}")
        reveal_round = (result.data or {}).get("reveal_round")
        if reveal_round is not None:
            # Commit-reveal: the chain decrypts and applies the weights at that drand round by
            # itself; nothing to wait for or to send later.
            log.info(
                "weights committed (commit-reveal) on %d uids, version_key %d: the chain reveals "
                "them at drand round %s", len(uid_arr), key, reveal_round,
            )  # fmt: skip
        else:
            log.info("weights set on %d uids, version_key %d", len(uid_arr), key)

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

    def versions(self) -> dict[str, Any]:
        """The SDK's version and the runtime's spec_version (for `bistro doctor`)."""
        import bittensor

        spec = self._sdk("spec_version", lambda: self.client.spec_version)
        return {"sdk": bittensor.__version__, "spec_version": int(spec)}

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
