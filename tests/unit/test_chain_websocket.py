"""The adapter over the SDK's real transport: JSON-RPC frames to the SDK's own `FakeNode`.

Below `SubtensorChain` everything is the SDK's production code (SyncClient, Client, RpcSubstrate,
the runtime manager, SCALE decoding); only the node at the other end of the socket is the SDK's
`FakeNode`, which answers each JSON-RPC method with bytes the recorded runtime's codec encoded: its
metadata (the SDK's `golden.json`, spec 461), runtime-API results, and storage entries under their
real keys. The one seam used is `RpcSession`'s `connect_factory`, the way the SDK's own transport
tests plug `FakeNode` in; and, for the real `miner.py` and `validator.py` processes, behind a
real websocket server on 127.0.0.1 (the issue's `--subtensor.chain_endpoint ws://127.0.0.1:PORT`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import bittensor as bt
import numpy as np
import pytest
from bittensor._substrate import RpcSubstrate
from bittensor._transport.const import SS58_FORMAT
from bittensor._transport.interface import SubstrateConnection

from bistro.chain.base import ChainError
from bistro.chain.subtensor import SubtensorChain
from bistro.config import ChainConfig
from tests.support import bittensor_sdk

from .test_chain_subtensor import HOTKEYS, NETUID, metagraph_record, neurons_lite

HEAD, FINAL = 500, 497
ROOT = Path(__file__).resolve().parents[2]


def block_hash(n: int) -> str:
    return f"0x{n:064x}"


class SubnetNode:
    """`FakeNode` serving one subnet: every answer SCALE-encoded by the recorded runtime's codec."""

    def __init__(self, live: bool = False) -> None:
        self.started = time.monotonic()
        self.live = live
        """Blocks advance every 0.25 s (the recorded chain's slot) instead of standing at HEAD."""
        sdk = bittensor_sdk.harness()
        self.node = sdk["fake_node"].FakeNode()
        self.codec = sdk["conftest"].golden_codec()
        golden = json.loads((bittensor_sdk.fetch_source() / "tests/fixtures/golden.json").read_text())
        self.metadata_hex = golden["metadata"]["v15_hex"]
        self.version = golden["network"]
        self.storage: dict[str, str] = {}  # hex key -> hex value
        self.runtime = {
            "SubnetInfoRuntimeApi_get_metagraph": ("SubnetInfoRuntimeApi", "get_metagraph", None),
            "NeuronInfoRuntimeApi_get_neurons_lite": ("NeuronInfoRuntimeApi", "get_neurons_lite", []),
        }
        self.results: dict[str, object] = {}
        handlers = {
            "chain_getBlockHash": lambda n, r: block_hash(r["params"][0] if r["params"] else self.head()),
            "chain_getHead": lambda n, r: block_hash(self.head()),
            "chain_getFinalizedHead": lambda n, r: block_hash(self.head() - (HEAD - FINAL)),
            "chain_getHeader": self.header,
            "chain_getBlock": lambda n, r: {"block": {"header": self.header(n, r), "extrinsics": []}},
            "state_getRuntimeVersion": lambda n, r: {
                "specName": "node-subtensor",
                "specVersion": self.version["spec_version"],
                "transactionVersion": self.version["transaction_version"],
                "implVersion": 1,
                "authoringVersion": 1,
                "apis": [],
                "stateVersion": 1,
            },  # fmt: skip
            "state_call": self.call,
            # a miss is answered `null` (FakeNode treats a bare None as "do not answer")
            "state_getStorageAt": lambda n, r: {"result": self.storage.get(r["params"][0])},
            "state_getKeysPaged": self.keys,
            "state_queryStorageAt": lambda n, r: [
                {"block": r["params"][1], "changes": [[k, self.storage.get(k)] for k in r["params"][0]]}
            ],
        }
        self.node.handlers.update(handlers)

    def head(self) -> int:
        return HEAD + (int((time.monotonic() - self.started) / 0.25) if self.live else 0)

    def header(self, node, request) -> dict:
        h = request["params"][0] if request["params"] else None
        n = self.head() if h is None else int(h, 16)
        return {"number": hex(n), "parentHash": block_hash(max(n - 1, 0)), "stateRoot": "0x" + "00" * 32,
                "extrinsicsRoot": "0x" + "00" * 32, "digest": {"logs": []}}  # fmt: skip

    def call(self, node, request):
        method, params_hex = request["params"][0], request["params"][1]
        if method == "Metadata_metadata_at_version":
            return self.metadata_hex
        api, name, default = self.runtime[method]
        spec = self.codec.runtime_api_map[api][name]
        ours = self.codec.encode(spec["inputs"][0][1], NETUID).hex()  # other subnets do not exist
        value = self.results.get(method, default) if params_hex.removeprefix("0x") == ours else default
        output = spec["output"]
        return "0x" + self.codec.encode(output, value).hex()

    def keys(self, node, request) -> list[str]:
        prefix, count, start = request["params"][0], request["params"][1], request["params"][2]
        found = sorted(k for k in self.storage if k.startswith(prefix) and k > start)
        return found[:count]

    def put(self, module: str, item: str, params: list, value) -> None:
        entry = self.codec.storage_entry(module, item)
        key = "0x" + self.codec.storage_key(entry, params).hex()
        self.storage[key] = "0x" + self.codec.encode(entry.value_type, value).hex()

    def accept_extrinsics(self, event: dict, nonce: int = 7) -> list[str]:
        """Take signed extrinsics the way a node does: `account_nextIndex` answers `nonce`, and each
        `author_submitAndWatchExtrinsic` is reported `inBlock` at HEAD + 1, a block whose body holds
        the submitted extrinsics and whose `System.Events` hold `event` (a `System` event such as
        ExtrinsicSuccess or ExtrinsicFailed) for the first, SCALE-encoded by the runtime's codec.
        Returns the list the submitted extrinsics' hex are appended to."""
        submitted: list[str] = []
        included = block_hash(HEAD + 1)
        plain = self.node.handlers["chain_getBlock"]

        def submit(node, request) -> str:
            submitted.append(request["params"][0])
            sid = node.new_subscription_id()
            asyncio.get_running_loop().call_soon(node.push_subscription_update, sid, {"inBlock": included})
            return sid

        def block(node, request) -> dict:
            answer = plain(node, request)
            if request["params"] and request["params"][0] == included:
                answer["block"]["extrinsics"] = list(submitted)
            return answer

        self.node.handlers.update({
            "account_nextIndex": lambda n, r: nonce,
            "author_submitAndWatchExtrinsic": submit,
            "author_unwatchExtrinsic": lambda n, r: True,
            "chain_getBlock": block,
        })  # fmt: skip
        self.put(
            "System",
            "Events",
            [],
            [{"phase": {"ApplyExtrinsic": 0}, "event": {"System": event}, "topics": []}],
        )
        return submitted


