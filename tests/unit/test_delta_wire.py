"""The wire: a valid delta round-trips; every rejection reason is reached by a crafted blob."""

from __future__ import annotations

import json
from typing import Any

import bittensor_core
import pytest
import torch
import transformers

from bistro import protocol
from bistro.config import build_settings
from bistro.delta import (
    CODECS,
    CodecContext,
    DeltaRejected,
    Expectation,
    Reason,
    SignedObjectError,
    decode_delta,
    encode_delta,
    pack_signed,
    unpack_signed,
)

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")
MALLORY = bittensor_core.Keypair.create_from_mnemonic(
    bittensor_core.Keypair.generate_mnemonic(12), bittensor_core.CRYPTO_SR25519
)
MASTER = "ab" * 32
PICKLE = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."  # pickle of {"a": 1}


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    model = transformers.LlamaForCausalLM(llama_config_tiny())
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def llama_config_tiny() -> transformers.LlamaConfig:
    from bistro.model import llama_config

    return llama_config(build_settings("tiny").model)


def ctx_for(codec: str) -> CodecContext:
    return CodecContext(netuid=212, window=9, compression=300.0 if codec == "mask" else 100.0)


def expectation(shapes: dict, codec: str = "topk", **changes: Any) -> Expectation:
    fields = dict(
        netuid=212,
        window=9,
        hotkey=ALICE.ss58_address,
        master_hash=MASTER,
        codec=codec,
        ctx=ctx_for(codec),
        shapes=shapes,
        max_bytes=16 * 2**20,
        max_norm=50.0,
    )
    return Expectation(**{**fields, **changes})


