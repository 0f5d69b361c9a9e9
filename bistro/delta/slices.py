"""Part of a delta, read without the rest: seeded runs of its parameters, by a few byte-range reads.

A validator that scores a sample (`mechanism.max_uids_per_window`) fetches whole only the sampled
uids' deltas, so a copier drawn in a window rarely meets its source in the same sample, and the copy
screen and the close controls (docs/mechanism.md "Copies under a sample") see no source. A slice is
what lets them: of every unsampled upload the validator reads the safetensors header (the first
`head_bytes`) and then the bytes of `RUNS` runs of parameters (`SlicePlan.runs`, together about
`mechanism.slice_fraction` of the wire), drawn from the seed block's hash, which nobody knows while
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
from collections.abc import Callable, Iterable
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


def header_bytes(names: Iterable[str]) -> int:
    """The most header an honest delta of these parameters has (what the first read asks for)."""
    return HEADER_ROOM + sum(len(n.encode()) + ENTRY_ROOM for n in names)


RUNS = 4
"""Runs of parameters in a slice, each from its own seeded start: a copier that disguises a random
part of its copy (some layers made unlike the source, the rest kept) escapes one run with the
probability of that part, all four only with its fourth power, and the slice's cosine falls with
the disguised share, not to zero."""


@dataclass(frozen=True)
class SlicePlan:
    """What to read of each unsampled delta in one window."""

    runs: tuple[tuple[str, ...], ...]
    """Runs of the codec's wire layout (names sorted, as written), disjoint and apart, in order:
    each one range read of an honest blob."""
    spans: tuple[int, ...]
    """Each run's bytes in the codec's layout: a header that places a run elsewhere, or spreads it
    out, gets no slice."""
    head_bytes: int
    """The first read: the 8-byte length and the header of any honest delta fit in it."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter of the slice."""
        return tuple(n for run in self.runs for n in run)

    @property
    def max_bytes(self) -> int:
        """The most a slice reads: the header and every run."""
        return self.head_bytes + sum(self.spans)


def plan_slice(netuid: int, window: int, block_hash: str, spec: WireSpec, fraction: float) -> SlicePlan:
    """The window's slice: `RUNS` runs, each from a start drawn by sha256 of (netuid, window, the
    seed block's hash, the run), of the parameters in the wire's name order until their bytes reach
    `fraction / RUNS` of the delta's (at least one parameter; a run that reaches the last name grows
    before its start instead). Runs that meet are read as one."""
    names = sorted(spec)
    sizes = [math.prod(spec[n][0]) * spec[n][1].itemsize for n in names]
    want = max(1.0, fraction * sum(sizes) / RUNS)
    held = [False] * len(names)
    for r in range(RUNS):
        start = protocol.seed("delta-slice", netuid, window, block_hash, r) % len(names)
        first, last, got = start, start, sizes[start]  # the run [first, last]: contiguous on the wire
        while got < want and (last + 1 < len(names) or first > 0):
            if last + 1 < len(names):
                last += 1
                got += sizes[last]
            else:  # past the last name: the run grows before its start instead
                first -= 1
                got += sizes[first]
        for i in range(first, last + 1):
            held[i] = True
    runs: list[list[int]] = []
    for i, h in enumerate(held):
        if h and runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        elif h:
            runs.append([i])
    head = 8 + header_bytes(names)
    return SlicePlan(
        runs=tuple(tuple(names[i] for i in run) for run in runs),
        spans=tuple(sum(sizes[i] for i in run) for run in runs),
        head_bytes=min(head, 8 + MAX_HEADER_BYTES),
    )


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


def _spans(plan: SlicePlan, entries: dict[str, Entry]) -> list[tuple[int, int]]:
    """Each run's [begin, end) in the blob's data, checked against the layout's size."""
    out = []
    for run, limit in zip(plan.runs, plan.spans, strict=True):
        begin, end = min(entries[n].begin for n in run), max(entries[n].end for n in run)
        if end - begin > limit:
            raise ValueError(f"a run spans {end - begin} bytes, the layout's {limit}")
        out.append((begin, end))
    return out


def read_slice(get_range: Callable[[int, int], bytes], plan: SlicePlan, spec: WireSpec) -> bytes:
    """The header and the runs' bytes of one delta, as one buffer (`decode_slice` reads it):
    `get_range(start, length)` reads the object's bytes. Raises ValueError for a header that does
    not fit the plan, and whatever `get_range` raises."""
    head = get_range(0, plan.head_bytes)
    try:
        data_start, entries = _entries(head, plan, spec)
    except Exception as e:  # noqa: BLE001 -- SignedObjectError and friends: a peer's bad header
        raise ValueError(f"slice header: {e}") from None
    parts = [head[:data_start]]
    for begin, end in _spans(plan, entries):
        body = get_range(data_start + begin, end - begin)
        if len(body) != end - begin:
            raise ValueError(f"{len(body)} bytes of a run's {end - begin}")
        parts.append(body)
    return b"".join(parts)


def decode_slice(
    data: bytes, plan: SlicePlan, spec: WireSpec, codec: str, ctx: CodecContext, shapes: Shapes
) -> Delta:
    """The slice's parameters decoded by the codec, from `read_slice`'s buffer. Raises (ValueError,
    the codec's BadTensors) on anything malformed: the caller drops the slice."""
    data_start, entries = _entries(data, plan, spec)
    spans = _spans(plan, entries)
    if len(data) != data_start + sum(end - begin for begin, end in spans):
        raise ValueError("slice buffer of the wrong size")
    buf = bytearray(data[data_start:])
    tensors, at = {}, 0
    for run, (begin, end) in zip(plan.runs, spans, strict=True):
        for name in run:
            e = entries[name]
            if e.end == e.begin:
                tensors[name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            raw = torch.frombuffer(buf, dtype=torch.uint8, offset=at + e.begin - begin, count=e.end - e.begin)
            tensors[name] = raw.view(e.dtype).reshape(e.shape)
        at += end - begin
    return CODECS[codec].decode(tensors, ctx, {name: shapes[name] for name in plan.names})
