"""The scored sample and the fetch order (bistro/sample.py): the same on every validator, unknown
before the seed block, every uid within MAX_GAP windows, roughly uniform."""

from __future__ import annotations

import collections
import hashlib

import pytest

from bistro import sample

NETUID = 212
UIDS = list(range(256))
SIZE = 32
WINDOWS = 260


def hashes(tag: str, n: int = WINDOWS) -> dict[int, str]:
    return {w: hashlib.sha256(f"{tag}:{w}".encode()).hexdigest() for w in range(n)}


@pytest.fixture(scope="module")
def run() -> dict[int, list[int]]:
    h = hashes("chain-a")
    return {w: sample.scored_sample(NETUID, w, h, UIDS, SIZE) for w in range(WINDOWS)}


def test_every_uid_within_max_gap(run: dict[int, list[int]]) -> None:
    last = dict.fromkeys(UIDS, -1)  # as if every uid was drawn just before window 0
    worst = 0
    for w in range(WINDOWS):
        for uid in run[w]:
            worst = max(worst, w - last[uid])
            last[uid] = w
        overdue = [uid for uid in UIDS if w - last[uid] >= sample.MAX_GAP]
        assert not overdue, (w, overdue)
    assert worst <= sample.MAX_GAP
    print(f"256 uids, sample {SIZE}: longest wait {worst} windows")


def test_sample_size_stays_near_the_setting(run: dict[int, list[int]]) -> None:
    sizes = [len(run[w]) for w in range(WINDOWS)]
    mean = sum(sizes) / len(sizes)
    print(f"sample sizes: mean {mean:.2f}, max {max(sizes)}, windows above {SIZE}: "
          f"{sum(s > SIZE for s in sizes)} of {WINDOWS}")  # fmt: skip
    assert min(sizes) == SIZE
    assert mean < SIZE * 1.1
    assert max(sizes) <= SIZE + SIZE // 2


def test_frequency_is_roughly_uniform(run: dict[int, list[int]]) -> None:
    counts = collections.Counter(uid for w in range(50, WINDOWS) for uid in run[w])
    expected = sum(counts.values()) / len(UIDS)
    assert set(counts) == set(UIDS)
    assert min(counts.values()) > 0.75 * expected and max(counts.values()) < 1.25 * expected, (
        min(counts.values()),
        max(counts.values()),
        expected,
    )


def test_deterministic_and_pure() -> None:
    """A second validator (fresh caches, uids listed in another order) draws the same samples."""
    h = hashes("chain-b", 80)
    first = [sample.scored_sample(NETUID, w, h, UIDS, SIZE) for w in range(60, 80)]
    sample._TRAJECTORIES.clear()
    sample._log_units.cache_clear()
    again = [sample.scored_sample(NETUID, w, dict(h), list(reversed(UIDS)), SIZE) for w in range(79, 59, -1)]
    assert first == list(reversed(again))


def test_unknown_before_the_seed_block() -> None:
    """The same history but another seed hash for the window itself: another sample (and another
    fetch order). The part known in advance is only the uids at the bound."""
    h = hashes("chain-c", 80)
    w = 75
    base = set(sample.scored_sample(NETUID, w, h, UIDS, SIZE))
    differ = 0
    for k in range(8):
        other = dict(h)
        other[w] = hashlib.sha256(f"other:{k}".encode()).hexdigest()
        drawn = set(sample.scored_sample(NETUID, w, other, UIDS, SIZE))
        differ += drawn != base
        assert len(base & drawn) < 0.75 * SIZE, len(base & drawn)
        assert sample.fetch_order(NETUID, w, other[w], UIDS) != sample.fetch_order(NETUID, w, h[w], UIDS)
    assert differ == 8


def test_other_netuid_other_sample() -> None:
    h = hashes("chain-d", 30)
    assert sample.scored_sample(1, 25, h, UIDS, SIZE) != sample.scored_sample(2, 25, h, UIDS, SIZE)


def test_small_networks_score_everyone() -> None:
    assert sample.scored_sample(NETUID, 5, {}, [4, 2, 9], 12) == [2, 4, 9]


def test_missing_hash_is_an_error_not_a_guess() -> None:
    h = hashes("chain-e", 40)
    del h[35]
    with pytest.raises(KeyError):
        sample.scored_sample(NETUID, 39, h, UIDS, SIZE)
    assert set(sample.hash_windows(39)) >= {39, 30, 0}


def test_fetch_order_is_a_seeded_permutation() -> None:
    order = sample.fetch_order(NETUID, 9, "ab" * 32, [5, 3, 3, 8, 1])
    assert sorted(order) == [1, 3, 5, 8]
    assert order == sample.fetch_order(NETUID, 9, "ab" * 32, [8, 1, 5, 3])
    # a uid's place is uniform: over many windows, each uid is last about equally often
    last = collections.Counter(sample.fetch_order(NETUID, w, "cd" * 32, range(8))[-1] for w in range(800))
    assert min(last.values()) > 60 and max(last.values()) < 140, last
