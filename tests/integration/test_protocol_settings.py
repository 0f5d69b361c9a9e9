"""Protocol settings apart from local ones: the publisher signs them into LATEST.json, and a node
whose own differ refuses to run, naming the fields (design.md, "Settings")."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from bistro import protocol
from bistro.config import LOCAL_MECHANISM, build_settings, protocol_settings, replace
from bistro.master import Follower, ProtocolMismatch, Publisher
from bistro.storage import LocalStore

from ..support.reliability_kit import World, make_world


def test_protocol_settings_cover_what_nodes_must_agree_on_and_leave_local_choices_out() -> None:
    tiny = build_settings("tiny", None, {})
    base = protocol_settings(tiny)
    assert base == protocol_settings(build_settings("tiny", None, {}))  # stable
    for local in sorted(LOCAL_MECHANISM):  # a node's own choice changes nothing
        value = getattr(tiny.mechanism, local)
        other = (not value) if isinstance(value, bool) else value * 2
        assert protocol_settings(replace(tiny, **{f"mechanism.{local}": other})).digest == base.digest, local
    changed = protocol_settings(replace(tiny, **{"mechanism.eval_pages": 1, "model.seed": 7}))
    assert changed.digest != base.digest
    assert [d.split(":")[0] for d in base.differences(changed.as_dict())] == [
        "mechanism.eval_pages",
        "model.seed",
    ]
    small = protocol_settings(build_settings("small", None, {}))
    assert "model.hidden_size" in {d.split(":")[0] for d in base.differences(small.as_dict())}


def test_a_follower_refuses_a_publisher_with_other_protocol_settings(tmp_path) -> None:
    import bittensor_core

    key = bittensor_core.Keypair.create_from_uri("//Alice")
    tiny = build_settings("tiny", None, {})
    store = LocalStore(tmp_path, "publisher")
    Publisher(store, key, 212, protocol_settings(tiny)).latest(3, "ab" * 32, [3])
    doc = json.loads(store.get(protocol.latest_key(212), max_bytes=1 << 16))
    assert doc["protocol_hash"] == protocol_settings(tiny).digest and doc["protocol"]["chain.netuid"] == 212
    same = Follower(212, {}, 1, protocol_settings(tiny))
    assert same.latest(store, key.ss58_address)["window"] == 3
    other = Follower(212, {}, 1, protocol_settings(build_settings("small", None, {})))
    with pytest.raises(ProtocolMismatch, match="model.hidden_size"):
        other.latest(store, key.ss58_address)
    # the fields are signed: editing them breaks the signature, it does not slip past the check
    doc["protocol"]["mechanism.eval_pages"] = 1
    store.put(protocol.latest_key(212), json.dumps(doc).encode())
    with pytest.raises(Exception, match="not signed"):
        same.latest(store, key.ss58_address)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("protocol"), ["a"])


def test_a_miner_with_other_protocol_settings_stops_and_names_the_fields(world: World, caplog) -> None:
    """Two settings, one network: the top validator published with the world's settings; a miner
    whose eval_pages differ exits 2 and says which field, one whose local settings differ mines."""
    from bistro.miner import main

    caplog.set_level(logging.INFO, logger="bistro")
    theirs = replace(world.members["a"].settings, **{"mechanism.eval_pages": 2})
    assert main(theirs, argparse.Namespace(windows=1)) == 2
    assert "protocol settings differ" in caplog.text and "mechanism.eval_pages: 2 != 1" in caplog.text
    caplog.clear()
    ours = replace(world.members["a"].settings, **{"mechanism.retention_windows": 9})
    assert main(ours, argparse.Namespace(windows=1)) == 0
    assert "protocol settings differ" not in caplog.text
