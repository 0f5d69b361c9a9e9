"""Known answers for the mechanism's maths (DESIGN.md "Mechanism" steps 3, 5, 6, 7 and copying)."""

from __future__ import annotations

import math

import pytest

from bistro import scoring
from bistro.config import MechanismConfig
from bistro.delta.merge import clip_factors, clip_to_median_norm


def test_merge_weights_floor_lets_a_newcomer_in() -> None:
    # Pure incentive would give uid 3 nothing: the bootstrap deadlock the floor fixes.
    m = scoring.merge_weights({1: 0.7, 2: 0.3, 3: 0.0}, [1, 2, 3])
    raw = {1: 0.7, 2: 1 / 3, 3: 1 / 3}
    total = sum(raw.values())
    assert m == pytest.approx({u: v / total for u, v in raw.items()})
    assert sum(m.values()) == pytest.approx(1.0)
    assert scoring.merge_weights({}, []) == {}
    assert scoring.merge_weights({}, [5, 6]) == {5: 0.5, 6: 0.5}


def test_own_page_test_pays_only_help_beyond_the_control_pages() -> None:
    # Helps its own pages by 0.5, control pages by 0.1, the pool by 1.0 on each: share 0.5 - 0.1.
    assert scoring.own_page_test(0.5, 0.1, 1.0, 1.0) == pytest.approx(0.4)
    # A copy or a blend helps own and control pages alike (relative to the pool): 0.
    assert scoring.own_page_test(0.3, 0.15, 1.0, 0.5) == pytest.approx(0.0)
    # Harm on own pages is negative; per unit of merge weight.
    assert scoring.own_page_test(-0.2, 0.0, 1.0, 1.0) == pytest.approx(-0.2)
    assert scoring.own_page_test(0.1, 0.0, 1.0, 1.0, merge_weight=0.25) == pytest.approx(0.4)
    # A page set the pool barely moves cannot blow the ratio up (floor: a quarter of the sum).
    assert scoring.own_page_test(0.1, 0.01, 1.0, 1e-9) == pytest.approx(0.1 - 0.01 / 0.25)
    assert scoring.own_page_test(0.1, 0.0, -0.1, 0.05) == 0.0  # the pool helps neither set


def test_score_sign_rewards_deltas_that_help() -> None:
    # Losses: θ (base) 3.0 on both sets; θ_eval 2.0; without the delta 2.5 own, 2.1 control.
    assert scoring.score(2.0, 2.5, 2.0, 2.1, 1.0, 3.0, 3.0) == pytest.approx(0.5 - 0.1)
    # Removing a delta that hurts its own pages lowers their loss: negative.
    assert scoring.score(2.0, 1.5, 2.0, 2.0, 1.0, 3.0, 3.0) == pytest.approx(-0.5)
    assert scoring.score(2.0, 2.0, 2.0, 2.0, 0.3, 3.0, 3.0) == 0.0


def test_copy_order_is_evidence_then_a_seeded_draw_never_time_or_uid() -> None:
    assert scoring.copy_order({7: 0.1, 2: 0.3, 5: -0.2}, {7: 0, 2: 9, 5: 1}) == [2, 7, 5]
    # a tie goes to the seeded draw, not to the lower uid
    assert scoring.copy_order({1: 0.2, 9: 0.2}, {1: 50, 9: 3}) == [9, 1]


def test_moving_average_updates_every_uid_and_drops_the_gone() -> None:
    avg = scoring.update_averages({1: 1.0, 2: 0.5, 9: 4.0}, {1: 0.0, 3: 2.0}, [1, 2, 3], alpha=0.25)
    assert avg == pytest.approx({1: 0.75, 2: 0.375, 3: 0.5})


def test_weights_are_softmax_over_positive_averages_only() -> None:
    avg = {1: 0.02, 2: 0.01, 3: 0.0, 4: -0.03}
    w = scoring.weights_from_averages(avg, temperature=1.0)
    scale = (0.02 + 0.01) / 2  # the positive averages only
    e1, e2 = math.exp(0.02 / scale), math.exp(0.01 / scale)
    assert w[1] == pytest.approx(e1 / (e1 + e2))
    assert w[2] == pytest.approx(e2 / (e1 + e2))
    assert w[3] == 0.0 and w[4] == 0.0
    assert scoring.weights_from_averages({1: 0.0, 2: -1.0}, 1.0) == {1: 0.0, 2: 0.0}


