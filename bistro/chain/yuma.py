"""Yuma consensus for one epoch: weights and stake in, incentive and dividends out.

Follows subtensor's `epoch` (pallets/subtensor/src/epoch/run_epoch.rs, Yuma with bonds EMA), in
floats rather than fixed point:

1. Active stake: the stake of uids with a validator permit that were active within
   `activity_cutoff` blocks (their last weights, or their registration if they never set any),
   normalised to sum 1. A validator that stopped setting weights stops counting.
2. Weights: rows of uids without a permit are zeroed, self-weights (the diagonal) are removed,
   then each row is normalised to sum 1.
3. Consensus per column: the stake-weighted median with majority κ. A validator that set no weight
   for a uid counts as 0 for it. Precisely (math.rs `weighted_median`): sort the column's scores,
   C is the smallest score whose cumulative stake exceeds 1 − κ.
4. Clipping: `W̄ = min(W, C)`; validator trust is the row sum of W̄.
5. Rank `R = S·W̄`, incentive `I = R / ΣR` (all zero when ΣR = 0).
6. Bonds: `W_b = (1−β)W + βW̄`, `ΔB = col_norm(S ⊙ W_b)`, `B = α ΔB + (1−α) B_prev`, column
   normalised again (a column that is all zero stays zero).
7. Dividends: `D_i ∝ Σ_j B_ij I_j`, normalised to sum 1.

Pure numpy: no chain, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class YumaResult:
    """Per-uid outputs of one epoch (vectors of length n, bonds n × n)."""

    consensus: np.ndarray
    incentive: np.ndarray
    dividends: np.ndarray
    bonds: np.ndarray
    validator_trust: np.ndarray
    rank: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    total = x.sum()
    return x / total if total > 0 else np.zeros_like(x)


def _row_normalize(m: np.ndarray) -> np.ndarray:
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def _col_normalize(m: np.ndarray) -> np.ndarray:
    sums = m.sum(axis=0, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def weighted_median_col(stake: np.ndarray, W: np.ndarray, kappa: float) -> np.ndarray:
    """Per column, the smallest score whose cumulative stake (ascending) exceeds 1 − κ.

    Only rows with stake count; their stake is renormalised first, as subtensor does.
    """
    rows = stake > 0
    n_cols = W.shape[1]
    if not rows.any():
        return np.zeros(n_cols)
    s = _normalize(stake[rows])
    minority = 1.0 - kappa
    out = np.zeros(n_cols)
    for c in range(n_cols):
        scores = W[rows, c]
        order = np.argsort(scores, kind="stable")
        cum = np.cumsum(s[order])
        k = int(np.searchsorted(cum, minority, side="right"))  # first cum > minority
        out[c] = scores[order[min(k, len(order) - 1)]]
    return out


def active_mask(last_update: np.ndarray, block: int, activity_cutoff: int) -> np.ndarray:
    """Which uids are active at `block`: subtensor's `last_update + activity_cutoff >= block`.

    `last_update` is the block of each uid's last weights, or of its registration when it never
    set any (subtensor stamps LastUpdate at registration too).
    """
    return np.asarray(last_update, dtype=np.int64) + int(activity_cutoff) >= int(block)


def yuma_epoch(
    W: np.ndarray,
    S: np.ndarray,
    B_prev: np.ndarray | None = None,
    *,
    kappa: float = 32767 / 65535,
    bond_penalty: float = 1.0,
    bonds_alpha: float = 0.1,
    validator_permit: np.ndarray | None = None,
    active: np.ndarray | None = None,
) -> YumaResult:
    """Run one Yuma epoch over n uids.

    W: n × n weights, row i as uid i set them (any non-negative scale; rows are normalised here).
    S: stake of each uid. validator_permit: which rows count; by default every uid that set any
    weight. Rows without a permit are zeroed and their stake does not count.
    B_prev: the previous epoch's bonds (n × n), or None for the first epoch (the EMA then starts
    from zero, as a fresh subnet does). active: which uids are active (`active_mask`); by default
    all. An inactive validator's stake does not count, so its weights move nothing.
    """
    W = np.asarray(W, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    n = len(S)
    if W.shape != (n, n):
        raise ValueError(f"W must be {n}x{n}, got {W.shape}")
    if not (np.isfinite(W).all() and np.isfinite(S).all()) or (W < 0).any() or (S < 0).any():
        raise ValueError("W and S must be finite and non-negative")
    if validator_permit is None:
        permit = W.sum(axis=1) > 0
    else:
        permit = np.asarray(validator_permit, dtype=bool)
    alive = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    if alive.shape != (n,):
        raise ValueError(f"active must have length {n}, got {alive.shape}")
    # 1. Active stake.
    active_stake = _normalize(np.where(permit & alive, S, 0.0))
    # 2. Weights: permitted rows only, no self-weight, rows sum to 1.
    W = np.where(permit[:, None], W, 0.0)
    np.fill_diagonal(W, 0.0)
    W = _row_normalize(W)
    # 3-4. Consensus and clipping.
    consensus = weighted_median_col(active_stake, W, kappa)
    clipped = np.minimum(W, consensus[None, :])
    validator_trust = clipped.sum(axis=1)
    # 5. Rank and incentive.
    rank = active_stake @ clipped
    incentive = _normalize(rank)
    # 6. Bonds EMA.
    w_bonds = (1.0 - bond_penalty) * W + bond_penalty * clipped
    delta = _col_normalize(active_stake[:, None] * w_bonds)
    prev = np.zeros((n, n)) if B_prev is None else np.asarray(B_prev, dtype=np.float64)
    if prev.shape != (n, n):
        raise ValueError(f"B_prev must be {n}x{n}, got {prev.shape}")
    prev = _col_normalize(prev)  # subtensor normalises stored bonds before the EMA
    bonds = _col_normalize(bonds_alpha * delta + (1.0 - bonds_alpha) * prev)
    # 7. Dividends.
    dividends = _normalize(bonds @ incentive)
    return YumaResult(consensus, incentive, dividends, bonds, validator_trust, rank)
