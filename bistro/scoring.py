"""Scores, moving averages and weights: numbers in, numbers out (docs/design.md "Mechanism").

The validator of window w, for the valid set V of deltas:

    3. m_i = normalize(max(I_i, 1/|V|))          merge weights with a bootstrap floor
    4. θ_eval = θ + Σ_{i∈V} m_i Δ_i
    5. the own-page test: s_i = [h_own / P_own − h_other / P_other] / m_i, where
       h = L(θ_eval − m_i Δ_i) − L(θ_eval) is uid i's help (under the mean merge, θ_eval less i's own
       term, `MeanMerge.term`: never the mean of the others, which paid a zero delta for
       un-diluting them) and P = L(θ) − L(θ_eval) the pooled help
       of all deltas, on i's eval pages ("own") and on as many pages it was not assigned ("other",
       its control pages), all drawn with the hash of the seed block, which exists only once
       uploads are closed (protocol.seed_block).
       - Why own vs other: a delta earns only if it helps the pages assigned to its uid *more* than
         pages it was not assigned. An honest miner trained on its pages; a copy, a noisy copy or a
         blend of other uids' deltas helps the pages their authors trained on, not the copier's,
         so its two terms match and it scores about 0. A copy plus a few steps on its own pages is
         paid only for what those steps add to its own pages (the copied part helps own and control
         pages alike).
       - Why not the global term any more: a copy helps the global pages exactly as much as its
         original, so any weight on that term pays copies. The global pages still decide whether
         the master step is accepted (step 8).
       - Why divided by P: pages differ in how much any delta can teach them; on 2 + 2 pages that,
         not the delta, dominated the raw margin h_own − h_other (tiny preset, window 0: honest
         +0.013..+0.036 against cheats up to +0.014; divided: honest +0.23..+0.40, cheats
         −0.13..+0.05). Each P is floored at a quarter of their sum so a page set the pool barely
         moves cannot blow a ratio up; if the pool helps neither set the test has no scale: 0.
       - Per unit of merge weight: taking out m_i Δ_i moves the loss in proportion to m_i, and m_i
         follows incentive (unnormalised, one lucky early window locked a miner at 0.8 of the
         weight on the tiny localnet while four identical miners shared the rest).
    6. avg_i ← (1 − α) avg_i + α s_i               for every uid judged this window (drawn in the
       sample, bistro/sample.py, and fetched); a peer fault scores `fault_score`; uids not drawn,
       `unfetched` (our link) and `skip` (our side) keep their average
    7. w_i = softmax(T · avg_i / scale) over the eligible uids, 0 elsewhere;
       eligible: avg_i > ε · mean of the positive averages (ε = `eligibility`, 0.1), and
       scale = mean of the eligible averages: positive ones only, so no negative average (a
       poisoner's) changes how the positive ones are split (with the mean |avg| of every uid, one
       strongly negative uid compressed the honest differences)
       (a plain softmax over all uids would pay a uid that did nothing exp(0); so would a softmax over
       every positive average, to a uid whose average is a decaying trace of one good window or noise
       that helped by chance: measured on the tiny localnet, those drew 7% of the weight each)

Copies (the first screen, not the defence): of deltas with cosine ≥ threshold, the one with the most
own-page evidence (`copy_order`; evaluator.own_page_evidence) is the original and the others score
zero; ties by a seeded draw. Never by upload time: a miner's own server reports it (a backdated copy
made the honest original the "copy").
No chain, store, clock or device here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence


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


def own_page_test(
    help_own: float, help_other: float, pooled_own: float, pooled_other: float, merge_weight: float = 1.0
) -> float:
    """How much more a delta helps its uid's own pages than its control pages, per unit of merge
    weight, each help (loss without − loss with) divided by the pooled help of a reference on the
    same pages (all deltas together): pages differ in how much any delta can teach them, and that
    difference, not the delta, dominated the raw margin on 2 + 2 pages (module docstring).

    Each pooled help is floored at a quarter of their sum, so a page set the pool barely moves
    cannot blow a ratio up; if the pool helps neither set, the test has no scale and gives 0.

    The ratios need other deltas to compare with: when the rest of the pool (pooled − this delta's
    help) helps neither set (a lone miner, or one among zero deltas: its help *is* the pool, both
    ratios are 1 and the test would give exactly 0 however well it trained), the raw margin is the
    test. (The tolerance, a thousandth of the pool, absorbs the fp32 noise of taking a lone delta
    out: θ_eval − Δ is not bit-exactly θ, and at 1e-6 that noise sent a lone miner to the ratios.)"""
    if merge_weight <= 0.0:  # it puts nothing into θ_eval: nothing it could have taught
        return 0.0
    tolerance = 1e-3 * (abs(pooled_own) + abs(pooled_other))
    if pooled_own - help_own <= tolerance and pooled_other - help_other <= tolerance:
        return (help_own - help_other) / merge_weight
    return relative_margin(help_own, help_other, pooled_own, pooled_other) / merge_weight


def own_page_test_against(
    help_own: float,
    pooled_own: float,
    controls: Sequence[tuple[float, float]],
    merge_weight: float = 1.0,
) -> float:
    """`own_page_test` against each control page set in `controls` ((help, pooled help) pairs: the
    random control pages first, then the eval pages of the uids whose deltas are closest to this
    one), and the least of them: the delta must help its own pages more than every control set. A
    copy helps its source's pages more than its own, whatever luck its random controls bring."""
    if not controls:
        raise ValueError("own_page_test_against needs at least one control page set")
    return min(own_page_test(help_own, h, pooled_own, p, merge_weight) for h, p in controls)