def test_a_poisoner_does_not_flatten_the_honest_split() -> None:
    honest = {1: 0.03, 2: 0.02, 3: 0.01}
    alone = scoring.weights_from_averages(honest, 1.0, 0.1)
    poisoned = scoring.weights_from_averages({**honest, 4: -5.0}, 1.0, 0.1)
    assert poisoned[4] == 0.0
    assert {u: poisoned[u] for u in honest} == pytest.approx(alone, abs=1e-12)
    assert alone[1] - alone[3] > 0.2  # a real split that the old mean-|avg| scale flattened


def test_weights_do_not_depend_on_the_scale_of_losses() -> None:
    small = scoring.weights_from_averages({1: 2e-5, 2: 1e-5}, 1.0)
    large = scoring.weights_from_averages({1: 2.0, 2: 1.0}, 1.0)
    assert small == pytest.approx(large)


def test_copies_point_at_the_first_in_order() -> None:
    same = {frozenset({1, 2}), frozenset({1, 3}), frozenset({2, 3})}
    sim = lambda a, b: 1.0 if frozenset({a, b}) in same else 0.1  # noqa: E731
    assert scoring.find_copies([2, 1, 3, 4], sim, 0.98) == {1: 2, 3: 2}
    assert scoring.find_copies([4, 5], sim, 0.98) == {}


def test_traces_and_chance_positives_are_not_eligible() -> None:
    # uid 3: a decaying trace of one good window; uid 4: noise that helped by chance.
    avg = {1: 0.02, 2: 0.015, 3: 0.0008, 4: 0.0001, 5: -0.01}
    w = scoring.weights_from_averages(avg, temperature=1.0, eligibility=0.1)
    assert w[3] == 0.0 and w[4] == 0.0 and w[5] == 0.0
    assert w[1] + w[2] == pytest.approx(1.0) and w[1] > w[2]
    loose = scoring.weights_from_averages(avg, temperature=1.0, eligibility=0.0)
    assert loose[3] > 0.05 and loose[4] > 0.05  # what the bar prevents: exp(~0) for next to nothing


def test_a_miner_who_stopped_gets_no_weight() -> None:
    """Counted in judged windows: uid 2 faulted in its last two judged windows (with windows it was
    not drawn in between): dropped; uid 1 faulted once: kept; uid 3 was never judged: kept (its
    average, 0, pays nothing anyway)."""
    streaks: dict[int, int] = {}
    history = [  # each window: uid -> valid (True) or its fault (False); absent: not judged
        {1: True, 2: True},
        {3: True},  # 1 and 2 not drawn
        {2: False},
        {1: False},  # 2 not drawn, or unfetched: its streak stays
        {2: False},
    ]
    for judged in history:
        streaks = scoring.update_fault_streaks(streaks, judged, [1, 2, 3])
    assert streaks == {1: 1, 2: 2, 3: 0}
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    out = scoring.drop_inactive(weights, streaks, inactive_windows=2)
    assert out == pytest.approx({1: 0.5 / 0.7, 2: 0.0, 3: 0.2 / 0.7})
    # a valid delta ends the streak; a deregistered uid leaves the table
    assert scoring.update_fault_streaks(streaks, {2: True}, [1, 2]) == {1: 1, 2: 0}


def test_an_amplified_delta_counts_at_most_the_median_norm() -> None:
    weights = {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}
    norms = {1: 1.0, 2: 1.1, 3: 0.9, 4: 0.0, 5: 4.0}  # 4: a zero delta; 5: a poisoner, amplified 4x
    clipped = clip_to_median_norm(weights, norms)
    assert clipped[5] == pytest.approx(0.2 * 1.0 / 4.0)  # median of (0, .9, 1, 1.1, 4) = 1
    assert clipped[5] * norms[5] == pytest.approx(1.0 * 0.2)  # it moves θ_eval like a median delta
    assert clipped[1] == clipped[3] == clipped[4] == 0.2  # at or under the median, or zero: unchanged
    assert clipped[2] == pytest.approx(0.2 / 1.1)
    assert clip_to_median_norm({}, {}) == {}


