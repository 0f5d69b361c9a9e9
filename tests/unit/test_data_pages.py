"""Page assignment: deterministic, in range, eval pages a subset, uids rarely overlap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bistro.config import build_settings
from bistro.data.pages import PageSettings, eval_pages, global_pages, local_pages, span_start

PS = PageSettings(num_pages=408, pages_per_window=4, eval_pages=2, global_pages=2, miner_span=64)

ints = st.integers(min_value=0, max_value=2**20)
page_settings = st.builds(
    lambda n, span, per, ev, gl: PageSettings(
        n, min(per, span, n), min(ev, per, span, n), min(gl, n), min(span, n)
    ),
    st.integers(1, 5000),
    st.integers(1, 128),
    st.integers(1, 16),
    st.integers(0, 16),
    st.integers(0, 16),
)


@settings(max_examples=60, deadline=None)
@given(ints, ints, ints, st.text(max_size=66), page_settings)
def test_pages_in_range_distinct_and_deterministic(netuid, uid, window, block_hash, ps):
    local = local_pages(netuid, uid, window, ps)
    assert len(local) == ps.pages_per_window == len(set(local))
    assert all(0 <= p < ps.num_pages for p in local)
    start = span_start(netuid, uid, window, ps)
    assert all((p - start) % ps.num_pages < ps.miner_span for p in local)
    assert local == local_pages(netuid, uid, window, ps)

    ev = eval_pages(netuid, uid, window, block_hash, ps)
    assert len(ev) == ps.eval_pages == len(set(ev)) and set(ev) <= set(local)
    assert ev == eval_pages(netuid, uid, window, block_hash, ps)

    gl = global_pages(netuid, window, block_hash, ps)
    assert len(gl) == ps.global_pages == len(set(gl)) and all(0 <= p < ps.num_pages for p in gl)
    assert gl == global_pages(netuid, window, block_hash, ps)


def test_span_slides_with_the_window():
    starts = [span_start(212, 7, w, PS) for w in range(5)]
    assert [(b - a) % PS.num_pages for a, b in zip(starts, starts[1:], strict=False)] == [4] * 4
    assert local_pages(212, 7, 0, PS) != local_pages(212, 7, 1, PS)


def test_eval_and_global_pages_depend_on_block_hash():
    evs = {tuple(eval_pages(212, 3, 10, f"0x{h:064x}", PS)) for h in range(30)}
    assert len(evs) > 1
    gls = {tuple(global_pages(212, 10, f"0x{h:064x}", PS)) for h in range(30)}
    assert len(gls) > 20


def shared_fraction(ps: PageSettings, uids: int, windows: int = 40) -> float:
    """Of all (uid, window, page) picks, the fraction that another uid also picks that window."""
    shared = total = 0
    for window in range(windows):
        pages = [set(local_pages(212, uid, window, ps)) for uid in range(uids)]
        for i, mine in enumerate(pages):
            others = set().union(*(p for j, p in enumerate(pages) if j != i))
            shared += len(mine & others)
            total += len(mine)
    return shared / total


def test_uids_rarely_overlap():
    # the localnet's shape: 8 miners on the embedded corpus
    assert shared_fraction(PS, uids=8) < 0.05
    # a subnet's shape: 64 miners, spans far smaller than the corpus
    big = PageSettings(num_pages=100_000, pages_per_window=8, eval_pages=2, global_pages=4, miner_span=64)
    assert shared_fraction(big, uids=64, windows=5) < 0.01


def test_page_settings_clamp_to_a_small_corpus():
    s = build_settings("tiny")
    ps = PageSettings.of(s, num_pages=3)
    assert ps.miner_span == 3 and ps.pages_per_window == 3
    assert ps.global_pages == min(s.mechanism.global_pages, 3) and ps.eval_pages <= 3
    assert sorted(local_pages(1, 1, 1, ps)) == [0, 1, 2]


SCRIPT = """
import json
from bistro.data.pages import PageSettings, eval_pages, global_pages, local_pages
ps = PageSettings(408, 4, 2, 2, 64)
print(json.dumps([[local_pages(212, u, w, ps), eval_pages(212, u, w, "0xab", ps)] for u in range(8) for w in range(8)]
                 + [global_pages(212, w, "0xab", ps) for w in range(8)]))
"""


@pytest.mark.slow
def test_same_ids_in_two_processes():
    outs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, env={"PYTHONHASHSEED": str(i)}
        )
        for i in (1, 2)
    ]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in outs]
    here = [
        [local_pages(212, u, w, PS), eval_pages(212, u, w, "0xab", PS)] for u in range(8) for w in range(8)
    ]
    here += [global_pages(212, w, "0xab", PS) for w in range(8)]
    assert results[0] == results[1] == here