def close_uids(
    uid: int,
    cosines: Mapping[int, float],
    threshold: float,
    limit: int,
    incentive: Mapping[int, float] | None = None,
    averages: Mapping[int, float] | None = None,
) -> list[int]:
    """The other uids whose deltas' cosine to `uid`'s (`cosines`: uid → cosine) reaches `threshold`,
    at most `limit`: whose pages are `uid`'s close controls. The best-paid first (`incentive`, the
    chain's), then the best moving average (`averages`, this validator's: before anyone is paid,
    and between two payments), then the nearest, ties by uid. Paid, well-scored work is what a
    copier copies, and several copies of one source sit nearer to each other than to it (a
    copycat's is exact; a blend holds half of it), so by nearness alone a copy's close uids would
    be its fellow copies, whose pages are random text to it."""
    paid, average = incentive or {}, averages or {}
    near = [u for u, c in cosines.items() if u != uid and c >= threshold]
    return sorted(near, key=lambda u: (-paid.get(u, 0.0), -average.get(u, 0.0), -cosines[u], u))[:limit]


def consistent(recent: Mapping[int, Sequence[float]], windows: int) -> set[int]:
    """Uids whose last `windows` scored windows (`recent`: uid → its scores, oldest first) all
    scored above 0. A uid with fewer scored windows than that is not consistent yet."""
    return {
        uid for uid, scores in recent.items()
        if len(scores) >= windows and all(x > 0.0 and math.isfinite(x) for x in scores[-windows:])
    }  # fmt: skip


def remember_scores(
    recent: Mapping[int, Sequence[float]], scores: Mapping[int, float], windows: int
) -> dict[int, list[float]]:
    """`recent` with this window's `scores` appended (the last `windows` kept); uids without a score
    this window (not scored, or skipped for our own fault) keep theirs unchanged."""
    out = {uid: list(xs) for uid, xs in recent.items()}
    for uid, x in scores.items():
        out[uid] = (out.get(uid, []) + [float(x)])[-windows:]
    return out


def relative_margin(help_own: float, help_other: float, ref_own: float, ref_other: float) -> float:
    """help_own / ref_own − help_other / ref_other: each help over a reference's help on the same
    pages, the references floored at a quarter of their sum (a page set the reference barely moves
    cannot blow a ratio up); 0 when the reference helps neither set. `own_page_test` without the
    lone-miner rule (which reads the reference as a pool that *contains* the delta). The copy order
    does not use it: its evidence is the raw margin (`Evaluator.own_page_evidence` says why)."""
    floor = 0.25 * (ref_own + ref_other)
    if floor <= 0.0:
        return 0.0
    return help_own / max(ref_own, floor) - help_other / max(ref_other, floor)


def score(
    with_own: float,
    without_own: float,
    with_other: float,
    without_other: float,
    merge_weight: float,
    base_own: float,
    base_other: float,
) -> float:
    """Step 5: `own_page_test` of uid i's leave-one-out helps (L(θ_eval − m_i Δ_i) − L(θ_eval)) on
    its eval pages and its control pages, against the pooled helps (L(θ) − L(θ_eval)). Positive
    means it trained on its own pages; a copy, a blend or noise scores about 0."""
    return own_page_test(
        without_own - with_own, without_other - with_other, base_own - with_own, base_other - with_other,
        merge_weight,
    )  # fmt: skip


def copy_order(evidence: Mapping[int, float], tiebreak: Mapping[int, int]) -> list[int]:
    """The uids of near-copy groups in the order `find_copies` takes as "first": the most own-page
    evidence first (the author of a delta is the one whose own pages it helps), ties by a seeded
    draw (`tiebreak`, e.g. `protocol.seed` of the window and uid), never by time or uid order."""
    return sorted(evidence, key=lambda uid: (-evidence[uid], tiebreak[uid], uid))


