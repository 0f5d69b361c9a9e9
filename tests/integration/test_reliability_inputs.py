"""Bad input: crafted uploads and commitments from one uid never cost the others anything.

Three miners: `a` and `b` upload honest deltas (the real miner path) for window 1; `c` is the
attacker. The real `Validator` scores window 1 once with nothing from `c` (the baseline), then once
per crafted input. Each time `c`'s verdict is the named reason, its score is zero, and the honest
uids' verdicts and losses are bit-identical to the baseline's: the valid set V is {a, b} both times,
so the merge weights (1/|V|), θ_eval and every loss are the same computation on the same bits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import bittensor_core
import pytest
import torch
from safetensors.torch import load as load_safetensors

from bistro import protocol
from bistro.delta.codec import CODECS, codec_context
from bistro.delta.wire import encode_delta

from ..support.reliability_kit import FIRST, World, make_world

W = FIRST
MALLORY = bittensor_core.Keypair.create_from_mnemonic(
    bittensor_core.Keypair.generate_mnemonic(12), bittensor_core.CRYPTO_SR25519
)
PICKLE = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."  # pickle of {"a": 1}
HONEST = ("a", "b")
COMPARED = (
    "verdict",
    "merge_weight",
    "with_local",
    "without_local",
    "with_global",
    "without_global",
    "score",
)


class Net:
    """The module's world, its validator, the honest blobs and the baseline record."""

    def __init__(self, tmp: Path, honest_blobs) -> None:
        from bistro.validator import Validator

        self.world: World = make_world(tmp, ["a", "b", "c"])
        self.blobs: dict[str, bytes] = {
            name: honest_blobs.get(self.world, name, W) for name in ("a", "b", "c")
        }
        for name in HONEST:
            self.world.put(name, W, self.blobs[name])
        self.validator = Validator(self.world.members["val"].settings)
        # The world's windows last 0.1 s, so its budget is 25 ms and its stall bar 12 ms: on a busy
        # machine an honest local read is that slow. No case here is about time: a budget of 5 s.
        self.validator.fetch_budget = lambda: 5.0
        self.baseline = self.evaluate()

    def evaluate(self) -> dict:
        self.validator.evaluate(W)
        lines = (self.validator.state_dir / "windows.jsonl").read_text().splitlines()
        record = json.loads(lines[-1])
        return {self.name_of(int(uid)): r for uid, r in record["uids"].items()}

    def name_of(self, uid: int) -> str:
        return next(m.name for m in self.world.members.values() if m.uid == uid)

    def reset_c(self) -> None:
        """`c` back to nothing uploaded and its own bucket committed."""
        c = self.world.members["c"]
        bucket = self.world.dir / "buckets" / c.bucket
        if bucket.exists():
            for path in sorted(bucket.rglob("*"), key=lambda p: -len(p.parts)):
                path.unlink() if (path.is_symlink() or not path.is_dir()) else path.rmdir()
        self.world.set_commitment("c", c.bucket)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, honest_blobs) -> Net:
    made = Net(tmp_path_factory.mktemp("inputs"), honest_blobs)
    SHAPES.update({name: math.prod(shape) for name, shape in made.validator.evaluator.shapes.items()})
    RECORD.append(CODECS["topk2"].layout(codec_context(made.validator.settings, 0)).record)
    return made


# --- crafting ------------------------------------------------------------------------------------


def split(blob: bytes) -> tuple[dict, dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["bistro"]), blob[8 + n :]


