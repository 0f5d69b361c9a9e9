"""Signed safetensors objects: the one reader and writer for deltas, master checkpoints and updates.

A blob is an ordinary safetensors file whose header metadata holds exactly one key, "bistro": the
canonical JSON of a document signed (sr25519) by its author. The document carries
`tensors_sha256`, a digest of every tensor's name, dtype, shape and bytes, so whoever signed the
document vouched for exactly these tensors (the names and shapes too: swapping two tensors of one
shape breaks the hash).

Reading never trusts the header: the 8-byte length is bounded by the blob, the JSON is parsed
strictly (no duplicate keys, no NaN), every tensor entry is checked (known dtype, shape, offsets
that tile the data buffer exactly) before safetensors loads anything, so a header that claims a
huge tensor never allocates. Memory stays a small multiple of the blob's size. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from .. import protocol

META_KEY = "bistro"
MAX_HEADER_BYTES = 2**20
"""Longest header JSON read: a 7B model's topk delta needs ~100 KB; parsing costs ~20x its size."""
RESERVED = ("version", "signer", "tensors_sha256", "signature")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


class Reason(StrEnum):
    """Why a delta (or a signed object) was refused. The validator logs it and scores zero."""

    too_large = "too_large"
    bad_header = "bad_header"
    bad_signature = "bad_signature"
    wrong_hotkey = "wrong_hotkey"
    wrong_netuid = "wrong_netuid"
    wrong_window = "wrong_window"
    wrong_master = "wrong_master"
    bad_tensors = "bad_tensors"
    non_finite = "non_finite"
    norm_too_large = "norm_too_large"
    hash_mismatch = "hash_mismatch"


class SignedObjectError(Exception):
    """A signed object failed a check; `.reason` is a `Reason`, `.detail` says what exactly."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Entry:
    """One tensor as the header describes it (offsets relative to the data buffer)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed header: the signed document, the raw tensor entries, where the data starts."""

    doc: dict[str, Any]
    raw_entries: dict[str, Any]
    data_start: int


# --- hashing and writing ------------------------------------------------------------------------


def _hash_one(h: Any, name: str, dtype: torch.dtype, shape: tuple[int, ...], data: Any) -> None:
    head = protocol.canonical_json([name, DTYPE_NAMES[dtype], list(shape), len(data)])
    h.update(len(head).to_bytes(8, "little"))
    h.update(head)
    h.update(data)


def _tensor_bytes(t: Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """Digest of every tensor's name, dtype, shape and bytes, in name order (hex)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot travel")
        _hash_one(h, name, t.dtype, tuple(t.shape), _tensor_bytes(t))
    return h.hexdigest()


def blob_sha256(blob: bytes, header: Header, entries: dict[str, Entry]) -> str:
    """`tensors_sha256` computed from a blob's own bytes (no copies, no tensors)."""
    h, view = hashlib.sha256(), memoryview(blob)
    for name in sorted(entries):
        e = entries[name]
        _hash_one(h, name, e.dtype, e.shape, view[header.data_start + e.begin : header.data_start + e.end])
    return h.hexdigest()


def write_signed(tensors: dict[str, Tensor], body: dict[str, Any], keypair: protocol.Signer) -> bytes:
    """Sign the canonical JSON of `body` (which must not hold a signature) and write the blob."""
    doc = {**body, "signature": protocol.sign(keypair, protocol.canonical_json(body))}
    cpu = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    return safetensors.torch.save(cpu, metadata={META_KEY: protocol.canonical_json(doc).decode()})


def pack_signed(tensors: dict[str, Tensor], doc: dict[str, Any], keypair: protocol.Signer) -> bytes:
    """A signed object (master checkpoint or update): `doc` plus version, signer and tensor hash."""
    clash = [k for k in RESERVED if k in doc]
    if clash:
        raise ValueError(f"reserved document keys: {clash}")
    body = {
        **doc,
        "version": protocol.FORMAT_VERSION,
        "signer": keypair.ss58_address,
        "tensors_sha256": tensors_sha256(tensors),
    }
    return write_signed(tensors, body, keypair)


