"""The Bittensor adapter over the real SDK, with only the SDK's chain-access seam faked.

`SubtensorChain` runs over a real `bittensor.SyncClient`; its `Substrate` is the SDK's own
`FakeSubstrate` (from the SDK's source release, see tests/support/bittensor_sdk.py). The runtime-API
records it serves were encoded and decoded by the recorded runtime's codec, so their shapes are the
chain's: stake in rao of the subnet's alpha, scores as u16 fractions, names as byte lists. Writes are
recorded by the fake, never applied: the tests assert on the composed calls.
"""

from __future__ import annotations

import logging
import threading

import bittensor as bt
import numpy as np
import pytest

from bistro.chain.base import ChainError
from bistro.chain.retry import RetryingChain
from bistro.chain.subtensor import SubtensorChain, network_of
from bistro.config import ChainConfig
from tests.support import bittensor_sdk

NETUID = 212
RAO = 10**9


def keypair(uri: str):
    return bt.keyfiles.Keypair.create_from_uri(uri)


HOTKEYS = [keypair(f"//Bistro//hot{i}").ss58_address for i in range(4)]
COLDKEY = keypair("//Bistro").ss58_address
# uid: (alpha stake, incentive u16, dividends u16, permit, last_update, validator_trust u16)
NEURONS = {
    0: (1500.25, 0, 65535, True, 490, 65535),
    1: (2.5, 45875, 0, False, 10, 0),
    2: (0.0, 19660, 0, False, 12, 0),
}


def wallet(i: int):
    """A wallet the SDK can sign with (dev keys, no files), shaped like bittensor.Wallet."""
    w = bittensor_sdk.harness()["samples"].dev_wallet("//Bistro", f"//Bistro//hot{i}")
    w.name, w.hotkey_str = "bistro", f"hot{i}"
    return w


def metagraph_record(**overrides) -> dict:
    """The subnet's `get_metagraph` answer, built on a recorded value and passed through the codec."""
    n = len(NEURONS)
    col = [NEURONS[u] for u in range(n)]
    record = dict(bittensor_sdk.shape_sample("pallet_subtensor::rpc_info::metagraph::Metagraph"))
    axon = {
        "block": 0,
        "version": 0,
        "ip": 0,
        "port": 0,
        "ip_type": 4,
        "protocol": 4,
        "placeholder1": 0,
        "placeholder2": 0,
    }
    record.update(
        netuid=NETUID, name=list(b"bistro"), symbol=list("ש".encode()), block=500, tempo=360,
        hotkeys=HOTKEYS[:n], coldkeys=[COLDKEY] * n, active=[True] * n,
        validator_permit=[c[3] for c in col], last_update=[c[4] for c in col],
        block_at_registration=[1] * n, incentives=[c[1] for c in col], dividends=[c[2] for c in col],
        total_stake=[int(c[0] * RAO) for c in col], alpha_stake=[int(c[0] * RAO) for c in col],
        tao_stake=[0] * n, emission=[0] * n, rank=[0] * n, trust=[0] * n, consensus=[0] * n,
        pruning_score=[0] * n, axons=[axon] * n, identities=[None] * n, num_uids=n, max_uids=256,
        weights_version=21706, commit_reveal_weights_enabled=True, collateral_locked=[0] * n,
        collateral_min=[0] * n, collateral_earned=[0] * n,
    )  # fmt: skip
    record.update(overrides)
    return bittensor_sdk.through_codec("SubnetInfoRuntimeApi", "get_metagraph", record)


def neurons_lite(hotkeys: list[str] = HOTKEYS) -> list[dict]:
    """`get_neurons_lite` (the source of validator trust), through the codec."""
    template = {
        "axon_info": {"block": 0, "version": 0, "ip": 0, "port": 0, "ip_type": 4, "protocol": 4,
                      "placeholder1": 0, "placeholder2": 0},
        "prometheus_info": {"block": 0, "version": 0, "ip": 0, "port": 0, "ip_type": 4},
        "rank": 0, "emission": 0, "consensus": 0, "trust": 0, "pruning_score": 0, "active": True,
    }  # fmt: skip
    records = [
        {**template, "hotkey": hotkeys[u], "coldkey": COLDKEY, "uid": u, "netuid": NETUID,
         "stake": [[COLDKEY, int(c[0] * RAO)]], "incentive": c[1], "dividends": c[2],
         "validator_permit": c[3], "last_update": c[4], "validator_trust": c[5]}
        for u, c in NEURONS.items()
    ]  # fmt: skip
    return bittensor_sdk.through_codec("NeuronInfoRuntimeApi", "get_neurons_lite", records)


def raw_commitment(data: bytes, block: int) -> dict:
    """A Commitments.CommitmentOf entry as the codec decodes it."""
    return {"deposit": 0, "block": block, "info": {"fields": [{f"Raw{len(data)}": "0x" + data.hex()}]}}