class FakeNodeSubstrate(RpcSubstrate):
    """The SDK's RPC substrate, its sessions connected to `node` instead of a socket."""

    def __init__(self, node) -> None:
        super().__init__("ws://127.0.0.1:9944", fallback_endpoints=[], archive_endpoints=[])
        self.node = node

    def _interface(self, endpoint: str, fallbacks: list[str]) -> SubstrateConnection:
        return SubstrateConnection(
            endpoint, ss58_format=SS58_FORMAT, fallback_urls=fallbacks, connect_factory=self.node.connection
        )


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the SDK caches metadata and symbols under ~
    subnet = SubnetNode()
    subnet.results["SubnetInfoRuntimeApi_get_metagraph"] = metagraph_record()
    subnet.results["NeuronInfoRuntimeApi_get_neurons_lite"] = neurons_lite()
    subnet.put("SubtensorModule", "Weights", [NETUID, 0], [[1, 65535], [2, 21845]])
    for uid in range(3):
        subnet.put("SubtensorModule", "Uids", [NETUID, HOTKEYS[uid]], uid)
    client = bt.SyncClient("ws://127.0.0.1:9944", substrate=FakeNodeSubstrate(subnet.node))
    chain = SubtensorChain(ChainConfig(network="test", netuid=NETUID, call_timeout=30), client=client)
    yield chain, subnet
    chain.close()


