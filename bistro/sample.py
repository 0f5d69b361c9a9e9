"""Which uids a validator scores in a window, and in which order it fetches them: pure functions of
stable inputs (netuid, window, the seed-block hashes of recent windows, the uid list), so every
validator draws the same sample and the same order, and nobody can know either before the window's
seed block exists (it is the upload deadline: `protocol.seed_block`).

The sample (docs/mechanism.md, "The scored sample"):

- Each window draws `size` uids (`mechanism.max_uids_per_window`) by weighted sampling without
  replacement, keyed by the window's seed-block hash: a uid's weight grows with the windows since
  it was last drawn (`AGE_WEIGHT ** age`), so the draw leans toward uids not scored lately but never
  gives a uid zero chance (a miner just scored cannot know it is safe to skip the next window).
- A uid not drawn in the last `MAX_GAP - 1` windows is always drawn (forced): no uid waits more than
  `MAX_GAP` windows between two scorings while the uid list stays the same.
- The "last drawn" state is not any validator's memory: it is replayed, with the same hashes, from
  `WARM` windows before the start of the window's block of `BLOCK` windows (every uid taken as just
  drawn there), so it is a pure function of (netuid, window, the seed hashes since that start, uids)
  and every window of a block replays the same trajectory. Where a new block's trajectory starts,
  it need not agree with the previous one, so the sample of window w also takes every uid absent
  from the *replayed draws* of the previous MAX_GAP - 1 windows (each computed the same way). Every
  used sample contains its replayed draw, so a uid missing from the used samples of the last
  MAX_GAP - 1 windows is missing from the replayed ones too, and is taken: the bound holds exactly.
  The sample has more than `size` uids only in the first windows of a block (measured, 256 uids,
  size 32: mean 32.6 a window, at most 43).

The fetch order: uids sorted by sha256(netuid, window, seed hash, uid). A miner cannot place itself
late (or early) in it: it learns its place when the seed block exists, after uploads close.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

from .protocol import digest

MAX_GAP = 10
"""The most windows between two scorings of a uid (while the uid list stays the same)."""
BLOCK = 50
"""Windows that share one replayed trajectory (its start moves once a block)."""
WARM = 20
"""Windows replayed before a block's first window, from the state "every uid just drawn"."""
AGE_WEIGHT = 1.5
"""A uid's draw weight is AGE_WEIGHT ** (windows since it was last drawn, at most MAX_GAP - 1). Measured (256
uids, size 32): a uid drawn in the last window is drawn again with probability 0.02, after 5 windows
0.10, after 8 windows 0.28, after 9 always; 2.0 made the first windows after a draw safer to skip
(0.01), 1.3 forced more uids at the bound."""


def _unit(*parts: object) -> float:
    """A number in (0, 1) from sha256 of `parts` (53 bits)."""
    x = int.from_bytes(digest(*parts)[:8], "little") >> 11
    return (x + 0.5) / float(1 << 53)


def fetch_order(netuid: int, window: int, seed_hash: str, uids: Sequence[int]) -> list[int]:
    """`uids` in the window's fetch order: sorted by sha256(netuid, window, seed hash, uid)."""
    return sorted(set(uids), key=lambda uid: (digest("fetch-order", netuid, window, seed_hash, uid), uid))


@functools.lru_cache(maxsize=256)
def _log_units(netuid: int, window: int, seed_hash: str, uids: tuple[int, ...]) -> dict[int, float]:
    """ln of each uid's uniform draw in `window` (cached: the replays read each window many times)."""
    return {uid: math.log(_unit("sample", netuid, window, seed_hash, uid)) for uid in uids}


