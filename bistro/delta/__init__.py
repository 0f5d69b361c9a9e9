"""Deltas: codecs (`codec`), the signed wire format and its strict validation (`wire`, `signed`),
and exact in-place apply and remove (`apply`)."""

from .apply import Saved, add_, apply_, delta_norm, merge, restore_, similarity, sketch, to_dense
from .codec import (
    CODECS,
    BadTensors,
    Codec,
    CodecContext,
    Delta,
    ErrorFeedback,
    Mixed,
    Part,
    Sparse,
    compress,
)
from .signed import Reason, SignedObjectError, pack_signed, unpack_signed
from .wire import DecodedDelta, DeltaRejected, Expectation, decode_delta, encode_delta

__all__ = [
    "CODECS",
    "BadTensors",
    "Codec",
    "CodecContext",
    "DecodedDelta",
    "Delta",
    "DeltaRejected",
    "ErrorFeedback",
    "Expectation",
    "Mixed",
    "Part",
    "Reason",
    "Saved",
    "SignedObjectError",
    "Sparse",
    "add_",
    "apply_",
    "compress",
    "decode_delta",
    "delta_norm",
    "encode_delta",
    "merge",
    "pack_signed",
    "restore_",
    "similarity",
    "sketch",
    "to_dense",
    "unpack_signed",
]