def test_blocks_metagraph_and_lookups_over_json_rpc_frames(served) -> None:
    chain, subnet = served
    assert chain.block() == HEAD and chain.finalized_block() == FINAL
    assert chain.block_time == 0.25  # the recorded chain runs fast blocks: Aura.SlotDuration 250 ms
    mg = chain.metagraph()
    np.testing.assert_array_equal(mg.uids, [0, 1, 2])
    assert mg.hotkeys == HOTKEYS[:3]
    np.testing.assert_allclose(mg.S, [1500.25, 2.5, 0.0])
    np.testing.assert_array_equal(mg.validator_permit, [True, False, False])
    np.testing.assert_allclose(mg.validator_trust, [1.0, 0.0, 0.0])
    assert mg.weights == {0: {1: 0.75, 2: 0.25}}
    assert chain.versions()["spec_version"] == 461
    methods = {r["method"] for r in subnet.node.requests}
    assert {"state_call", "state_getKeysPaged", "state_queryStorageAt", "chain_getHeader"} <= methods
    chain.netuid = 7
    with pytest.raises(ChainError, match="subnet 7 does not exist"):
        chain.metagraph()


def test_a_dropped_connection_is_recovered_and_a_silent_node_is_a_transient_error(served) -> None:
    chain, subnet = served
    assert chain.block() == HEAD
    attempts = subnet.node.connect_attempts
    subnet.node.drop_connection()  # the endpoint closes the socket: the SDK reconnects
    assert chain.block() == HEAD and subnet.node.connect_attempts > attempts
    subnet.node.silence()  # the endpoint stops answering: bounded by call_timeout
    chain.cfg.call_timeout = 0.5
    with pytest.raises(ChainError, match="no answer") as info:
        chain.block()
    assert info.value.transient


def serve(node, stop: threading.Event) -> int:
    """`node` behind a real websocket server on 127.0.0.1 (in a thread); returns the port."""
    from websockets.asyncio.server import serve as ws_serve

    ready: dict[str, int] = {}
    started = threading.Event()

    async def answer(ws) -> None:
        async for message in ws:
            frame = json.loads(message)
            if isinstance(frame, list):
                await ws.send(json.dumps([r for r in map(node._respond, frame) if r is not None]))
            elif (response := node._respond(frame)) is not None:
                await ws.send(json.dumps(response))

    async def main() -> None:
        async with ws_serve(answer, "127.0.0.1", 0, max_size=None) as server:
            ready["port"] = server.sockets[0].getsockname()[1]
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    assert started.wait(10)
    return ready["port"]