@pytest.fixture
def substrate():
    fake = bittensor_sdk.harness()["fake_substrate"].FakeSubstrate()
    fake.block, fake.finalized = 500, 498
    graph, lite = metagraph_record(), neurons_lite()
    fake.seed_runtime("SubnetInfoRuntimeApi", "get_metagraph", lambda p: graph if p[0] == NETUID else None)
    fake.seed_runtime("NeuronInfoRuntimeApi", "get_neurons_lite", lambda p: lite if p[0] == NETUID else [])
    fake.seed_map("SubtensorModule", "Weights", [(0, [(1, 65535), (2, 21845)])])
    fake.seed_map("SubtensorModule", "Uids", [(HOTKEYS[u], u) for u in NEURONS])
    fake.seed_default("SubtensorModule", "Uids", None)  # unregistered unless seeded
    for u in NEURONS:
        fake.seed("SubtensorModule", "Uids", [NETUID, HOTKEYS[u]], u)
    fake.seed("SubtensorModule", "WeightsVersionKey", [NETUID], 21706)
    fake.seed_map(
        "Commitments",
        "CommitmentOf",
        [
            (HOTKEYS[1], raw_commitment(b"bucket-new", 480)),
            (HOTKEYS[2], raw_commitment(b"\xff\xfe-not-text", 470)),
            (HOTKEYS[3], raw_commitment(b"gone", 100)),  # deregistered: no uid
        ],
    )
    return fake


def make_chain(substrate, **cfg) -> SubtensorChain:
    client = bt.SyncClient("test", substrate=substrate)
    return SubtensorChain(ChainConfig(network="test", netuid=NETUID, **cfg), client=client)


@pytest.fixture
def chain(substrate):
    c = make_chain(substrate)
    yield c
    c.close()


