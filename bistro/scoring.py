"""Scores, moving averages and weights: numbers in, numbers out (DESIGN.md "Mechanism").

The validator of window w, for the valid set V of deltas:

    3. m_i = normalize(max(I_i, 1/|V|))          merge weights with a bootstrap floor
    4. θ_eval = θ + Σ_{i∈V} m_i Δ_i
    5. s_i = [λ (L_without − L_with)_own pages + (1 − λ) (L_without − L_with)_global pages] / m_i
       positive when the delta helps (the seed wrote L_with − L_without: that rewards harm); per
       unit of merge weight, because taking out m_i Δ_i moves the loss in proportion to m_i, and
       m_i follows incentive: unnormalised, one lucky early window locked a miner at 0.8 of the
       weight on the tiny localnet while four identical miners shared the rest
    6. avg_i ← (1 − α) avg_i + α s_i               for every uid, zero for those with no valid delta
    7. w_i = softmax(T · avg_i / scale) over the eligible uids, 0 elsewhere, scale = mean |avg|;
       eligible: avg_i > ε · mean of the positive averages (ε = `eligibility`, 0.1)
       (a plain softmax over all uids would pay a uid that did nothing exp(0); so would a softmax over
       every positive average, to a uid whose average is a decaying trace of one good window or noise
       that helped by chance: measured on the tiny localnet, those drew 7% of the weight each)

Copies: of two deltas with cosine ≥ threshold, the later upload (time, then uid) scores zero.
No chain, store, clock or device here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence


def merge_weights(incentive: Mapping[int, float], valid: Iterable[int]) -> dict[int, float]:
    """Step 3: m_i = max(I_i, 1/|V|) normalised over V. Without the floor a uid with zero incentive
    could never show that its delta helps (the seed's bootstrap deadlock)."""
    valid = sorted(set(valid))
    if not valid:
        return {}
    floor = 1.0 / len(valid)
    raw = {uid: max(float(incentive.get(uid, 0.0)), floor) for uid in valid}
    total = sum(raw.values())
    return {uid: v / total for uid, v in raw.items()}


def score(
    with_local: float,
    without_local: float,
    with_global: float,
    without_global: float,
    local_dominance: float,
    merge_weight: float = 1.0,
) -> float:
    """Step 5: how much the loss rises when the delta (merged at `merge_weight`) is taken out, per
    unit of merge weight. Positive means it helps."""
    local = without_local - with_local
    global_ = without_global - with_global
    return (local_dominance * local + (1.0 - local_dominance) * global_) / merge_weight


def update_averages(
    averages: Mapping[int, float], scores: Mapping[int, float], uids: Iterable[int], alpha: float
) -> dict[int, float]:
    """Step 6 for every uid in `uids` (a uid without a score scores 0); uids not listed are dropped
    (deregistered)."""
    return {
        uid: (1.0 - alpha) * float(averages.get(uid, 0.0)) + alpha * float(scores.get(uid, 0.0))
        for uid in sorted(set(uids))
    }


def weights_from_averages(
    averages: Mapping[int, float], temperature: float, eligibility: float = 0.0
) -> dict[int, float]:
    """Step 7: softmax(T · avg / scale) over eligible averages; every other uid gets 0.

    Eligible: avg > eligibility × (mean of the positive averages), and > 0. `scale` is the mean |avg|
    over uids with a nonzero average, so a temperature means the same early in training (large loss
    differences) and late (tiny ones)."""
    nonzero = [abs(v) for v in averages.values() if v != 0.0 and math.isfinite(v)]
    positive = {uid: v for uid, v in averages.items() if v > 0.0 and math.isfinite(v)}
    weights = {uid: 0.0 for uid in averages}
    if not positive:
        return weights
    bar = eligibility * sum(positive.values()) / len(positive)
    positive = {uid: v for uid, v in positive.items() if v > bar}
    scale = sum(nonzero) / len(nonzero)
    logits = {uid: temperature * v / scale for uid, v in positive.items()}
    top = max(logits.values())
    exp = {uid: math.exp(x - top) for uid, x in logits.items()}
    total = sum(exp.values())
    weights.update({uid: e / total for uid, e in exp.items()})
    return weights


def drop_inactive(
    weights: Mapping[int, float], last_valid: Mapping[int, int], window: int, inactive_windows: int
) -> dict[int, float]:
    """Zero the weight of uids with no valid delta in the last `inactive_windows` windows, and
    renormalise. The moving average smooths noisy scores of miners who work; it must not keep paying
    one who stopped."""
    kept = {
        uid: (w if window - last_valid.get(uid, -(10**9)) < inactive_windows else 0.0)
        for uid, w in weights.items()
    }
    total = sum(kept.values())
    return {uid: (w / total if total > 0 else 0.0) for uid, w in kept.items()}


def find_copies(
    order: Sequence[int], similarity: Callable[[int, int], float], threshold: float
) -> dict[int, int]:
    """Uids whose delta is a near-copy (cosine ≥ threshold) of one uploaded earlier.

    `order` lists uids by upload time, then uid. Returns {copier: original}. A copy is compared
    against originals only, so a chain of copies all point at the first upload."""
    copies: dict[int, int] = {}
    originals: list[int] = []
    for uid in order:
        source = next((o for o in originals if similarity(o, uid) >= threshold), None)
        if source is None:
            originals.append(uid)
        else:
            copies[uid] = source
    return copies


def rotating_sample(uids: Sequence[int], window: int, limit: int) -> list[int]:
    """At most `limit` uids, rotating with the window so every uid is evaluated in turn."""
    uids = sorted(uids)
    if len(uids) <= limit:
        return uids
    start = (window * limit) % len(uids)
    return sorted((uids + uids)[start : start + limit])