@pytest.mark.slow
def test_miner_py_and_validator_py_start_and_run_a_window_on_a_loopback_node(tmp_path: Path) -> None:
    from bistro.config import WalletConfig
    from bistro.node import default_bucket
    from bistro.wallet import open_wallet

    from .test_chain_subtensor import raw_commitment

    wallets = {
        n: open_wallet(WalletConfig(name=n, path=str(tmp_path / "w")), create=True) for n in ("v", "m")
    }
    hotkeys = [wallets["v"].hotkey.ss58_address, wallets["m"].hotkey.ss58_address, HOTKEYS[2]]
    subnet = SubnetNode(live=True)
    subnet.results["SubnetInfoRuntimeApi_get_metagraph"] = metagraph_record(hotkeys=hotkeys)
    subnet.results["NeuronInfoRuntimeApi_get_neurons_lite"] = neurons_lite(hotkeys)
    for uid, hotkey in enumerate(hotkeys):
        subnet.put("SubtensorModule", "Uids", [NETUID, hotkey], uid)
    for hotkey in hotkeys[:2]:  # both already committed their buckets: start-up sends nothing
        bucket = default_bucket(hotkey).encode()
        subnet.put("Commitments", "CommitmentOf", [NETUID, hotkey], raw_commitment(bucket, 400))
    stop = threading.Event()
    port = serve(subnet.node, stop)
    common = [
        "--subtensor.chain_endpoint", f"ws://127.0.0.1:{port}", "--netuid", str(NETUID),
        "--wallet.path", str(tmp_path / "w"), "--windows", "1", "--train.threads", "1",
        "--train.steps_per_window", "1", "--chain.finality_timeout", "30",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        procs = {
            name: subprocess.run(
                [
                    sys.executable,
                    f"{name}.py",
                    *common,
                    "--wallet.name",
                    name[0],
                    "--dir",
                    str(tmp_path / name),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )  # fmt: skip
            for name in ("validator", "miner")
        }
    finally:
        stop.set()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    validator, miner = (" ".join(procs[n].stdout.split()) for n in ("validator", "miner"))
    assert "validator uid 0" in validator and "published the initial master" in validator
    assert re.search(r"window \d+ scored", validator) and "validator stopped after 1 windows" in validator
    assert "miner uid 1" in miner and "miner stopped after 1 windows" in miner
    methods = {r["method"] for r in subnet.node.requests}
    assert {"state_call", "state_getKeysPaged", "state_getStorageAt", "chain_getFinalizedHead"} <= methods


DISPATCH_INFO = {"weight": {"ref_time": 1, "proof_size": 2}, "class": "Normal", "pays_fee": "Yes"}


def test_commit_is_signed_submitted_and_resolved_over_json_rpc_frames(served) -> None:
    """A miner's start-up commitment end to end below the adapter: the SDK composes the call from the
    runtime's metadata, asks the node for the hotkey's nonce, signs with the hotkey (the SDK's
    signer="hotkey": never the coldkey), submits and watches it, then finds it in its block and
    reads its outcome from the block's events."""
    from .test_chain_subtensor import wallet

    chain, subnet = served
    submitted = subnet.accept_extrinsics({"ExtrinsicSuccess": {"dispatch_info": DISPATCH_INFO}})
    signer = wallet(1)
    chain.commit(signer, "s3://bistro-0123456789abcdef")
    (extrinsic,) = submitted
    data = bytes.fromhex(extrinsic.removeprefix("0x"))
    assert b"s3://bistro-0123456789abcdef" in data and bytes(signer.hotkey.public_key) in data
    asked = [r["params"] for r in subnet.node.requests if r["method"] == "account_nextIndex"]
    assert asked == [[signer.hotkey.ss58_address]]
    methods = [r["method"] for r in subnet.node.requests]
    assert methods.index("author_submitAndWatchExtrinsic") < methods.index("chain_getBlock")


def test_an_extrinsic_the_chain_fails_is_a_chain_error_naming_why(served) -> None:
    from .test_chain_subtensor import wallet

    chain, subnet = served
    subnet.accept_extrinsics(
        {"ExtrinsicFailed": {"dispatch_error": "BadOrigin", "dispatch_info": DISPATCH_INFO}}
    )
    with pytest.raises(ChainError, match="BadOrigin"):
        chain.commit(wallet(1), "s3://bistro-0123456789abcdef")


def test_set_weights_on_a_runtime_the_sdk_cannot_plan_for_is_a_chain_error(served) -> None:
    """bittensor 11.3 plans `SetWeights` by reading `SubtensorModule.SubnetEpochConsensus`, which the
    SDK's own recorded runtime (golden.json, spec 461) does not have: on such a node set_weights
    cannot even be composed. That must surface as a ChainError naming the item (the validator logs
    it and retries next window), and nothing may be submitted. (Against a runtime that has the item,
    the composed call is tested over FakeSubstrate in test_chain_subtensor.py.)"""
    from .test_chain_subtensor import wallet

    chain, subnet = served
    submitted = subnet.accept_extrinsics({"ExtrinsicSuccess": {"dispatch_info": DISPATCH_INFO}})
    with pytest.raises(ChainError, match="SubnetEpochConsensus"):
        chain.set_weights(wallet(0), [1, 2], [0.5, 0.5])
    assert submitted == []
