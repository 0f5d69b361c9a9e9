"""Property: whatever bytes arrive, `decode_delta` answers a delta or `DeltaRejected`, nothing else."""

from __future__ import annotations

import json
import os

import bittensor_core
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bistro import protocol
from bistro.delta import CODECS, CodecContext, DeltaRejected, Expectation, decode_delta, encode_delta

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")
SHAPES = {"w": (64, 40), "b": (9,), "e": (5000,)}
FUZZ = settings(
    max_examples=int(os.environ.get("BISTRO_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def ctx_for(codec: str) -> CodecContext:
    return CodecContext(netuid=1, window=2, compression=30.0, chunk=1024)


def wire_of(codec: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(s, generator=g) * 1e-2 for n, s in SHAPES.items()}
    return CODECS[codec].encode(delta, ctx_for(codec))


def valid_blob(codec: str, wire: dict[str, torch.Tensor] | None = None) -> bytes:
    wire = wire_of(codec) if wire is None else wire
    return encode_delta(
        wire,
        keypair=ALICE,
        netuid=1,
        uid=0,
        window=2,
        codec=codec,
        codec_params=CODECS[codec].params(ctx_for(codec)),
        master_window=1,
        master_hash="00" * 32,
    )


BLOBS = {codec: valid_blob(codec) for codec in CODECS}


def expectation(codec: str) -> Expectation:
    return Expectation(
        netuid=1,
        window=2,
        hotkey=ALICE.ss58_address,
        master_hash="00" * 32,
        codec=codec,
        ctx=ctx_for(codec),
        shapes=SHAPES,
        max_bytes=2**20,
        max_norm=10.0,
    )


def decodes_or_rejects(blob: bytes, codec: str) -> None:
    try:
        decode_delta(blob, expectation(codec))
    except DeltaRejected:
        pass


def test_the_valid_blobs_decode() -> None:
    for codec, blob in BLOBS.items():
        assert decode_delta(blob, expectation(codec)).norm > 0


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(sorted(CODECS)))
def test_random_bytes(blob: bytes, codec: str) -> None:
    decodes_or_rejects(blob, codec)


@FUZZ
@given(
    st.sampled_from(sorted(CODECS)),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 2**31),
)
def test_mutated_valid_blobs(codec: str, edits: list[tuple[int, int]], cut: int) -> None:
    blob = bytearray(BLOBS[codec])
    for position, value in edits:
        blob[position % len(blob)] = value
    decodes_or_rejects(bytes(blob), codec)
    decodes_or_rejects(bytes(blob[: cut % (len(blob) + 1)]), codec)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=()), max_size=20),  # surrogates too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(sorted(CODECS)), st.data())
def test_mutated_headers(codec: str, data: st.DataObject) -> None:
    """Valid JSON throughout, wrong in its values: the checks past parsing get exercised."""
    blob = BLOBS[codec]
    n = int.from_bytes(blob[:8], "little")
    header, body = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    doc = json.loads(header["__metadata__"]["bistro"])
    target = data.draw(st.sampled_from(["doc", "entry", "header"]))
    if target == "doc":
        doc[data.draw(st.sampled_from(sorted(doc)))] = data.draw(json_values)
        if data.draw(st.booleans()):  # a miner signs whatever it likes (that can be signed)
            unsigned = {k: v for k, v in doc.items() if k != "signature"}
            try:
                doc["signature"] = protocol.sign(ALICE, protocol.canonical_json(unsigned))
            except ValueError:  # Infinity or a lone surrogate: no canonical JSON
                pass
        header["__metadata__"]["bistro"] = json.dumps(doc)
    elif target == "entry":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = data.draw(
            json_values
            | st.lists(st.integers(-(2**70), 2**70), max_size=3)
            | st.sampled_from(["F64", "I8", "U8"])
        )
    else:
        header[data.draw(st.text(max_size=30))] = data.draw(json_values)
    raw = json.dumps(header).encode()
    decodes_or_rejects(len(raw).to_bytes(8, "little") + raw + body, codec)


@FUZZ
@given(
    st.sampled_from(sorted(CODECS)),
    st.lists(
        st.tuples(st.integers(0, 2**31), st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6
    ),
)
def test_signed_garbage_in_the_tensors(codec: str, edits: list[tuple[int, int, int]]) -> None:
    """The real threat: a registered miner signs tensors it crafted (the codec's decode must hold)."""
    wire = wire_of(codec)
    names = sorted(wire)
    for which, position, value in edits:
        raw = wire[names[which % len(names)]].reshape(-1).view(torch.uint8)
        raw[position % raw.numel()] = value
    decodes_or_rejects(valid_blob(codec, wire), codec)
