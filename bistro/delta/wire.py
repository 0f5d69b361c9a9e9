"""A miner's delta on the wire: signed safetensors, and the validator's strict decoding of it.

The header metadata holds one JSON document (docs/design.md "Deltas on the wire"): format version,
netuid, uid, hotkey, window, codec and its parameters, the master it was trained from (window and
hash), `tensors_sha256`, and the hotkey's sr25519 signature over the canonical JSON of the rest.

`decode_delta` accepts only what docs/design.md lists; anything else raises `DeltaRejected(reason)`.
Checks run cheapest and most basic first, and every tensor entry is checked against the codec's
promise before a byte of tensor data is loaded (see `signed.py`), so memory stays a small multiple
of the blob's size whatever the header claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import protocol
from .apply import delta_norm
from .codec import CODECS, BadTensors, CodecContext, Delta, NonFiniteValues, Shapes, codec_context
from .signed import (
    Reason,
    SignedObjectError,
    check_entries,
    check_fields,
    load_tensors,
    read_header,
    tensors_sha256,
    verify_hash,
    verify_signature,
    write_signed,
)

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "DecodedDelta", "DeltaRejected", "Expectation", "Reason", "decode_delta", "encode_delta", "expectation",
    "redecode",
]  # fmt: skip

DOC_FIELDS: dict[str, type] = {
    "version": int,
    "netuid": int,
    "uid": int,
    "hotkey": str,
    "window": int,
    "codec": str,
    "codec_params": dict,
    "master_window": int,
    "master_hash": str,
    "tensors_sha256": str,
    "signature": str,
}


class DeltaRejected(SignedObjectError):
    """A delta the validator refuses: scored zero, logged with `.reason`, and the window goes on."""


@dataclass(frozen=True)
class Expectation:
    """What the validator knows a delta for (netuid, window, uid) must be."""

    netuid: int
    window: int
    hotkey: str
    """The hotkey the chain has at that uid."""
    master_hash: str
    codec: str
    ctx: CodecContext
    shapes: Shapes
    """The model's parameter shapes, by name."""
    max_bytes: int
    max_norm: float
    uid: int | None = None
    """When given, the document's uid must be this (bad_header otherwise)."""
    master_window: int | None = None
    """When given, the document's master window must be this (wrong_master otherwise)."""

    def __post_init__(self) -> None:
        # a validator bug, not a miner's fault: the mask would be drawn for another window
        if (self.ctx.netuid, self.ctx.window) != (self.netuid, self.window):
            raise ValueError(f"ctx is for netuid {self.ctx.netuid} window {self.ctx.window}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}")


@dataclass(frozen=True)
class DecodedDelta:
    """A delta that passed every check."""

    header: dict[str, Any]
    delta: Delta
    norm: float


def encode_delta(
    wire_tensors: dict[str, Tensor],
    *,
    keypair: protocol.Signer,
    netuid: int,
    uid: int,
    window: int,
    codec: str,
    codec_params: dict[str, Any],
    master_window: int,
    master_hash: str,
) -> bytes:
    """The signed safetensors blob a miner uploads for `window`."""
    body = {
        "version": protocol.FORMAT_VERSION,
        "netuid": netuid,
        "uid": uid,
        "hotkey": keypair.ss58_address,
        "window": window,
        "codec": codec,
        "codec_params": codec_params,
        "master_window": master_window,
        "master_hash": master_hash,
        "tensors_sha256": tensors_sha256(wire_tensors),
    }
    return write_signed(wire_tensors, body, keypair)


def _reject(reason: Reason, detail: str) -> DeltaRejected:
    return DeltaRejected(reason, detail)


def _check_document(doc: dict[str, Any], exp: Expectation) -> None:
    """Fields, hotkey, signature, netuid, window, master, codec: in that order."""
    check_fields(doc, DOC_FIELDS)
    if doc["hotkey"] != exp.hotkey:
        raise _reject(Reason.wrong_hotkey, f"signed for {doc['hotkey']}, the chain has {exp.hotkey}")
    verify_signature(doc, exp.hotkey)
    if doc["netuid"] != exp.netuid:
        raise _reject(Reason.wrong_netuid, f"netuid {doc['netuid']}, expected {exp.netuid}")
    if doc["window"] != exp.window:
        raise _reject(Reason.wrong_window, f"window {doc['window']}, expected {exp.window}")
    if doc["master_hash"] != exp.master_hash or exp.master_window not in (None, doc["master_window"]):
        raise _reject(Reason.wrong_master, f"trained from master {doc['master_window']}/{doc['master_hash']}")
    if exp.uid is not None and doc["uid"] != exp.uid:
        raise _reject(Reason.bad_header, f"uid {doc['uid']}, expected {exp.uid}")
    codec = CODECS[exp.codec]
    if doc["codec"] != exp.codec or doc["codec_params"] != codec.params(exp.ctx):
        raise _reject(Reason.bad_header, f"codec {doc['codec']} {doc['codec_params']}, expected {exp.codec}")


def decode_delta(blob: bytes, exp: Expectation) -> DecodedDelta:
    """Validate and decode a delta blob; raises `DeltaRejected` (and nothing else) if it is bad."""
    header, delta = _decode(blob, exp, verify=True)
    norm = delta_norm(delta)
    if not norm <= exp.max_norm:  # also refuses a NaN norm
        raise DeltaRejected(Reason.norm_too_large, f"norm {norm:.4g} > {exp.max_norm}")
    return DecodedDelta(header=header, delta=delta, norm=norm)


def redecode(blob: bytes, exp: Expectation) -> Delta:
    """The delta of a blob that `decode_delta` accepted, decoded again: a streaming validator
    (`mechanism.stream_deltas`) keeps the blob, not the decoded delta, and decodes it at each use.

    Only the codec runs again: the document, the signature and the hash were checked then, and the
    bytes have been ours since (immutable `bytes`). The tensor entries are checked again because the
    tensors are loaded from them. Decoding is deterministic, so this is the delta `decode_delta`
    returned, bit for bit; should it fail anyway it raises `DeltaRejected` as `decode_delta` would."""
    return _decode(blob, exp, verify=False)[1]


def _decode(blob: bytes, exp: Expectation, verify: bool) -> tuple[dict[str, Any], Delta]:
    """(document, delta); with `verify`, the document, signature and hash checks too."""
    try:
        header = read_header(blob, exp.max_bytes)
        if verify:
            _check_document(header.doc, exp)
        codec = CODECS[exp.codec]
        entries = check_entries(blob, header, codec.wire_spec(exp.shapes, exp.ctx))
        if verify:
            verify_hash(blob, header, entries)
        tensors = load_tensors(blob, entries)
        return header.doc, codec.decode(tensors, exp.ctx, exp.shapes)
    except SignedObjectError as e:
        raise DeltaRejected(e.reason, e.detail) from e
    except NonFiniteValues as e:
        raise DeltaRejected(Reason.non_finite, str(e)) from e
    except BadTensors as e:
        raise DeltaRejected(Reason.bad_tensors, str(e)) from e


def expectation(
    settings: Settings, window: int, hotkey: str, master_hash: str, shapes: Shapes
) -> Expectation:
    """What a valid delta from `hotkey` for `window` must be, under `settings`."""
    m = settings.mechanism
    return Expectation(
        netuid=settings.chain.netuid, window=window, hotkey=hotkey, master_hash=master_hash, codec=m.codec,
        ctx=codec_context(settings, window), shapes=shapes, max_bytes=m.max_delta_bytes, max_norm=m.max_delta_norm,
    )  # fmt: skip