def test_zero_deltas_do_not_set_the_median() -> None:
    """One zero upload beside one real delta made the (lower) median 0 and the real delta's weight
    0; sybils uploading zeros could do it to everyone. Zeros move nothing and do not count."""
    assert clip_factors([0.0, 2.0]) == [1.0, 1.0]
    assert clip_factors([0.0, 0.0, 0.0, 1.0, 3.0]) == [1.0, 1.0, 1.0, 1.0, pytest.approx(1 / 3)]
    assert clip_factors([0.0, 0.0]) == [1.0, 1.0] and clip_factors([]) == []
    assert clip_to_median_norm({1: 0.5, 2: 0.5}, {1: 0.0, 2: 2.0}) == {1: 0.5, 2: 0.5}
    assert scoring.own_page_test(0.3, 0.1, 0.3, 0.1, merge_weight=0.0) == 0.0  # nothing in θ_eval


def test_a_lone_miner_is_judged_by_its_raw_margin_not_cut_to_zero() -> None:
    # one delta: its help is the pool on both page sets, so the ratios are both 1
    assert scoring.own_page_test(0.30, 0.10, 0.30, 0.10) == pytest.approx(0.20)
    assert scoring.own_page_test(0.10, 0.30, 0.10, 0.30) == pytest.approx(-0.20)  # trained elsewhere
    # with others that help both sets, the normalised test (the ratios) applies
    assert scoring.own_page_test(0.30, 0.10, 0.60, 0.40) == pytest.approx(0.30 / 0.60 - 0.10 / 0.40)


def _run(pattern: str, windows: int = 30, penalty: float = 0.5, alpha: float = 0.3) -> list[float]:
    """Four honest uids (score 1 every window) and uid 9 working to `pattern` ('x' a real window,
    '.' one that was its fault), through the validator's own update; uid 9's weight per window."""
    averages: dict[int, float] = {}
    shares = []
    for w in range(windows):
        fault = scoring.fault_score(averages, penalty)
        work = pattern[w % len(pattern)] == "x"
        scores = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 9: 1.0 if work else fault}
        averages = scoring.update_averages(averages, scores, scores, alpha)
        shares.append(scoring.weights_from_averages(averages, 1.0, 0.3)[9])
    return shares


def test_a_fault_costs_more_than_a_zero_so_skipping_windows_does_not_pay() -> None:
    assert scoring.fault_score({1: 2.0, 2: 1.0, 3: -4.0}, 0.5) == pytest.approx(-0.75)
    assert scoring.fault_score({1: -1.0}, 0.5) == 0.0 == scoring.fault_score({}, 0.5)
    honest = 1 / 5
    # one real window in three: never over the eligibility bar once the averages settle
    assert max(_run("x..")[10:]) == 0.0
    # with faults scored 0 (the old rule) it drew about a third of an honest share
    old = _run("x..", penalty=0.0)[10:]
    assert sum(old) / len(old) > 0.3 * honest
    # every other window (a slow honest machine): paid, but well under an honest share
    alternate = _run("x.")[10:]
    assert 0.0 < sum(alternate) / len(alternate) < 0.5 * honest
    assert min(_run("x")[10:]) == pytest.approx(honest)  # the penalty never touches a miner that works


def test_a_window_is_paid_for_the_work_in_it() -> None:
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    assert scoring.drop_faulted(weights, [2]) == pytest.approx({1: 0.5 / 0.7, 2: 0.0, 3: 0.2 / 0.7})
    assert scoring.drop_faulted(weights, []) == pytest.approx(weights)
    assert scoring.drop_faulted(weights, [1, 2, 3]) == {1: 0.0, 2: 0.0, 3: 0.0}


# --- shaped copies: close controls and the consistency rule (docs/mechanism.md "Shaped copies") -----


def test_a_copy_is_tested_against_its_sources_pages_too() -> None:
    """A copy's random control pages may come out below its own by luck (here +0.1); its source's
    pages, which the copied part was trained on, it helps far more than its own: the least of the
    tests is negative. An honest delta helps a copier's pages (random text to it) no more than its
    control pages: with one control set the test is exactly `own_page_test`."""
    copy = scoring.own_page_test_against(0.02, 0.1, [(0.01, 0.1), (0.08, 0.2)])
    assert scoring.own_page_test(0.02, 0.01, 0.1, 0.1) > 0 > copy
    assert copy == pytest.approx(0.02 / 0.1 - 0.08 / 0.2)
    honest = scoring.own_page_test_against(0.06, 0.1, [(0.01, 0.1), (0.012, 0.1)], merge_weight=0.5)
    assert honest > 0 and honest == pytest.approx(scoring.own_page_test(0.06, 0.012, 0.1, 0.1, 0.5))
    assert scoring.own_page_test_against(0.06, 0.1, [(0.01, 0.1)]) == scoring.own_page_test(
        0.06, 0.01, 0.1, 0.1
    )
    with pytest.raises(ValueError):
        scoring.own_page_test_against(0.06, 0.1, [])


