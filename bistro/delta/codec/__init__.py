"""Delta codecs: what a miner's `trained - master` becomes on the wire, and back (one file a codec
beside `base.py`; this package's `CODECS` is the registry).

In the manner of hivemind's `compression/base.py`: an abstract `Codec`, a frozen `CodecContext`
describing the window, and a `CODECS` registry checked at import. Every codec also promises the
exact wire tensors (`wire_spec`) it produces for a model's shapes, so a validator can reject a blob
from its header alone, before any tensor is loaded.

- `topk` (the first default): per parameter, chunks of `ctx.chunk` entries, the k = round(chunk/compression)
  largest by magnitude per chunk; local indices sorted and packed in 12 bits (two in three bytes)
  when chunk <= 4096 (int32 otherwise); values as int8 with one fp32 scale (absmax/127) per chunk.
  fp32 scales cost ~2% of the ratio against fp16 but cannot underflow for late, tiny deltas:
  ~154x at compression 100. Pair it with `ErrorFeedback`.
- `topk2` (codec version 2 of topk, SparseLoCo-like): the same k largest per chunk, but each chunk
  is one byte record: the sorted local indices Elias–Fano coded (r = floor(log2(chunk/k)) low bits
  each, plus a bitmap of k + ceil(chunk/2^r) bits for the high parts: 8 bits an index at 64 of
  4096, against 12), `value_bits`-bit codes of 2^bits equal bins over ±3σ of the chunk's values,
  and a table of each bin's mean (bf16: fp32's range, so late tiny deltas cannot underflow). One
  uint8 tensor per parameter, so the safetensors header lists a third of topk's entries. At 64 of
  4096 and 2 bits: 88 bytes a chunk, ~186x before the header. Pair it with `ErrorFeedback`.
- `lowrank`: rank-`rank` factors of every 2-D parameter (int8 codes, an fp32 scale a factor), then
  `topk2` of what the factors leave, in one uint8 tensor a parameter (the default: rank 1 with 32 of
  4096; ~175x before the header on `tiny`). Early deltas of Adam are nearly low-rank and flat in
  magnitude, which top-k alone sends badly. A 2-D part decodes to `Mixed`: the dequantized factors
  (`Factored`, never densified by the merges) and the sparse values. Pair it with `ErrorFeedback`.
- `mask`: the same positions for every miner, drawn from a CPU generator seeded by
  (netuid, window, name); only fp32 values travel, so the ratio is `compression` exactly.
- `dense`: bf16 values of everything, for debugging and as a reference (2x).
"""

from __future__ import annotations

from .base import (
    LOW_RANK_ITERATIONS,
    MAX_RANK,
    BadTensors,
    Codec,
    CodecContext,
    Delta,
    Factored,
    Mixed,
    NonFiniteValues,
    Part,
    Shapes,
    Sparse,
    WireSpec,
    codec_context,
    densify,
    full,
    numel,
)
from .dense import Dense
from .feedback import ErrorFeedback, compress
from .lowrank import LowRank, low_rank
from .mask import Mask, mask_positions, mask_size
from .topk import TopK, pack12, unpack12
from .topk2 import TopK2

CODECS: dict[str, Codec] = {c.name: c for c in (TopK(), TopK2(), LowRank(), Mask(), Dense())}
if set(CODECS) != {"topk", "topk2", "lowrank", "mask", "dense"}:
    raise ImportError(f"codec registry is inconsistent: {sorted(CODECS)}")

__all__ = [
    "CODECS",
    "LOW_RANK_ITERATIONS",
    "MAX_RANK",
    "BadTensors",
    "Codec",
    "CodecContext",
    "Delta",
    "Dense",
    "ErrorFeedback",
    "Factored",
    "LowRank",
    "Mask",
    "Mixed",
    "NonFiniteValues",
    "Part",
    "Shapes",
    "Sparse",
    "TopK",
    "TopK2",
    "WireSpec",
    "codec_context",
    "compress",
    "densify",
    "full",
    "low_rank",
    "mask_positions",
    "mask_size",
    "numel",
    "pack12",
    "unpack12",
]