def wire_tensors(shapes: dict, codec: str = "topk", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    return CODECS[codec].encode(delta, ctx_for(codec))


def blob_of(tensors: dict, codec: str = "topk", keypair: Any = ALICE, **changes: Any) -> bytes:
    args = dict(
        keypair=keypair,
        netuid=212,
        uid=3,
        window=9,
        codec=codec,
        codec_params=CODECS[codec].params(ctx_for(codec)),
        master_window=8,
        master_hash=MASTER,
    )
    return encode_delta(tensors, **{**args, **changes})


def split(blob: bytes) -> tuple[dict, dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["bistro"]), blob[8 + n :]


def assemble(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def with_doc(blob: bytes, keypair: Any = ALICE, resign: bool = True, **changes: Any) -> bytes:
    """The blob with document fields changed (and signed again by `keypair` unless told not to)."""
    header, doc, data = split(blob)
    doc.update(changes)
    if resign:
        body = {k: v for k, v in doc.items() if k != "signature"}
        doc = {**body, "signature": protocol.sign(keypair, protocol.canonical_json(body))}
    header["__metadata__"]["bistro"] = json.dumps(doc)
    return assemble(header, data)


def reason_of(blob: bytes, exp: Expectation) -> Reason:
    with pytest.raises(DeltaRejected) as info:
        decode_delta(blob, exp)
    return info.value.reason


@pytest.mark.parametrize("codec", ["topk", "topk2", "mask", "dense"])
def test_round_trip(shapes: dict, codec: str) -> None:
    tensors = wire_tensors(shapes, codec)
    decoded = decode_delta(blob_of(tensors, codec), expectation(shapes, codec))
    want = CODECS[codec].decode(tensors, ctx_for(codec), shapes)
    assert decoded.header["hotkey"] == ALICE.ss58_address and decoded.header["uid"] == 3
    assert decoded.header["version"] == protocol.FORMAT_VERSION
    for name in shapes:
        got, exp = decoded.delta[name], want[name]
        if isinstance(exp, torch.Tensor):
            assert torch.equal(got, exp)
        else:
            assert torch.equal(got.indices, exp.indices) and torch.equal(got.values, exp.values)
    assert 0 < decoded.norm < 50


def test_an_inconsistent_expectation_is_a_programming_error(shapes: dict) -> None:
    with pytest.raises(ValueError):
        expectation(shapes, ctx=CodecContext(212, 10, 100.0))
    with pytest.raises(ValueError):
        expectation(shapes, codec="gzip")


def test_the_reason_set_is_exactly_the_contract() -> None:
    assert {r.value for r in Reason} == {
        "too_large", "bad_header", "bad_signature", "wrong_hotkey", "wrong_netuid", "wrong_window",
        "wrong_master", "bad_tensors", "non_finite", "norm_too_large", "hash_mismatch",
    }  # fmt: skip


def test_too_large(shapes: dict) -> None:
    blob = blob_of(wire_tensors(shapes))
    assert reason_of(blob, expectation(shapes, max_bytes=len(blob) - 1)) is Reason.too_large


def test_bad_headers(shapes: dict) -> None:
    exp = expectation(shapes)
    blob = blob_of(wire_tensors(shapes))
    header, doc, data = split(blob)
    deep = b"[" * 100000 + b"]" * 100000
    cases = {
        "empty": b"",
        "four bytes": blob[:4],
        "truncated header": blob[:100],
        "pickle": PICKLE,
        "length past the end": (10**9).to_bytes(8, "little") + blob[8:],
        "not json": b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}",
        "not utf-8": b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe\xfd\xfc",
        "json array": b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
        "deep json": len(deep).to_bytes(8, "little") + deep,
        "huge int": assemble({"__metadata__": {"bistro": "1" * 5000}}, b""),
        "no metadata": assemble({k: v for k, v in header.items() if k != "__metadata__"}, data),
        "extra metadata": assemble({**header, "__metadata__": {**header["__metadata__"], "x": "y"}}, data),
        "document not json": assemble({**header, "__metadata__": {"bistro": "{nope"}}, data),
        "NaN in document": with_doc(blob, resign=False, uid=float("nan")),
        "missing field": assemble(
            {**header, "__metadata__": {"bistro": json.dumps({k: v for k, v in doc.items() if k != "uid"})}},
            data,
        ),
        "extra field": with_doc(blob, extra=1),
        "bool uid": with_doc(blob, uid=True),
        "string window": with_doc(blob, window="9"),
        "short hash": with_doc(blob, tensors_sha256="ab"),
        "a later version": with_doc(blob, version=protocol.FORMAT_VERSION + 1),
        "version 1 (sum merge, topk)": with_doc(blob, version=1),
        "other codec": with_doc(blob, codec="mask"),
        "lone surrogate": with_doc(blob, resign=False, master_hash="\ud800"),  # cannot be canonical JSON
        "other codec params": with_doc(blob, codec_params={"compression": 10.0, "chunk": 4096}),
    }
    for what, bad in cases.items():
        assert reason_of(bad, exp) is Reason.bad_header, what
    assert reason_of(blob, expectation(shapes, uid=4)) is Reason.bad_header


def test_duplicate_json_keys_are_refused(shapes: dict) -> None:
    blob = blob_of(wire_tensors(shapes))
    n = int.from_bytes(blob[:8], "little")
    raw = blob[8 : 8 + n].rstrip()
    doubled = raw[:-1] + b',"__metadata__":{"bistro":"{}"}}'
    assert reason_of(len(doubled).to_bytes(8, "little") + doubled + blob[8 + n :], expectation(shapes)) is (
        Reason.bad_header
    )


def test_signatures(shapes: dict) -> None:
    tensors = wire_tensors(shapes)
    exp = expectation(shapes)
    # Mallory signs its own delta honestly, but the chain has Alice at this uid.
    assert reason_of(blob_of(tensors, keypair=MALLORY), exp) is Reason.wrong_hotkey
    # Mallory claims to be Alice: the signature is another hotkey's.
    forged = with_doc(blob_of(tensors), keypair=MALLORY)
    assert reason_of(forged, exp) is Reason.bad_signature
    # Alice's document changed after signing.
    assert reason_of(with_doc(blob_of(tensors), resign=False, uid=4), exp) is Reason.bad_signature
    assert (
        reason_of(with_doc(blob_of(tensors), resign=False, signature="00" * 64), exp) is Reason.bad_signature
    )
    assert reason_of(with_doc(blob_of(tensors), resign=False, signature="zz"), exp) is Reason.bad_signature


def test_wrong_netuid_window_master(shapes: dict) -> None:
    tensors, exp = wire_tensors(shapes), expectation(shapes)
    assert reason_of(blob_of(tensors, netuid=213), exp) is Reason.wrong_netuid
    assert reason_of(blob_of(tensors, window=8), exp) is Reason.wrong_window
    assert reason_of(blob_of(tensors, master_hash="cd" * 32), exp) is Reason.wrong_master
    assert reason_of(blob_of(tensors), expectation(shapes, master_window=7)) is Reason.wrong_master


def test_bad_tensors(shapes: dict) -> None:
    exp = expectation(shapes)
    good = wire_tensors(shapes)
    name = "model.embed_tokens.weight.val"
    cases = {
        "wrong shape": {**good, name: good[name][:-1]},
        "float64 values": {
            **good,
            name.replace(".val", ".scale"): good[name.replace(".val", ".scale")].double(),
        },
        "missing tensor": {k: v for k, v in good.items() if k != name},
        "extra tensor": {**good, "lm_head.bias": torch.zeros(4096)},
    }
    for what, tensors in cases.items():
        assert reason_of(blob_of(tensors), exp) is Reason.bad_tensors, what
    dense = {n: t.double() for n, t in wire_tensors(shapes, "dense").items()}
    assert reason_of(blob_of(dense, "dense"), expectation(shapes, "dense")) is Reason.bad_tensors


def test_a_header_claiming_a_terabyte_tensor_never_allocates(shapes: dict) -> None:
    blob = blob_of(wire_tensors(shapes))
    header, _, data = split(blob)
    name = "model.embed_tokens.weight.val"
    begin = header[name]["data_offsets"][0]
    header[name] = {"dtype": "I8", "shape": [2**40], "data_offsets": [begin, begin + 2**40]}
    assert reason_of(with_doc(assemble(header, data)), expectation(shapes)) is Reason.bad_tensors
    # the same claim in a header where nothing else is checked first
    bare = assemble({"x": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}, b"\0" * 16)
    assert reason_of(bare, expectation(shapes)) is Reason.bad_header


def test_offsets_must_tile_the_data(shapes: dict) -> None:
    blob = blob_of(wire_tensors(shapes))
    exp = expectation(shapes)
    header, _, data = split(blob)
    assert (
        reason_of(with_doc(assemble(header, data + b"\0" * 8)), exp) is Reason.bad_tensors
    )  # trailing bytes
    assert reason_of(with_doc(assemble(header, data[:-1])), exp) is Reason.bad_tensors  # truncated data
    name = "model.norm.weight.val"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4, end + 4]  # right size, but a gap before and an overlap after
    assert reason_of(with_doc(assemble(header, data)), exp) is Reason.bad_tensors