def test_close_uids_are_the_best_paid_then_the_nearest_over_the_threshold() -> None:
    cosines = {1: 1.0, 2: 0.7, 3: 0.12, 4: 0.5, 5: 0.7, 6: 0.3}
    assert scoring.close_uids(1, cosines, 0.3, 2) == [2, 5]  # itself never; ties by uid
    assert scoring.close_uids(1, cosines, 0.3, 10) == [2, 5, 4, 6]
    assert scoring.close_uids(1, cosines, 0.8, 2) == [] and scoring.close_uids(1, cosines, 0.3, 0) == []
    # the paid first: a copy's fellow copies (unpaid, nearest) must not crowd out its paid source
    assert scoring.close_uids(1, cosines, 0.3, 2, {4: 0.2, 6: 0.5}) == [6, 4]
    assert scoring.close_uids(1, cosines, 0.3, 3, {6: 0.5}) == [6, 2, 5]
    # before anyone is paid: the best moving average next (copies sink theirs; a newcomer has none)
    assert scoring.close_uids(1, cosines, 0.3, 2, {}, {4: 0.3, 2: -0.5, 5: 0.0}) == [4, 5]
    assert scoring.close_uids(1, cosines, 0.3, 2, {6: 0.1}, {4: 0.3}) == [6, 4]


def test_consistent_needs_every_one_of_the_last_scored_windows_positive() -> None:
    recent = {1: [0.2, 0.3], 2: [-0.1, 0.5], 3: [0.4], 4: [0.1, float("nan")], 5: [-1.0, 0.2, 0.3]}
    assert scoring.consistent(recent, 2) == {1, 5}
    assert scoring.consistent(recent, 1) == {1, 2, 3, 5}
    kept = scoring.remember_scores({1: [0.2, 0.3], 7: [0.5]}, {1: -0.4, 8: 0.1}, 2)
    assert kept == {1: [0.3, -0.4], 7: [0.5], 8: [0.1]}  # uid 7 was not scored: unchanged


def _pay(scores_by_window: list[dict[int, float]], consistent_windows: int) -> list[dict[int, float]]:
    """The validator's steps 6-7 (moving average, recent scores, weights) over windows of scores."""
    m = MechanismConfig()
    averages: dict[int, float] = {}
    recent: dict[int, list[float]] = {}
    out = []
    for scores in scores_by_window:
        averages = scoring.update_averages(averages, scores, set(averages) | set(scores), m.ma_alpha)
        recent = scoring.remember_scores(recent, scores, consistent_windows)
        ok = scoring.consistent(recent, consistent_windows)
        out.append(scoring.weights_from_averages(averages, m.temperature, m.eligibility, ok))
    return out


def test_a_lucky_window_of_a_copy_pays_nothing_and_an_honest_newcomer_is_paid_from_its_second() -> None:
    """Three honest uids score +0.3 each window. A copier (uid 9) scores like the copier measured on
    the tiny localnet before the close controls: one window in two positive, and up to 16x an honest
    score (its average crossed the eligibility bar and it was paid in 3 windows of 14). A newcomer
    (uid 5) joins at window 4 and scores +0.3."""
    copier = [-0.5, 4.8, -0.6, 2.0, -0.4, 1.5, -0.3, 3.0]
    windows = [{1: 0.3, 2: 0.3, 3: 0.3, 9: copier[w], **({5: 0.3} if w >= 4 else {})} for w in range(8)]
    plain = _pay(windows, consistent_windows=1)
    assert any(w[9] > 0 for w in plain)  # the moving average alone pays the copier's lucky windows
    paid = _pay(windows, MechanismConfig().consistent_windows)
    assert all(w[9] == 0.0 for w in paid), [w[9] for w in paid]
    assert paid[4][5] == 0.0 and paid[5][5] > 0.0  # the newcomer: paid from its second scored window
    assert all(sum(w.values()) == pytest.approx(1.0) for w in paid[1:])
