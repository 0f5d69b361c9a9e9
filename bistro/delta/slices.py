"""Part of a delta, read without the rest: the parameters of a seeded run, by two byte-range reads.

A validator that scores a sample (`mechanism.max_uids_per_window`) fetches whole only the sampled
uids' deltas, so a copier drawn in a window rarely meets its source in the same sample, and the copy
screen and the close controls (docs/mechanism.md "Copies under a sample") see no source. A slice is
what lets them: of every unsampled upload the validator reads the safetensors header (the first
`head_bytes`) and then the bytes of a run of parameters (`SlicePlan.names`, about
`mechanism.slice_fraction` of the wire), chosen from the seed block's hash, which nobody knows while
uploads are open: a copier cannot tell which parameters will be compared, so it must look unlike
its source in all of them.

A slice is a hint, never evidence against the uid it was read from: its bytes are not covered by a
hash we can check without the rest (`tensors_sha256` covers every tensor), so it only adds control
pages to the own-page test of a *sampled* uid that is close to it. A peer that serves a forged
slice can at most add its own eval pages as control pages to a sampled uid's test (random text to
an honest delta: docs/mechanism.md), and one that serves none adds nothing.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import protocol
from .codec import CODECS, CodecContext, Delta, Shapes, WireSpec
from .signed import MAX_HEADER_BYTES, Entry, parse_entry, read_header

HEADER_ROOM = 4096
"""Bytes of header an honest delta needs beyond its tensor entries (the signed document: codec
parameters, hashes, the signature) and then some."""
ENTRY_ROOM = 128
"""Bytes of header per tensor entry beyond its name (dtype, shape, offsets)."""


@dataclass(frozen=True)
class SlicePlan:
    """What to read of each unsampled delta in one window."""

    names: tuple[str, ...]
    """The parameters of the slice: a run of the codec's wire layout (names sorted, as written)."""
    head_bytes: int
    """The first read: the 8-byte length and the header of any honest delta fit in it."""
    max_span: int
    """The second read's limit: the run's bytes in the codec's layout (a header that places the run
    elsewhere, or spreads it out, gets no slice)."""


def plan_slice(netuid: int, window: int, block_hash: str, spec: WireSpec, fraction: float) -> SlicePlan:
    """The window's slice: from a start drawn by sha256 of (netuid, window, the seed block's hash),
    the parameters in the wire's name order until their bytes reach `fraction` of the delta's (at
    least one parameter; a run that reaches the last name grows before its start instead, so it is
    one contiguous span of every honest blob)."""
    names = sorted(spec)
    sizes = [math.prod(spec[n][0]) * spec[n][1].itemsize for n in names]
    want = max(1.0, fraction * sum(sizes))
    start = protocol.seed("delta-slice", netuid, window, block_hash) % len(names)
    first, last, got = start, start, sizes[start]  # the run [first, last]: contiguous on the wire
    while got < want and (last + 1 < len(names) or first > 0):
        if last + 1 < len(names):
            last += 1
            got += sizes[last]
        else:  # past the last name: the run grows before its start instead
            first -= 1
            got += sizes[first]
    run = names[first : last + 1]
    head = 8 + HEADER_ROOM + sum(len(n.encode()) + ENTRY_ROOM for n in names)
    return SlicePlan(tuple(run), min(head, 8 + MAX_HEADER_BYTES), got)


def _entries(head: bytes, plan: SlicePlan, spec: WireSpec) -> tuple[int, dict[str, Entry]]:
    """(where the data starts, the slice's entries) from a header read alone; ValueError if bad."""
    if len(head) < 8:
        raise ValueError(f"only {len(head)} bytes")
    (n,) = struct.unpack("<Q", head[:8])
    if n > len(head) - 8:
        raise ValueError(f"header of {n} bytes: longer than the {plan.head_bytes} read")
    header = read_header(head[: 8 + n], 8 + n)  # SignedObjectError: the callers treat it as ValueError
    entries = {}
    for name in plan.names:
        if name not in header.raw_entries:
            raise ValueError(f"no tensor {name}")
        e = parse_entry(name, header.raw_entries[name])
        shape, dtype = spec[name]
        if e.shape != tuple(shape) or e.dtype != dtype:
            raise ValueError(f"{name}: {e.dtype}{list(e.shape)}, expected {dtype}{list(shape)}")
        entries[name] = e
    return header.data_start, entries


def _span(entries: dict[str, Entry]) -> tuple[int, int]:
    return min(e.begin for e in entries.values()), max(e.end for e in entries.values())


def read_slice(get_range: Callable[[int, int], bytes], plan: SlicePlan, spec: WireSpec) -> bytes:
    """The header and the run's bytes of one delta, as one buffer (`decode_slice` reads it):
    `get_range(start, length)` reads the object's bytes. Raises ValueError for a header that does
    not fit the plan, and whatever `get_range` raises."""
    head = get_range(0, plan.head_bytes)
    try:
        data_start, entries = _entries(head, plan, spec)
    except Exception as e:  # noqa: BLE001 -- SignedObjectError and friends: a peer's bad header
        raise ValueError(f"slice header: {e}") from None
    begin, end = _span(entries)
    if end - begin > plan.max_span:
        raise ValueError(f"the run spans {end - begin} bytes, the layout's {plan.max_span}")
    body = get_range(data_start + begin, end - begin)
    if len(body) != end - begin:
        raise ValueError(f"{len(body)} bytes of the run's {end - begin}")
    return head[:data_start] + body


def decode_slice(
    data: bytes, plan: SlicePlan, spec: WireSpec, codec: str, ctx: CodecContext, shapes: Shapes
) -> Delta:
    """The slice's parameters decoded by the codec, from `read_slice`'s buffer. Raises (ValueError,
    the codec's BadTensors) on anything malformed: the caller drops the slice."""
    data_start, entries = _entries(data, plan, spec)
    begin, end = _span(entries)
    if len(data) != data_start + end - begin:
        raise ValueError("slice buffer of the wrong size")
    buf = bytearray(data[data_start:])
    tensors = {
        name: torch.frombuffer(buf, dtype=torch.uint8, offset=e.begin - begin, count=e.end - e.begin)
        .view(e.dtype)
        .reshape(e.shape)
        if e.end > e.begin
        else torch.empty(e.shape, dtype=e.dtype)
        for name, e in entries.items()
    }
    return CODECS[codec].decode(tensors, ctx, {name: shapes[name] for name in plan.names})
