"""Deltas: codecs (`codec`), the signed wire format and its strict validation (`wire`, `signed`),
exact in-place apply and remove (`apply`), the merge rules (`merge`) and similarity (`similarity`)."""

from .apply import Saved, add_, apply_, delta_norm, restore_, scaled, to_dense
from .codec import (
    CODECS,
    BadTensors,
    Codec,
    CodecContext,
    Delta,
    ErrorFeedback,
    Factored,
    Mixed,
    Part,
    Sparse,
    compress,
)
from .merge import MERGES, MeanMerge, Merge, SumMerge, clip_factors, clip_to_median_norm, merge, merge_mean
from .signed import Reason, SignedObjectError, pack_signed, unpack_signed
from .similarity import SKETCH_WIDTH, low_rank_part, low_rank_similarity, similarity, sketch
from .wire import DecodedDelta, DeltaRejected, Expectation, decode_delta, encode_delta

__all__ = [
    "MERGES",
    "MeanMerge",
    "Merge",
    "SumMerge",
    "clip_factors",
    "clip_to_median_norm",
    "merge_mean",
    "scaled",
    "SKETCH_WIDTH",
    "low_rank_part",
    "low_rank_similarity",
    "CODECS",
    "BadTensors",
    "Codec",
    "CodecContext",
    "DecodedDelta",
    "Delta",
    "DeltaRejected",
    "ErrorFeedback",
    "Expectation",
    "Factored",
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