# --- reading ------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: bytes | str) -> Any:
    """Parse JSON refusing duplicate keys and NaN/Infinity; raises ValueError on anything odd."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError as e:  # absurdly deep nesting
        raise ValueError("JSON nested too deeply") from e


def read_header(blob: bytes, max_bytes: int) -> Header:
    """Size, the 8-byte length, the header JSON and our document: too_large or bad_header."""
    if not isinstance(blob, (bytes, bytearray)):
        raise SignedObjectError(Reason.bad_header, f"not bytes: {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise SignedObjectError(Reason.too_large, f"{len(blob)} bytes > {max_bytes}")
    if len(blob) < 8:
        raise SignedObjectError(Reason.bad_header, f"only {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n < 2 or n > min(len(blob) - 8, MAX_HEADER_BYTES):
        raise SignedObjectError(Reason.bad_header, f"header length {n} outside the blob ({len(blob)} bytes)")
    try:
        header = strict_json(bytes(blob[8 : 8 + n]).decode("utf-8"))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or set(meta) != {META_KEY} or not isinstance(meta[META_KEY], str):
            raise ValueError(f'metadata must hold exactly one string "{META_KEY}"')
        doc = strict_json(meta[META_KEY])
        protocol.canonical_json(doc)  # must be signable: lone surrogates, for one, are not UTF-8
    except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
        raise SignedObjectError(Reason.bad_header, str(e)[:200]) from e
    if not isinstance(doc, dict):
        raise SignedObjectError(Reason.bad_header, "document is not a JSON object")
    raw = {k: v for k, v in header.items() if k != "__metadata__"}
    return Header(doc=doc, raw_entries=raw, data_start=8 + n)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_entry(name: str, raw: Any) -> Entry:
    """One tensor entry of a header, checked in itself (dtype, shape, offsets that hold it): ValueError."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{name}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {dtype!r} not allowed")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{name}: bad shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ValueError(f"{name}: bad data_offsets")
    begin, end = offsets
    size = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no overflow whatever is claimed
    if not 0 <= begin <= end or end - begin != size:
        raise ValueError(f"{name}: data_offsets [{begin}, {end}] do not hold {size} bytes")
    return Entry(DTYPES[dtype], tuple(shape), begin, end)


def check_entries(
    blob: bytes, header: Header, spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None
) -> dict[str, Entry]:
    """Tensor entries valid, matching `spec` when given, tiling the data buffer: else bad_tensors."""
    try:
        entries = {name: parse_entry(name, raw) for name, raw in header.raw_entries.items()}
        if spec is not None:
            if set(entries) != set(spec):
                missing, extra = sorted(set(spec) - set(entries)), sorted(set(entries) - set(spec))
                raise ValueError(f"names differ: missing {missing[:3]}, unexpected {extra[:3]}")
            for name, (shape, dtype) in spec.items():
                e = entries[name]
                if e.shape != tuple(shape) or e.dtype != dtype:
                    raise ValueError(f"{name}: {e.dtype}{list(e.shape)}, expected {dtype}{list(shape)}")
        position = 0
        for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if e.begin != position:
                raise ValueError(f"{name}: data at {e.begin}, expected {position} (gap or overlap)")
            position = e.end
        if position != len(blob) - header.data_start:
            raise ValueError(
                f"tensors cover {position} bytes, the buffer has {len(blob) - header.data_start}"
            )
    except ValueError as e:
        raise SignedObjectError(Reason.bad_tensors, str(e)[:300]) from e
    return entries


def load_tensors(blob: bytes, entries: dict[str, Entry]) -> dict[str, Tensor]:
    """Load a blob whose entries were checked; float tensors must be finite (else non_finite)."""
    try:
        tensors = safetensors.torch.load(bytes(blob))
    except SafetensorError as e:  # should not happen after check_entries; still a refusal, not a crash
        raise SignedObjectError(Reason.bad_tensors, f"safetensors: {e}") from e
    if set(tensors) != set(entries):
        raise SignedObjectError(Reason.bad_tensors, "safetensors read other tensors than the header")
    for name, t in tensors.items():
        # amax propagates NaN and an Inf stays Inf: one cheap reduction instead of a bool mask
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.abs().amax())):
            raise SignedObjectError(Reason.non_finite, f"{name} holds NaN or Inf")
    return tensors


