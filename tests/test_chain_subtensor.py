"""The Bittensor adapter's mapping, against a stub of the few SDK calls it makes.

There is no network here, so the stub stands in for `bittensor.SyncClient` and returns the SDK's
own result types (Metagraph, MetagraphNeuron, NeuronCommitment, ExtrinsicResult, Balance). It
checks what we send and how we map what comes back; it cannot check the chain itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import bittensor as bt
import numpy as np
import pytest

from bistro.chain.base import ChainError
from bistro.chain.subtensor import SubtensorChain, network_of
from bistro.config import ChainConfig

HOTKEYS = ["5" + c * 47 for c in "ABC"]


def neuron(uid: int, stake: float, incentive: float, dividends: float, permit: bool, last: int):
    return bt.MetagraphNeuron(
        uid=uid, hotkey=HOTKEYS[uid], coldkey="5" + "Z" * 47, active=True, validator_permit=permit,
        last_update=last, block_at_registration=1, rank=0.0, trust=0.0, consensus=0.0,
        incentive=incentive, dividends=dividends, pruning_score=0.0, emission=bt.tao(0),
        alpha_stake=bt.tao(stake), tao_stake=bt.tao(0), total_stake=bt.tao(stake), axon=None,
        identity=None, commitment=None,
    )  # fmt: skip


def commitment(hotkey: str, uid: int | None, data: str, block: int):
    return bt.NeuronCommitment(
        hotkey=hotkey, netuid=212, uid=uid, block=block, queried_block=500, deposit=bt.tao(0),
        data=data, encrypted=False, reveal_round=None, revealed=[], fields=[],
    )  # fmt: skip


class StubClient:
    """The SDK calls SubtensorChain makes, answering with SDK types and recording what it sent."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.block = 500
        self.result = bt.ExtrinsicResult(success=True, message="ok")
        neurons = [neuron(1, 2.0, 0.7, 0.0, False, 10), neuron(0, 100.0, 0.0, 1.0, True, 490)]
        graph = bt.Metagraph(
            netuid=212, mechid=0, name="bistro", symbol="b", block=500, tempo=360, last_step=400,
            blocks_since_last_step=100, owner_hotkey="", owner_coldkey="", network_registered_at=0,
            num_uids=2, max_uids=256, price=None, moving_price=None, identity=None, neurons=neurons,
            commitments={}, unregistered_commitments={}, raw={},
        )  # fmt: skip
        comms = {
            HOTKEYS[1]: commitment(HOTKEYS[1], 1, "bucket-new", 480),
            HOTKEYS[2]: commitment(HOTKEYS[2], None, "gone", 100),
        }
        self.subnets = SimpleNamespace(
            metagraph=lambda netuid, commitments=True: graph if netuid == 212 else None,
            commitments=lambda netuid: comms,
        )
        self.weights = SimpleNamespace(weights=lambda netuid: {0: {1: 1.0}})
        self.neurons = SimpleNamespace(
            uid=lambda hotkey, netuid: HOTKEYS.index(hotkey) if hotkey != HOTKEYS[2] else None
        )

    def block_info(self, block: int):
        if block > self.block:
            return None
        return bt.BlockInfo(number=block, hash=f"0x{block:064x}", timestamp=datetime.now(UTC),
                            explorer_url=None, header={}, extrinsics=[])  # fmt: skip

    def submit_call(self, call, wallet, **kwargs):
        self.sent.append(("call", call, kwargs))
        return self.result

    def execute(self, intent, wallet, **kwargs):
        self.sent.append(("intent", intent, kwargs))
        return self.result


def wallet(i: int):
    return SimpleNamespace(hotkey=SimpleNamespace(ss58_address=HOTKEYS[i]), name="w", hotkey_str="h")


@pytest.fixture
def chain_and_stub():
    stub = StubClient()
    return SubtensorChain(ChainConfig(network="test", netuid=212), client=stub), stub