def test_codec_level_violations_are_bad_tensors(shapes: dict) -> None:
    from bistro.delta.codec import pack12, unpack12

    tensors = wire_tensors(shapes)
    name = "model.norm.weight"  # 128 entries in one chunk of 4096: k = 41 positions, the rest is padding
    local = unpack12(tensors[f"{name}.idx"], 41)
    local[1] = local[0]
    assert (
        reason_of(blob_of({**tensors, f"{name}.idx": pack12(local)}), expectation(shapes))
        is Reason.bad_tensors
    )
    local = unpack12(tensors[f"{name}.idx"], 41)
    local[-1] = 4000  # a padding position (beyond the 128 real entries) ...
    vals = tensors[f"{name}.val"].clone()
    vals[-1] = 5  # ... carrying a value
    bad = {**tensors, f"{name}.idx": pack12(local), f"{name}.val": vals}
    assert reason_of(blob_of(bad), expectation(shapes)) is Reason.bad_tensors


def test_hash_mismatch(shapes: dict) -> None:
    blob = bytearray(blob_of(wire_tensors(shapes)))
    blob[-10] ^= 0x01
    assert reason_of(bytes(blob), expectation(shapes)) is Reason.hash_mismatch
    # the hash binds names too: swap two same-shape tensors' names, keep the signed document
    header, _, data = split(blob_of(wire_tensors(shapes)))
    a, b = "model.layers.0.self_attn.q_proj.weight.val", "model.layers.0.self_attn.k_proj.weight.val"
    header[a], header[b] = header[b], header[a]
    assert reason_of(assemble(header, data), expectation(shapes)) is Reason.hash_mismatch


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(shapes: dict, bad: float) -> None:
    tensors = wire_tensors(shapes, "mask")
    tensors["lm_head.weight"][3] = bad
    assert reason_of(blob_of(tensors, "mask"), expectation(shapes, "mask")) is Reason.non_finite
    scales = wire_tensors(shapes)
    scales["lm_head.weight.scale"][0] = bad
    assert reason_of(blob_of(scales), expectation(shapes)) is Reason.non_finite


def test_norm_too_large(shapes: dict) -> None:
    tensors = wire_tensors(shapes)
    assert reason_of(blob_of(tensors), expectation(shapes, max_norm=1e-6)) is Reason.norm_too_large
    tensors["lm_head.weight.scale"][0] = 3e38  # finite scale, but 127 * scale overflows to inf
    assert reason_of(blob_of(tensors), expectation(shapes)) is Reason.norm_too_large


def test_signed_objects_round_trip_and_refusals() -> None:
    tensors = {"w": torch.randn(4, 3), "step": torch.tensor([7], dtype=torch.int64)}
    blob = pack_signed(tensors, {"netuid": 212, "window": 5, "kind": "checkpoint"}, ALICE)
    doc, back = unpack_signed(blob, signer=ALICE.ss58_address, max_bytes=2**20, expect={"window": 5})
    assert doc["kind"] == "checkpoint" and doc["signer"] == ALICE.ss58_address
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)

    def refusal(data: bytes, **kw: Any) -> Reason:
        args = {"signer": ALICE.ss58_address, "max_bytes": 2**20, **kw}
        with pytest.raises(SignedObjectError) as info:
            unpack_signed(data, **args)
        return info.value.reason

    assert refusal(blob, max_bytes=100) is Reason.too_large
    assert refusal(b"") is Reason.bad_header
    assert refusal(blob, signer=MALLORY.ss58_address) is Reason.wrong_hotkey
    assert refusal(blob, expect={"window": 6}) is Reason.wrong_window
    assert refusal(blob, expect={"netuid": 1}) is Reason.wrong_netuid
    assert refusal(blob, expect={"master_hash": "x"}) is Reason.wrong_master
    assert refusal(with_doc(blob, resign=False, window=6)) is Reason.bad_signature
    tampered = bytearray(blob)
    tampered[-1] ^= 0x80
    assert refusal(bytes(tampered)) is Reason.hash_mismatch
    nan = pack_signed({"w": torch.tensor([float("nan")])}, {}, ALICE)
    assert refusal(nan) is Reason.non_finite
    header, _, data = split(blob)
    header["w"] = {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}
    assert refusal(with_doc(assemble(header, data))) is Reason.bad_tensors
    with pytest.raises(ValueError):
        pack_signed(tensors, {"signature": "x"}, ALICE)