def verify_hash(blob: bytes, header: Header, entries: dict[str, Entry]) -> None:
    if blob_sha256(blob, header, entries) != header.doc["tensors_sha256"]:
        raise SignedObjectError(Reason.hash_mismatch, "tensor bytes do not match tensors_sha256")


def verify_signature(doc: dict[str, Any], signer: str) -> None:
    body = {k: v for k, v in doc.items() if k != "signature"}
    if not protocol.verify(signer, protocol.canonical_json(body), doc["signature"]):
        raise SignedObjectError(Reason.bad_signature, f"not signed by {signer}")


def check_fields(doc: dict[str, Any], fields: dict[str, type]) -> None:
    """Exactly these keys with these types (bool is not an int): else bad_header."""
    if set(doc) != set(fields):
        missing, extra = sorted(set(fields) - set(doc)), sorted(set(doc) - set(fields))
        raise SignedObjectError(Reason.bad_header, f"document keys: missing {missing}, unexpected {extra}")
    for key, kind in fields.items():
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SignedObjectError(Reason.bad_header, f"{key} must be {kind.__name__}")
    sha = doc.get("tensors_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise SignedObjectError(Reason.bad_header, "tensors_sha256 must be 64 lowercase hex digits")
    if doc.get("version") != protocol.FORMAT_VERSION:
        raise SignedObjectError(Reason.bad_header, f"format version {doc.get('version')!r} not supported")


EXPECT_REASONS = {"netuid": Reason.wrong_netuid, "window": Reason.wrong_window}


def unpack_signed(
    blob: bytes, *, signer: str, max_bytes: int, expect: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The document and tensors of an object signed by `signer`; raises `SignedObjectError`.

    `expect` names document fields that must hold given values (netuid, window -> wrong_*;
    any field mentioning "master" -> wrong_master; others -> bad_header).
    """
    header, entries = check_signed(blob, signer=signer, max_bytes=max_bytes, expect=expect)
    return header.doc, load_tensors(blob, entries)


def check_signed(
    blob: bytes, *, signer: str, max_bytes: int, expect: dict[str, Any] | None = None
) -> tuple[Header, dict[str, Entry]]:
    """Every check of `unpack_signed` (header, signature, expected fields, entries, tensor hash),
    loading no tensor: what `tensor_views` then reads from."""
    header = read_header(blob, max_bytes)
    doc = header.doc
    for key in RESERVED:
        if key not in doc:
            raise SignedObjectError(Reason.bad_header, f"document has no {key}")
    fields = {k: object for k in doc} | {
        "version": int,
        "signer": str,
        "tensors_sha256": str,
        "signature": str,
    }
    check_fields(doc, fields)
    if doc["signer"] != signer:
        raise SignedObjectError(Reason.wrong_hotkey, f"signed by {doc['signer']}, expected {signer}")
    verify_signature(doc, signer)
    for key, value in (expect or {}).items():
        if key not in doc or doc[key] != value or type(doc[key]) is not type(value):
            reason = EXPECT_REASONS.get(key, Reason.wrong_master if "master" in key else Reason.bad_header)
            raise SignedObjectError(reason, f"{key} is {doc.get(key)!r}, expected {value!r}")
    entries = check_entries(blob, header, None)
    verify_hash(blob, header, entries)
    return header, entries


def tensor_views(blob: bytes, header: Header, entries: dict[str, Entry]) -> dict[str, Tensor]:
    """The tensors of a checked blob as read-only views of its bytes (no copy: a 7B checkpoint is
    not held twice); float tensors must be finite (else non_finite). Never write into them."""
    import warnings

    out: dict[str, Tensor] = {}
    for name, e in entries.items():
        count = math.prod(e.shape)
        if count == 0:
            out[name] = torch.empty(e.shape, dtype=e.dtype)
            continue
        with warnings.catch_warnings():  # bytes are immutable: torch warns that the view is read-only
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(blob, dtype=e.dtype, count=count, offset=header.data_start + e.begin)
        t = t.view(e.shape)
        # max and min propagate NaN and keep ±Inf, without a tensor-sized temporary
        if t.is_floating_point() and not bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all()):
            raise SignedObjectError(Reason.non_finite, f"{name} holds NaN or Inf")
        out[name] = t
    return out
