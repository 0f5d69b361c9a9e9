"""Host work spread over threads, with every result what one thread gives, bit for bit.

A validator's per-uid host work (decoding each fetched delta, its sketch, its share and term) and
the mean merge's per-parameter sums are independent of one another: `map_threads` runs them on
`mechanism.host_threads` threads (torch releases the GIL inside its kernels) and returns the results
in the order of the inputs, so what every node computes does not depend on how many threads it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def host_threads(setting: int) -> int:
    """`mechanism.host_threads` as a count: 0 means one a CPU core."""
    return setting if setting > 0 else max(1, os.cpu_count() or 1)


def map_threads(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """`[fn(x) for x in items]`, on up to `threads` threads; an exception of `fn` is raised here
    (the first in the inputs' order), after every call has ended."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="bistro-host") as pool:
        futures = [pool.submit(fn, x) for x in items]
    return [f.result() for f in futures]