def test_metagraph_maps_alpha_stake_scores_permits_weights_and_trust(chain) -> None:
    mg = chain.metagraph()
    assert (mg.netuid, mg.block, mg.hotkeys) == (NETUID, 500, HOTKEYS[:3])
    np.testing.assert_array_equal(mg.uids, [0, 1, 2])
    np.testing.assert_allclose(mg.S, [1500.25, 2.5, 0.0])  # alpha, read without `.tao`
    np.testing.assert_allclose(mg.I, [0.0, 45875 / 65535, 19660 / 65535])
    np.testing.assert_allclose(mg.D, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(mg.validator_permit, [True, False, False])
    np.testing.assert_array_equal(mg.last_update, [490, 10, 12])
    np.testing.assert_allclose(mg.validator_trust, [1.0, 0.0, 0.0])
    assert mg.weights == {0: {1: 0.75, 2: 0.25}}
    assert mg.top_validator() == HOTKEYS[0] and mg.validator_trust_of(0) == 1.0


def test_missing_subnet_is_a_chain_error(substrate) -> None:
    chain = make_chain(substrate)
    chain.netuid = 7
    with pytest.raises(ChainError, match="does not exist") as info:
        chain.metagraph()
    assert not info.value.transient


def test_commitments_keep_registered_utf8_text_only(chain, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert chain.commitments() == {1: "bucket-new"}
    assert "not UTF-8" in caplog.text  # uid 2's bytes are never handed out as a `0x…` bucket


def test_commit_sends_a_raw_field_signed_by_the_hotkey(chain, substrate) -> None:
    chain.commit(wallet(1), "bucket")
    call, signer, _ = substrate.submissions[-1]
    assert signer == HOTKEYS[1]
    assert (call.module, call.function) == ("Commitments", "set_commitment")
    assert call.params == {"netuid": NETUID, "info": {"fields": [[{"Raw6": b"bucket"}]]}}
    with pytest.raises(ChainError, match="129 bytes"):
        chain.commit(wallet(1), "x" * 129)
    assert len(substrate.submissions) == 1


def test_set_weights_sends_u16_mechanism_weights_with_the_subnets_version_key(chain, substrate) -> None:
    substrate.seed("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    chain.set_weights(wallet(0), [1, 2], [0.75, 0.25])
    call, signer, _ = substrate.submissions[-1]
    assert signer == HOTKEYS[0]
    assert (call.module, call.function) == ("SubtensorModule", "set_mechanism_weights")
    assert call.params == {"netuid": NETUID, "mecid": 0, "dests": [1, 2], "weights": [65535, 21845],
                           "version_key": 21706}  # fmt: skip


def test_version_key_flag_overrides_the_subnets(substrate) -> None:
    substrate.seed("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    chain = make_chain(substrate, version_key=7)
    chain.set_weights(wallet(0), [1], [1.0])
    assert substrate.last_call.params["version_key"] == 7


def test_commit_reveal_goes_through_the_timelocked_path_and_is_logged_as_committed(
    chain, substrate, caplog
) -> None:
    substrate.seed("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], True)
    substrate.seed("SubtensorModule", "RevealPeriodEpochs", [NETUID], 1)
    with caplog.at_level(logging.INFO):
        chain.set_weights(wallet(0), [1, 2], [0.75, 0.25])
    call = substrate.last_call
    assert (call.module, call.function) == ("SubtensorModule", "commit_timelocked_mechanism_weights")
    assert call.params["netuid"] == NETUID and len(call.params["commit"]) > 0
    assert "committed (commit-reveal)" in caplog.text and str(call.params["reveal_round"]) in caplog.text
    assert len(substrate.submissions) == 1  # no reveal is sent, nothing waits for one


def test_clipping_by_max_weights_limit_is_warned_with_the_numbers(chain, substrate, caplog) -> None:
    substrate.seed("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    substrate.seed("SubtensorModule", "MaxWeightsLimit", [NETUID], 32767)
    with caplog.at_level(logging.WARNING):
        chain.set_weights(wallet(0), [1, 2], [0.9, 0.1])
    assert "MaxWeightsLimit" in caplog.text and "0.9000" in caplog.text and "0.5000" in caplog.text
    weights = substrate.last_call.params["weights"]
    assert weights[0] == 65535 and weights[1] > 60000  # the SDK spread the excess


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda s: s.seed("SubtensorModule", "Uids", [NETUID, HOTKEYS[0]], None), "not registered"),
        (lambda s: (s.seed("SubtensorModule", "WeightsSetRateLimit", [NETUID], 100),
                    s.seed("SubtensorModule", "LastUpdate", [NETUID], [495, 0, 0])), "rate limit"),
        (lambda s: s.seed("SubtensorModule", "MinAllowedWeights", [NETUID], 3), "at least 3"),
    ],
    ids=["unregistered", "rate_limited", "too_few_weights"],
)  # fmt: skip
def test_refusals_send_nothing_and_are_not_retried(substrate, setup, reason) -> None:
    setup(substrate)
    inner = make_chain(substrate)
    calls = []
    real = inner.client.execute
    inner.client.execute = lambda *a, **k: calls.append(1) or real(*a, **k)
    with pytest.raises(ChainError, match=reason) as info:
        RetryingChain(inner, base_delay=0.01).set_weights(wallet(0), [1, 2], [0.5, 0.5])
    assert not info.value.transient
    assert calls == [1] and substrate.submissions == []


def test_a_refused_extrinsic_is_a_chain_error(chain, substrate) -> None:
    substrate.seed("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    substrate.queue_result(bt.ExtrinsicResult(success=False, message="SettingWeightsTooFast"))
    with pytest.raises(ChainError, match="SettingWeightsTooFast") as info:
        chain.set_weights(wallet(0), [1], [1.0])
    assert not info.value.transient


class Broken(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (bt.RpcConnectionError("connection refused"), True),
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (ValueError("Storage function SubtensorModule.Weights not found"), False),  # StorageFunctionNotFound
        (KeyError("validator_permit"), False),  # a record the SDK cannot decode
        (TypeError("'NoneType' object is not subscriptable"), False),
        (bt.BittensorError("bad input"), False),
    ],
)
def test_every_exception_from_the_sdk_is_a_chain_error(substrate, error, transient) -> None:
    def fail(*a, **k):
        raise error

    substrate.query_map = fail
    chain = make_chain(substrate)
    with pytest.raises(ChainError) as info:
        chain.commitments()
    assert info.value.transient is transient


def test_a_call_that_hangs_is_bounded(substrate) -> None:
    release = threading.Event()

    async def hang(*a, **k):
        import asyncio

        while not release.is_set():
            await asyncio.sleep(0.01)
        return []

    substrate.query_map = hang
    chain = make_chain(substrate, call_timeout=0.3)
    try:
        with pytest.raises(ChainError, match="no answer") as info:
            chain.commitments()
        assert info.value.transient
    finally:
        release.set()
        chain.close()


def test_block_time_and_blocks_come_from_the_chain(chain, substrate) -> None:
    assert chain.block_time == 12.0  # Aura.SlotDuration
    assert RetryingChain(chain).block_time == 12.0
    substrate.seed_constant("Aura", "SlotDuration", 250)
    assert chain.block_time == 12.0  # read once
    assert chain.block() == 500 and chain.finalized_block() == 498


def test_seeds_come_from_finalized_blocks_only(substrate) -> None:
    chain = make_chain(substrate, finality_timeout=0.4)
    assert chain.block_hash(498) == f"0x{498:064x}"
    with pytest.raises(ChainError, match="not finalized") as info:
        chain.block_hash(499)  # exists, but a reorg could still replace it
    assert info.value.transient
    with pytest.raises(ChainError, match="does not exist yet"):
        chain.block_hash(501)
    substrate.seed_constant("Aura", "SlotDuration", 100)  # 0.1 s blocks: the wait polls each 0.05 s
    fast = make_chain(substrate, finality_timeout=5.0)
    threading.Timer(0.2, lambda: setattr(substrate, "finalized", 499)).start()
    assert fast.block_hash(499) == f"0x{499:064x}"


def test_registration_lookup(chain) -> None:
    assert chain.register(wallet(1)) == 1
    with pytest.raises(ChainError, match="btcli subnets register"):
        chain.register(wallet(3))


def test_versions_name_the_sdk_and_runtime(chain) -> None:
    assert chain.versions() == {"sdk": bt.__version__, "spec_version": 300}


def test_endpoint_overrides_network() -> None:
    assert network_of(ChainConfig(network="finney")) == "finney"
    assert (
        network_of(ChainConfig(network="test", chain_endpoint="ws://127.0.0.1:9944")) == "ws://127.0.0.1:9944"
    )
