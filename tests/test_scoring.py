"""Known answers for the mechanism's maths (DESIGN.md "Mechanism" steps 3, 5, 6, 7 and copying)."""

from __future__ import annotations

import math

import pytest

from bistro import scoring


def test_merge_weights_floor_lets_a_newcomer_in() -> None:
    # Pure incentive would give uid 3 nothing: the bootstrap deadlock the floor fixes.
    m = scoring.merge_weights({1: 0.7, 2: 0.3, 3: 0.0}, [1, 2, 3])
    raw = {1: 0.7, 2: 1 / 3, 3: 1 / 3}
    total = sum(raw.values())
    assert m == pytest.approx({u: v / total for u, v in raw.items()})
    assert sum(m.values()) == pytest.approx(1.0)
    assert scoring.merge_weights({}, []) == {}
    assert scoring.merge_weights({}, [5, 6]) == {5: 0.5, 6: 0.5}


def test_score_sign_rewards_deltas_that_help() -> None:
    # Removing a helpful delta raises the loss: without > with, so the score is positive.
    assert scoring.score(2.0, 2.5, 3.0, 3.1, local_dominance=0.5) == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)
    assert scoring.score(2.0, 1.5, 3.0, 3.0, local_dominance=1.0) == pytest.approx(-0.5)
    assert scoring.score(2.0, 2.0, 3.0, 3.0, local_dominance=0.3) == 0.0
    # per unit of merge weight: the same delta merged at a quarter moves the loss a quarter as much
    assert scoring.score(2.0, 2.1, 3.0, 3.1, 0.5, merge_weight=0.25) == pytest.approx(0.4)


def test_moving_average_updates_every_uid_and_drops_the_gone() -> None:
    avg = scoring.update_averages({1: 1.0, 2: 0.5, 9: 4.0}, {1: 0.0, 3: 2.0}, [1, 2, 3], alpha=0.25)
    assert avg == pytest.approx({1: 0.75, 2: 0.375, 3: 0.5})


def test_weights_are_softmax_over_positive_averages_only() -> None:
    avg = {1: 0.02, 2: 0.01, 3: 0.0, 4: -0.03}
    w = scoring.weights_from_averages(avg, temperature=1.0)
    scale = (0.02 + 0.01 + 0.03) / 3
    e1, e2 = math.exp(0.02 / scale), math.exp(0.01 / scale)
    assert w[1] == pytest.approx(e1 / (e1 + e2))
    assert w[2] == pytest.approx(e2 / (e1 + e2))
    assert w[3] == 0.0 and w[4] == 0.0
    assert scoring.weights_from_averages({1: 0.0, 2: -1.0}, 1.0) == {1: 0.0, 2: 0.0}


def test_weights_do_not_depend_on_the_scale_of_losses() -> None:
    small = scoring.weights_from_averages({1: 2e-5, 2: 1e-5}, 1.0)
    large = scoring.weights_from_averages({1: 2.0, 2: 1.0}, 1.0)
    assert small == pytest.approx(large)


def test_copies_point_at_the_earliest_upload() -> None:
    same = {frozenset({1, 2}), frozenset({1, 3}), frozenset({2, 3})}
    sim = lambda a, b: 1.0 if frozenset({a, b}) in same else 0.1  # noqa: E731
    assert scoring.find_copies([2, 1, 3, 4], sim, 0.98) == {1: 2, 3: 2}
    assert scoring.find_copies([4, 5], sim, 0.98) == {}


def test_rotating_sample_covers_everyone() -> None:
    uids = list(range(10))
    seen = set()
    for window in range(5):
        sample = scoring.rotating_sample(uids, window, 4)
        assert len(sample) == 4
        seen |= set(sample)
    assert seen == set(uids)
    assert scoring.rotating_sample([3, 1], 7, 4) == [1, 3]


def test_traces_and_chance_positives_are_not_eligible() -> None:
    # uid 3: a decaying trace of one good window; uid 4: noise that helped by chance.
    avg = {1: 0.02, 2: 0.015, 3: 0.0008, 4: 0.0001, 5: -0.01}
    w = scoring.weights_from_averages(avg, temperature=1.0, eligibility=0.1)
    assert w[3] == 0.0 and w[4] == 0.0 and w[5] == 0.0
    assert w[1] + w[2] == pytest.approx(1.0) and w[1] > w[2]
    loose = scoring.weights_from_averages(avg, temperature=1.0, eligibility=0.0)
    assert loose[3] > 0.05 and loose[4] > 0.05  # what the bar prevents: exp(~0) for next to nothing


def test_a_miner_who_stopped_gets_no_weight() -> None:
    weights = {1: 0.6, 2: 0.4, 3: 0.0}
    out = scoring.drop_inactive(weights, {1: 10, 2: 8, 3: 10}, window=10, inactive_windows=2)
    assert out == {1: 1.0, 2: 0.0, 3: 0.0}
    assert scoring.drop_inactive(weights, {1: 9, 2: 9}, 10, 2) == pytest.approx(weights)
    assert scoring.drop_inactive({1: 1.0}, {}, 10, 2) == {1: 0.0}