def _draw(netuid: int, window: int, seed_hash: str, ages: Mapping[int, int], size: int) -> set[int]:
    """One window's draw from `ages` (windows since each uid was last drawn): the forced uids (age
    ≥ MAX_GAP - 1), then weighted sampling without replacement (Efraimidis-Spirakis keys
    u^(1/weight), largest first) up to `size`."""
    forced = {uid for uid, age in ages.items() if age >= MAX_GAP - 1}
    rest = [uid for uid in ages if uid not in forced]
    logs = _log_units(netuid, window, seed_hash, tuple(sorted(ages)))

    def key(uid: int) -> float:
        return logs[uid] / AGE_WEIGHT ** min(ages[uid], MAX_GAP - 1)

    rest.sort(key=lambda uid: (-key(uid), uid))
    return forced | set(rest[: max(0, size - len(forced))])


def _replay_start(window: int) -> int:
    """Where the replay behind `window`'s draw starts: WARM windows before its block of BLOCK
    windows. Every window of a block replays the same trajectory, so consecutive draws agree
    exactly inside a block; only the first MAX_GAP - 1 windows of a block can need the safety set."""
    return max(0, (window // BLOCK) * BLOCK - WARM)


_TRAJECTORIES: dict[tuple, tuple[list[str], list[set[int]], dict[int, int]]] = {}
"""(netuid, start, uids, size) -> (hashes replayed, draws, ages after them); a few kept."""


def replayed_sample(
    netuid: int, window: int, hashes: Mapping[int, str], uids: Sequence[int], size: int
) -> set[int]:
    """The draw of `window` on the replayed trajectory of its block (every uid taken as just drawn
    at its start, `_replay_start`). Windows whose hash `hashes` lacks cannot be replayed: KeyError."""
    uids = sorted(set(uids))
    if len(uids) <= size:
        return set(uids)
    start = _replay_start(window)
    key = (netuid, start, tuple(uids), size)
    seen, draws, ages = _TRAJECTORIES.get(key, ([], [], dict.fromkeys(uids, 0)))
    if any(hashes.get(start + i) != h for i, h in enumerate(seen[: window - start + 1])):
        seen, draws, ages = [], [], dict.fromkeys(uids, 0)  # another chain's hashes: replay anew
    for w in range(start + len(draws), window + 1):
        if w not in hashes:
            raise KeyError(f"no seed hash for window {w}")
        drawn = _draw(netuid, w, hashes[w], ages, size)
        ages = {uid: (0 if uid in drawn else ages[uid] + 1) for uid in uids}
        seen, draws = [*seen, hashes[w]], [*draws, drawn]
    _TRAJECTORIES[key] = (seen, draws, ages)
    while len(_TRAJECTORIES) > 8:
        del _TRAJECTORIES[next(iter(_TRAJECTORIES))]
    return draws[window - start]


def scored_sample(
    netuid: int, window: int, hashes: Mapping[int, str], uids: Sequence[int], size: int
) -> list[int]:
    """The uids scored in `window` (sorted): the replayed draw of the window, plus every uid absent
    from the replayed draws of the previous MAX_GAP - 1 windows (module docstring). `hashes` maps a
    window to its seed-block hash (`protocol.seed_block`) for every window of `hash_windows(window)`
    (KeyError when one is missing)."""
    uids = sorted(set(uids))
    if len(uids) <= size:
        return uids
    sample = replayed_sample(netuid, window, hashes, uids, size)
    recent = [w for w in range(window - (MAX_GAP - 1), window) if w >= 0]
    if len(recent) == MAX_GAP - 1:
        seen: set[int] = set()
        for w in recent:
            seen |= replayed_sample(netuid, w, hashes, uids, size)
        sample |= set(uids) - seen
    return sorted(sample)


def hash_windows(window: int) -> range:
    """The windows whose seed hashes `scored_sample(window, ...)` reads."""
    return range(_replay_start(max(0, window - (MAX_GAP - 1))), window + 1)


def sample_hashes(window: int, seed_hash_of: Callable[[int], str]) -> dict[int, str]:
    """{window: seed hash} for every window `scored_sample(window, ...)` reads, from
    `seed_hash_of(window)` (a chain read, or a cache of them)."""
    return {w: seed_hash_of(w) for w in hash_windows(window)}