def update_averages(
    averages: Mapping[int, float], scores: Mapping[int, float], uids: Iterable[int], alpha: float
) -> dict[int, float]:
    """Step 6 for every uid in `uids` (a uid without a score scores 0); uids not listed are dropped
    (deregistered)."""
    return {
        uid: (1.0 - alpha) * float(averages.get(uid, 0.0)) + alpha * float(scores.get(uid, 0.0))
        for uid in sorted(set(uids))
    }


def fault_score(averages: Mapping[int, float], penalty: float) -> float:
    """The score of a window that was the peer's fault: −penalty × the mean positive moving average
    (0 while no average is positive). Scaled by what miners earn, so it means the same early in
    training and late; bounded, since an average that only faults converges to exactly this."""
    positive = [v for v in averages.values() if v > 0.0 and math.isfinite(v)]
    return -penalty * sum(positive) / len(positive) if positive else 0.0


def weights_from_averages(
    averages: Mapping[int, float],
    temperature: float,
    eligibility: float = 0.0,
    consistent: Collection[int] | None = None,
) -> dict[int, float]:
    """Step 7: softmax(T · avg / scale) over eligible averages; every other uid gets 0.

    Eligible: avg > eligibility × (mean of the positive averages), and > 0. `scale` is the mean of
    the eligible averages, so a temperature means the same early in training (large loss
    differences) and late (tiny ones), and no negative average (a poisoner's) changes how the
    positive ones are split (`test_a_poisoner_does_not_flatten_the_honest_split`)."""
    positive = {uid: v for uid, v in averages.items() if v > 0.0 and math.isfinite(v)}
    weights = {uid: 0.0 for uid in averages}
    if not positive:
        return weights
    bar = eligibility * sum(positive.values()) / len(positive)
    positive = {
        uid: v for uid, v in positive.items() if v > bar and (consistent is None or uid in consistent)
    }
    if not positive:
        return weights
    scale = sum(positive.values()) / len(positive)
    logits = {uid: temperature * v / scale for uid, v in positive.items()}
    top = max(logits.values())
    exp = {uid: math.exp(x - top) for uid, x in logits.items()}
    total = sum(exp.values())
    weights.update({uid: e / total for uid, e in exp.items()})
    return weights


def _renormalised(weights: Mapping[int, float]) -> dict[int, float]:
    """`weights` over their sum (all 0 when nothing is left)."""
    total = sum(weights.values())
    return {uid: (w / total if total > 0 else 0.0) for uid, w in weights.items()}


def update_fault_streaks(
    streaks: Mapping[int, int], judged: Mapping[int, bool], uids: Iterable[int]
) -> dict[int, int]:
    """Judged windows in a row that were each uid's fault: `judged[uid]` is True for a valid delta
    (the streak ends), False for the peer's fault (it grows). Uids not in `judged` (not drawn in the
    sample, `unfetched`, `skip`: nothing was judged) keep their streak; uids not in `uids` are
    dropped (deregistered)."""
    out = {}
    for uid in sorted(set(uids)):
        streak = int(streaks.get(uid, 0))
        if uid in judged:
            streak = 0 if judged[uid] else streak + 1
        out[uid] = streak
    return out


def drop_inactive(
    weights: Mapping[int, float], fault_streaks: Mapping[int, int], inactive_windows: int
) -> dict[int, float]:
    """Zero the weight of uids whose last `inactive_windows` judged windows were all their fault,
    and renormalise. The moving average smooths noisy scores of miners who work; it must not keep
    paying one who stopped. Counted in judged windows, not windows: a uid is scored only in the
    windows it is drawn in (bistro/sample.py), and one not drawn lately has done nothing wrong."""
    kept = {uid: (0.0 if fault_streaks.get(uid, 0) >= inactive_windows else w) for uid, w in weights.items()}
    return _renormalised(kept)


def drop_faulted(weights: Mapping[int, float], faulted: Iterable[int]) -> dict[int, float]:
    """Zero the weight of uids whose verdict in this window was their fault (`PEER_FAULTS`), and
    renormalise: a window is paid for the work in it. The moving average alone kept a miner that
    uploads one real window in three paid in the windows it skipped (its average outlived them);
    uids outside this window's sample are not touched (`drop_inactive` covers them)."""
    faulted = set(faulted)
    kept = {uid: (0.0 if uid in faulted else w) for uid, w in weights.items()}
    return _renormalised(kept)


def find_copies(
    order: Sequence[int], similarity: Callable[[int, int], float], threshold: float
) -> dict[int, int]:
    """Uids whose delta is a near-copy (cosine ≥ threshold) of one earlier in `order`.

    `order` is `copy_order` (own-page evidence, then a seeded tie-break). Returns {copier:
    original}. A copy is compared against originals only, so a chain of copies all point at the
    first."""
    copies: dict[int, int] = {}
    originals: list[int] = []
    for uid in order:
        source = next((o for o in originals if similarity(o, uid) >= threshold), None)
        if source is None:
            originals.append(uid)
        else:
            copies[uid] = source
    return copies
