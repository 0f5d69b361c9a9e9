"""Which pages a miner trains on and a validator checks (docs/design.md, "Pages").

Pure functions of integers and a block hash: every draw is `bistro.protocol.seed(...)` (sha256) of
its inputs, so any process on any machine computes the same ids, never `hash()` or a global RNG.

- Each miner owns a span of `miner_span` consecutive pages (wrapping the corpus). The span starts at
  a point set by (netuid, uid), uids spread evenly round the corpus, and moves forward `pages_per_window` pages per window, so over
  time a miner slides through the whole corpus while two uids, starting far apart, rarely meet.
- local pages: `pages_per_window` distinct pages of the span, drawn from (netuid, uid, window).
- eval pages: `eval_pages` of the local pages, drawn with the block hash (unknown to the miner
  while it trains).
- global pages: `global_pages` distinct pages of the whole corpus from (netuid, window, block hash).
- other pages of uid: `eval_pages` distinct pages of the whole corpus that are *not* among uid's
  local pages, drawn with the block hash: the control of the own-page test (scoring.py), a delta
  that trained on its own pages helps them more than these.

The block hash is that of `protocol.seed_block(window, ...)`, which exists only once uploads close.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import Settings
from ..protocol import seed

GOLDEN = 0x9E3779B97F4A7C15
"""2**64 / golden ratio."""


@dataclass(frozen=True)
class PageSettings:
    """The numbers the page functions need, clamped to the corpus size."""

    num_pages: int
    pages_per_window: int
    eval_pages: int
    global_pages: int
    miner_span: int

    def __post_init__(self) -> None:
        if self.num_pages <= 0:
            raise ValueError("num_pages must be positive")

    @classmethod
    def of(cls, settings: Settings, num_pages: int) -> PageSettings:
        m = settings.mechanism
        span = min(m.miner_span, num_pages)
        per_window = min(m.pages_per_window, span)
        return cls(
            num_pages=num_pages,
            pages_per_window=per_window,
            eval_pages=min(m.eval_pages, per_window),
            global_pages=min(m.global_pages, num_pages),
            miner_span=span,
        )


def _smallest(keys: dict[int, int], k: int) -> list[int]:
    """The k items with the smallest keys (ties broken by the item): a seeded sample."""
    return sorted(keys, key=lambda item: (keys[item], item))[:k]


def span_start(netuid: int, uid: int, window: int, settings: PageSettings) -> int:
    """First page of uid's span in this window: a per-uid offset plus the slide."""
    # Fibonacci hashing of the uid (golden-ratio steps round the corpus): consecutive uids start
    # as far apart as possible, so spans overlap only once the uids' spans outgrow the corpus.
    point = (seed("bistro-span", netuid) + uid * GOLDEN) % 2**64
    offset = point * settings.num_pages >> 64
    return (offset + window * settings.pages_per_window) % settings.num_pages


def local_pages(netuid: int, uid: int, window: int, settings: PageSettings) -> list[int]:
    """The pages uid trains on in `window`, in the order it should train on them."""
    return list(_local_pages(netuid, uid, window, settings))


@functools.lru_cache(maxsize=1024)
def _local_pages(netuid: int, uid: int, window: int, settings: PageSettings) -> tuple[int, ...]:
    """One sha256 a page of the span (0.3 s at a 7B miner's span of thousands): a validator asks
    for a scored uid's pages several times a window, so they are kept."""
    start = span_start(netuid, uid, window, settings)
    keys = {
        (start + k) % settings.num_pages: seed("bistro-local", netuid, uid, window, k)
        for k in range(settings.miner_span)
    }
    return tuple(_smallest(keys, settings.pages_per_window))


def eval_pages(netuid: int, uid: int, window: int, block_hash: str, settings: PageSettings) -> list[int]:
    """The local pages of uid that validators score it on, chosen by the window's block hash."""
    local = local_pages(netuid, uid, window, settings)
    keys = {page: seed("bistro-eval", netuid, uid, window, block_hash, page) for page in local}
    return _smallest(keys, settings.eval_pages)


def global_pages(netuid: int, window: int, block_hash: str, settings: PageSettings) -> list[int]:
    """Distinct pages from the whole corpus, the same on every validator for this window."""
    return _draw(
        settings.global_pages, settings.num_pages, set(), "bistro-global", netuid, window, block_hash
    )


def other_pages(
    netuid: int, uid: int, window: int, block_hash: str, settings: PageSettings, count: int | None = None
) -> list[int]:
    """`count` (default `eval_pages`) pages of the corpus that uid was not assigned this window: its
    control pages."""
    exclude = set(local_pages(netuid, uid, window, settings))
    count = min(settings.eval_pages if count is None else count, settings.num_pages - len(exclude))
    return _draw(count, settings.num_pages, exclude, "bistro-other", netuid, uid, window, block_hash)


def _draw(count: int, num_pages: int, exclude: set[int], *parts: object) -> list[int]:
    """`count` distinct pages not in `exclude`, seeded by `parts` (count <= pages left)."""
    chosen: list[int] = []
    seen = set(exclude)
    draw = 0
    while len(chosen) < count:
        page = seed(*parts, draw) % num_pages
        draw += 1
        if page not in seen:
            seen.add(page)
            chosen.append(page)
    return chosen
