"""Yuma consensus against cases computed by hand (stake-weighted median, clipping, bonds EMA)."""

from __future__ import annotations

import numpy as np
import pytest

from bistro.chain.yuma import active_mask, yuma_epoch


def test_single_validator_gives_its_weights_as_incentive() -> None:
    W = np.array([[0.0, 3.0, 1.0], [0, 0, 0], [0, 0, 0]])
    r = yuma_epoch(W, np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(r.consensus, [0, 0.75, 0.25])
    np.testing.assert_allclose(r.incentive, [0, 0.75, 0.25])
    np.testing.assert_allclose(r.dividends, [1, 0, 0])
    np.testing.assert_allclose(r.validator_trust, [1, 0, 0])
    np.testing.assert_allclose(r.bonds[0], [0, 1, 1])


def test_two_validators_disagreeing_are_clipped_to_the_median() -> None:
    # v0 (stake .6) splits evenly; v1 (stake .4) gives .9 to uid 2: clipped to consensus .5.
    W = np.zeros((4, 4))
    W[0, 2:] = [1, 1]
    W[1, 2:] = [9, 1]
    r = yuma_epoch(W, np.array([0.6, 0.4, 0, 0]))
    np.testing.assert_allclose(r.consensus[2:], [0.5, 0.5])
    np.testing.assert_allclose(r.validator_trust[:2], [1.0, 0.6])
    np.testing.assert_allclose(r.rank[2:], [0.5, 0.34])
    np.testing.assert_allclose(r.incentive, [0, 0, 25 / 42, 17 / 42])
    np.testing.assert_allclose(r.bonds[:2, 3], [15 / 17, 2 / 17])
    np.testing.assert_allclose(r.dividends, [5 / 7, 2 / 7, 0, 0])


def test_exact_stake_tie_keeps_the_higher_weight() -> None:
    # kappa = 32767/65535 is just under 1/2: half the stake is enough to hold a weight up.
    W = np.zeros((4, 4))
    W[0, 2] = 1
    W[1, 3] = 1
    r = yuma_epoch(W, np.array([1.0, 1.0, 0, 0]))
    np.testing.assert_allclose(r.consensus[2:], [1, 1])
    np.testing.assert_allclose(r.incentive, [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(r.dividends, [0.5, 0.5, 0, 0])


def test_a_majority_above_kappa_decides_and_kappa_is_respected() -> None:
    W = np.zeros((4, 4))
    W[0, 2] = 1
    W[1, 3] = 1
    r = yuma_epoch(W, np.array([1.0, 1.0, 0, 0]), kappa=0.6)
    np.testing.assert_allclose(r.consensus[2:], [0, 0])
    np.testing.assert_allclose(r.incentive, 0)


def test_all_zero_weights_give_nothing() -> None:
    r = yuma_epoch(np.zeros((3, 3)), np.array([1.0, 2.0, 0]), validator_permit=np.array([1, 1, 0], bool))
    for v in (r.consensus, r.incentive, r.dividends, r.rank, r.bonds):
        np.testing.assert_array_equal(v, 0)


def test_one_validator_with_most_stake_decides() -> None:
    W = np.zeros((4, 4))
    W[0, 2] = 1
    W[1, 3] = 1
    r = yuma_epoch(W, np.array([0.9, 0.1, 0, 0]))
    np.testing.assert_allclose(r.incentive, [0, 0, 1, 0])
    np.testing.assert_allclose(r.validator_trust[:2], [1, 0])
    np.testing.assert_allclose(r.dividends, [1, 0, 0, 0])


def test_bonds_are_a_moving_average_over_epochs() -> None:
    permit = np.array([True, True, False])
    S = np.array([0.6, 0.4, 0.0])
    W1 = np.array([[0.0, 0, 1], [0, 0, 1], [0, 0, 0]])
    r1 = yuma_epoch(W1, S, validator_permit=permit)
    np.testing.assert_allclose(r1.bonds[:2, 2], [0.6, 0.4])
    # v1 stops weighting: its bond decays by (1 - alpha) but still earns dividends.
    W2 = np.array([[0.0, 0, 1], [0, 0, 0], [0, 0, 0]])
    r2 = yuma_epoch(W2, S, r1.bonds, validator_permit=permit)
    np.testing.assert_allclose(r2.bonds[:2, 2], [0.64, 0.36])
    np.testing.assert_allclose(r2.dividends, [0.64, 0.36, 0])
    np.testing.assert_allclose(r2.incentive, [0, 0, 1])


def test_rows_without_permit_and_self_weights_do_not_count() -> None:
    W = np.array([[1.0, 0, 1], [0, 0, 1], [0, 5, 0]])  # uid 0 weights itself; uid 2 has no permit
    r = yuma_epoch(W, np.array([1.0, 0, 10.0]), validator_permit=np.array([True, False, False]))
    np.testing.assert_allclose(r.incentive, [0, 0, 1])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        yuma_epoch(np.zeros((2, 3)), np.ones(2))
    with pytest.raises(ValueError):
        yuma_epoch(np.array([[0, np.nan], [0, 0]]), np.ones(2))


def test_activity_cutoff_as_subtensor_computes_it() -> None:
    # subtensor: inactive = last_update + activity_cutoff < current_block
    np.testing.assert_array_equal(active_mask(np.array([0, 10, 11]), 110, 100), [False, True, True])


def test_an_inactive_validator_drops_out_of_the_active_stake() -> None:
    # v0 (stake .6) weights uid 2, v1 (stake .4) uid 3; with v0 inactive, v1 alone decides.
    W = np.zeros((4, 4))
    W[0, 2] = 1
    W[1, 3] = 1
    S = np.array([0.6, 0.4, 0, 0])
    both = yuma_epoch(W, S)
    np.testing.assert_allclose(both.incentive, [0, 0, 1, 0])  # .6 of the stake holds uid 2 up
    np.testing.assert_allclose(both.validator_trust[:2], [1, 0])
    alone = yuma_epoch(W, S, active=np.array([False, True, True, True]))
    np.testing.assert_allclose(alone.incentive, [0, 0, 0, 1])
    np.testing.assert_allclose(alone.validator_trust[:2], [0, 1])
    np.testing.assert_allclose(alone.dividends, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="active"):
        yuma_epoch(W, S, active=np.array([True]))