def test_metagraph_maps_sdk_fields_in_uid_order(chain_and_stub) -> None:
    chain, _ = chain_and_stub
    mg = chain.metagraph()
    assert (mg.netuid, mg.block, mg.hotkeys) == (212, 500, HOTKEYS[:2])
    np.testing.assert_array_equal(mg.uids, [0, 1])
    np.testing.assert_allclose(mg.S, [100.0, 2.0])
    np.testing.assert_allclose(mg.I, [0.0, 0.7])
    np.testing.assert_allclose(mg.D, [1.0, 0.0])
    np.testing.assert_array_equal(mg.validator_permit, [True, False])
    np.testing.assert_array_equal(mg.last_update, [490, 10])
    assert mg.weights == {0: {1: 1.0}} and mg.top_validator() == HOTKEYS[0]


def test_missing_subnet_is_a_chain_error() -> None:
    chain = SubtensorChain(ChainConfig(network="test", netuid=7), client=StubClient())
    with pytest.raises(ChainError, match="does not exist"):
        chain.metagraph()


def test_commitments_keep_registered_uids_only(chain_and_stub) -> None:
    chain, _ = chain_and_stub
    assert chain.commitments() == {1: "bucket-new"}


def test_commit_sends_a_raw_field_signed_by_the_hotkey(chain_and_stub) -> None:
    chain, stub = chain_and_stub
    chain.commit(wallet(1), "bucket")
    kind, call, kwargs = stub.sent[-1]
    assert kind == "call" and kwargs == {"signer": "hotkey"}
    assert (call.module, call.function) == ("Commitments", "set_commitment")
    assert call.params == {"netuid": 212, "info": {"fields": [[{"Raw6": b"bucket"}]]}}
    with pytest.raises(ChainError, match="129 bytes"):
        chain.commit(wallet(1), "x" * 129)
    assert len(stub.sent) == 1


def test_set_weights_goes_through_the_sdk_intent_and_maps_refusals(chain_and_stub) -> None:
    chain, stub = chain_and_stub
    chain.set_weights(wallet(0), [1, 0], [0.25, 0.75])
    kind, intent, _ = stub.sent[-1]
    assert kind == "intent" and isinstance(intent, bt.SetWeights)
    assert (intent.netuid, intent.uids, intent.weights) == (212, [1, 0], [0.25, 0.75])
    with pytest.raises(ChainError, match="duplicate"):
        chain.set_weights(wallet(0), [1, 1], [0.5, 0.5])
    assert len(stub.sent) == 1  # refused before reaching the SDK
    stub.result = bt.ExtrinsicResult(success=False, message="SettingWeightsTooFast")
    with pytest.raises(ChainError, match="SettingWeightsTooFast") as info:
        chain.set_weights(wallet(0), [1], [1.0])
    assert not info.value.transient


def test_connection_failures_are_transient(chain_and_stub) -> None:
    chain, stub = chain_and_stub

    def down(*a, **k):
        raise bt.RpcConnectionError("connection refused")

    stub.subnets.commitments = down
    with pytest.raises(ChainError) as info:
        chain.commitments()
    assert info.value.transient


def test_block_hash_and_registration_lookup(chain_and_stub) -> None:
    chain, _ = chain_and_stub
    assert chain.block() == 500
    assert chain.block_hash(5) == f"0x{5:064x}"
    with pytest.raises(ChainError, match="does not exist yet"):
        chain.block_hash(501)
    assert chain.register(wallet(1)) == 1
    with pytest.raises(ChainError, match="btcli subnets register"):
        chain.register(wallet(2))


def test_endpoint_overrides_network() -> None:
    assert network_of(ChainConfig(network="finney")) == "finney"
    assert (
        network_of(ChainConfig(network="test", chain_endpoint="ws://127.0.0.1:9944")) == "ws://127.0.0.1:9944"
    )