def assemble(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def resign(blob: bytes, keypair, **changes) -> bytes:
    """`blob` with document fields changed and signed again by `keypair`."""
    header, doc, data = split(blob)
    doc.update(changes)
    for key, value in list(doc.items()):
        if value is DROP:
            del doc[key]
    body = {k: v for k, v in doc.items() if k != "signature"}
    doc = {**body, "signature": protocol.sign(keypair, protocol.canonical_json(body))}
    header["__metadata__"]["bistro"] = json.dumps(doc)
    return assemble(header, data)


DROP = object()


def retensor(net: Net, change: Callable[[dict[str, torch.Tensor]], None], window: int = W) -> bytes:
    """`c`'s honest delta with its tensors changed, then hashed and signed properly by `c`."""
    _, doc, _ = split(net.blobs["c"])
    tensors = dict(load_safetensors(net.blobs["c"]))
    change(tensors)
    return encode_delta(
        tensors, keypair=net.world.members["c"].keypair, netuid=doc["netuid"], uid=doc["uid"],
        window=window, codec=doc["codec"], codec_params=doc["codec_params"],
        master_window=doc["master_window"], master_hash=doc["master_hash"],
    )  # fmt: skip


def first(tensors: dict, suffix: str = "") -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


# The default codec (lowrank) and topk2 send one uint8 tensor a parameter: lowrank first the int8
# factors of a matrix and their scales, then (both) per chunk of 4096 a record: the packed bits (low
# index bits, the high-part bitmap, the value codes), then a table of bf16 bin means. topk sends
# `.idx` / `.val` / `.scale` tensors. The crafting below knows all three.
TABLE_BYTES = 2 * (1 << 2)  # four bf16 bin means at value_bits 2
CHUNK = 4096


def is_topk2(t: dict) -> bool:
    return not any(k.endswith(".scale") for k in t)


def tables(t: dict, name: str) -> torch.Tensor:
    """The bin-mean tables of a parameter's chunk records (after lowrank's factors, if any) as a
    writable [chunks, 4] bf16 view of a copy."""
    records = t[name].clone()
    t[name] = records
    chunks = -(-SHAPES[name] // CHUNK)
    body = records[records.numel() - chunks * RECORD[0] :]
    return body.view(chunks, RECORD[0])[:, -TABLE_BYTES:].view(torch.bfloat16)


RECORD: list[int] = []
"""Bytes of one chunk record under the fixture's settings."""
SHAPES: dict[str, int] = {}
"""Parameter sizes by wire name (topk2 records are named like the parameter), filled by the fixture."""


def set_scale(value: float) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        if is_topk2(t):
            name = first(t)
            table = tables(t, name)
            table[0, 0] = value
            return
        name = first(t, ".scale")
        t[name] = t[name].clone()
        t[name][0] = value

    return change


def wrong_shape(t: dict) -> None:
    name = first(t, "" if is_topk2(t) else ".scale")
    t[name] = torch.cat([t[name], t[name][:1]])


def as_float64(t: dict) -> None:
    for name in [k for k in t if is_topk2(t) or k.endswith(".scale")]:
        t[name] = t[name].double()


def scale_up(t: dict) -> None:
    if is_topk2(t):
        for name in list(t):
            table = tables(t, name)
            table.mul_(1e6)
        return
    for name in [k for k in t if k.endswith(".scale")]:
        t[name] = t[name] * 1e6


def zero_indices(t: dict) -> None:
    """topk: every index 0; topk2: an empty bitmap (no index at all in the chunk)."""
    name = first(t, "" if is_topk2(t) else ".idx")
    t[name] = torch.zeros_like(t[name])


def drop_tensor(t: dict) -> None:
    del t[first(t, "" if is_topk2(t) else ".val")]


def flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


def terabyte_entry(blob: bytes) -> bytes:
    header, _, data = split(blob)
    name = first({k: v for k, v in header.items() if k != "__metadata__"})
    header[name] = {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}
    return assemble(header, data)


def duplicate_key(blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    text = blob[8 : 8 + n].decode()
    return assemble('{"__metadata__": {"bistro": "{}"}, ' + text[1:], blob[8 + n :])


def extra_metadata(blob: bytes) -> bytes:
    header, _, data = split(blob)
    header["__metadata__"]["format"] = "pt"
    return assemble(header, data)


def header_claims_terabytes(blob: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + blob[8:]


# --- the cases -----------------------------------------------------------------------------------
# Each case puts something in c's place (bytes at c's key, or a side effect) and names the verdict.

Put = Callable[[Net], None]


def at_key(make: Callable[[Net], bytes]) -> Put:
    return lambda net: net.world.put("c", W, make(net))


def raw_file(make: Callable[[Net], bytes]) -> Put:
    """Bytes at c's key written straight to disk (the store would refuse nothing here anyway)."""

    def put(net: Net) -> None:
        path = net.world.path("c", W)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make(net))

    return put


def c_key(net: Net) -> Path:
    path = net.world.path("c", W)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def symlink_to(target: Callable[[Net], Path]) -> Put:
    return lambda net: c_key(net).symlink_to(target(net))


def hotkey_file(net: Net) -> Path:
    val = net.world.members["val"].settings.wallet
    return Path(val.path) / val.name / "hotkeys" / val.hotkey


def commit(value: str | None) -> Put:
    def put(net: Net) -> None:
        net.world.put("c", W, net.blobs["c"])  # a valid delta sits at c's own key
        net.world.set_commitment("c", value)

    return put


def other_key(net: Net) -> None:
    """c's valid delta under keys that are not c's own: Mallory's name, another file name, window 2."""
    store, blob = net.world.store("c"), net.blobs["c"]
    store.put(protocol.delta_key(212, W, MALLORY.ss58_address), blob)
    store.put(f"bistro/212/deltas/{W}/c.safetensors", blob)
    store.put(protocol.delta_key(212, W + 1, net.world.members["c"].hotkey), blob)


def c_resigned(**changes) -> Callable[[Net], bytes]:
    return lambda net: resign(net.blobs["c"], net.world.members["c"].keypair, **changes)


CASES: dict[str, tuple[Put, str]] = {
    "empty file": (at_key(lambda n: b""), "bad_header"),
    "pickle named .safetensors": (at_key(lambda n: PICKLE), "bad_header"),
    "random bytes": (at_key(lambda n: os.urandom(4096)), "bad_header"),
    "truncated in the header": (at_key(lambda n: n.blobs["c"][:100]), "bad_header"),
    "truncated in the data": (at_key(lambda n: n.blobs["c"][: len(n.blobs["c"]) // 2]), "bad_tensors"),
    "8-byte length claims 1 TiB": (at_key(lambda n: header_claims_terabytes(n.blobs["c"])), "bad_header"),
    "tensor entry claims 1 TiB": (at_key(lambda n: terabyte_entry(n.blobs["c"])), "bad_tensors"),
    "over max_delta_bytes": (at_key(lambda n: n.blobs["c"] + b"\0" * (1 << 20)), "too_large"),
    "right names, wrong shape": (at_key(lambda n: retensor(n, wrong_shape)), "bad_tensors"),
    "right shapes, float64": (at_key(lambda n: retensor(n, as_float64)), "bad_tensors"),
    "a tensor missing": (at_key(lambda n: retensor(n, drop_tensor)), "bad_tensors"),
    "indices not increasing": (at_key(lambda n: retensor(n, zero_indices)), "bad_tensors"),
    "NaN": (at_key(lambda n: retensor(n, set_scale(math.nan))), "non_finite"),
    "Inf": (at_key(lambda n: retensor(n, set_scale(math.inf))), "non_finite"),
    "norm 1e6 times": (at_key(lambda n: retensor(n, scale_up)), "norm_too_large"),
    "bytes changed after signing": (at_key(lambda n: flip_last_byte(n.blobs["c"])), "hash_mismatch"),
    "c's document signed by another key": (
        at_key(lambda n: resign(n.blobs["c"], MALLORY)), "bad_signature"),
    "signed by another hotkey": (
        at_key(lambda n: resign(n.blobs["c"], MALLORY, hotkey=MALLORY.ss58_address)), "wrong_hotkey"),
    "a's delta in c's bucket": (at_key(lambda n: n.blobs["a"]), "wrong_hotkey"),
    "a's delta re-signed by c": (
        at_key(lambda n: resign(n.blobs["a"], n.world.members["c"].keypair, hotkey=n.world.members["c"].hotkey)),
        "copy"),
    "another netuid": (at_key(c_resigned(netuid=213)), "wrong_netuid"),
    "a later window": (at_key(lambda n: retensor(n, lambda t: None, window=W + 1)), "wrong_window"),
    "replay of an older window": (at_key(lambda n: retensor(n, lambda t: None, window=W - 1)), "wrong_window"),
    "another master": (at_key(c_resigned(master_hash="00" * 32)), "wrong_master"),
    "a field missing": (at_key(c_resigned(codec_params=DROP)), "bad_header"),
    "unknown format version": (at_key(c_resigned(version=99)), "bad_header"),
    "window as a bool": (at_key(c_resigned(window=True)), "bad_header"),
    "another codec claimed": (at_key(c_resigned(codec="dense")), "bad_header"),
    "duplicate JSON keys": (at_key(lambda n: duplicate_key(n.blobs["c"])), "bad_header"),
    "extra header metadata": (at_key(lambda n: extra_metadata(n.blobs["c"])), "bad_header"),
    "only under other keys": (other_key, "missing"),
    "raw file write of a pickle": (raw_file(lambda n: PICKLE), "bad_header"),
    "symlink to a's delta": (symlink_to(lambda n: n.world.path("a", W)), "missing"),
    "symlink to the validator's hotkey file": (symlink_to(hotkey_file), "missing"),
    "a FIFO at the key": (lambda n: os.mkfifo(c_key(n)), "peer_error"),
    "a directory at the key": (lambda n: c_key(n).mkdir(), "peer_error"),
    "commitment https://": (commit("https://"), "bad_commitment"),
    "commitment s3://": (commit("s3://"), "bad_commitment"),
    "commitment ../x": (commit("../x"), "bad_commitment"),
    "commitment 200 chars": (commit("a" * 200), "bad_commitment"),
    "commitment with NUL": (commit("bistro-c\x00x"), "bad_commitment"),
    "commitment http off loopback": (commit("http://169.254.169.254/bucket"), "bad_commitment"),
    "commitment file://": (commit("file:///etc/passwd"), "bad_commitment"),
    "commitment with credentials": (commit("https://user:pw@example.invalid/bucket"), "bad_commitment"),
    "commitment to a nonexistent bucket": (commit("bistro-doesnotexist0"), "missing"),
    "commitment to a's bucket": (lambda n: n.world.set_commitment("c", n.world.members["a"].bucket), "missing"),
    "no commitment": (commit(None), "missing"),
}  # fmt: skip


def test_the_corpus_covers_every_reason() -> None:
    from bistro.delta.signed import Reason

    assert {r.value for r in Reason} <= {verdict for _, verdict in CASES.values()}
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_upload_costs_only_its_uid(net: Net, case: str, caplog: pytest.LogCaptureFixture) -> None:
    put, verdict = CASES[case]
    net.reset_c()
    put(net)
    with caplog.at_level(logging.INFO, logger="bistro"):
        got = net.evaluate()
    net.reset_c()
    assert got["c"]["verdict"] == verdict, case
    assert got["c"]["score"] == 0.0 and got["c"]["merge_weight"] == 0.0
    for name in HONEST:
        assert got[name]["verdict"] == "ok"
        assert {k: got[name][k] for k in COMPARED} == {k: net.baseline[name][k] for k in COMPARED}, name
    if verdict in ("peer_error", "timeout"):
        assert f": {verdict}: " in caplog.text
    elif verdict not in ("missing", "copy", "too_large", "bad_commitment"):
        assert f"rejected ({verdict})" in caplog.text
    secret = hotkey_file(net).read_text()
    assert secret[20:60] not in caplog.text


def test_a_valid_upload_from_c_does_change_the_others(net: Net) -> None:
    """The control: the comparison above can fail. With c valid, |V| = 3 and a's score moves."""
    net.reset_c()
    net.world.put("c", W, net.blobs["c"])
    got = net.evaluate()
    net.reset_c()
    assert got["c"]["verdict"] == "ok"
    assert got["a"]["merge_weight"] != net.baseline["a"]["merge_weight"]
    assert got["a"]["score"] != net.baseline["a"]["score"]
