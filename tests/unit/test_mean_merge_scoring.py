"""The validator scores the merge the master applies ("whatever the master applies, the
validator's leave-one-out scoring must measure the same merge"), and the master takes only the
deltas of uids the weights pay."""

from __future__ import annotations

import math

import pytest
import torch

from bistro.config import build_settings, replace
from bistro.data import Dataset
from bistro.delta import CODECS, MeanMerge, add_, delta_norm, merge_mean, scaled
from bistro.delta.codec import codec_context
from bistro.evaluator import Evaluator, Verdict
from bistro.manifest import delta_sha256
from bistro.model import build_model, state_tensors

BLOCK_HASH = "cd" * 32


@pytest.fixture(scope="module")
def world():
    settings = build_settings("tiny", overrides={"train.threads": 1})
    assert settings.mechanism.merge == "mean" and settings.mechanism.codec == "lowrank"  # the defaults
    model = build_model(settings.model, seed=settings.model.seed)
    master = {k: v.detach().clone() for k, v in state_tensors(model).items()}
    evaluator = Evaluator(settings, model, Dataset.open(settings))
    codec, ctx = CODECS[settings.mechanism.codec], codec_context(settings, 3)
    g = torch.Generator().manual_seed(7)
    deltas = [
        codec.decode(
            codec.encode({k: torch.randn(v.shape, generator=g) * 3e-3 for k, v in master.items()}, ctx),
            ctx,
            evaluator.shapes,
        )
        for _ in range(3)
    ]
    return settings, evaluator, master, deltas


def verdicts_of(deltas) -> dict[int, Verdict]:
    return {uid: Verdict.holding(uid, d) for uid, d in enumerate(deltas, start=1)}


def test_theta_eval_is_what_the_master_would_apply(world) -> None:
    """With every delta helpful, the update the master proposes moves θ to exactly the θ_eval the
    scores were measured at: the same global loss, bit for bit."""
    _, evaluator, master, deltas = world
    verdicts = verdicts_of(deltas)
    base, seqs = evaluator.score(3, BLOCK_HASH, master, verdicts, {})
    with_global = verdicts[1].with_global
    for v in verdicts.values():
        v.score = 1.0
    update, info = evaluator.propose_update(master, verdicts, float("inf"), seqs)
    assert update is not None and info["merged_uids"] == [1, 2, 3]
    assert info["global_loss_after"] == with_global
    assert base != with_global


def test_without_uid_i_is_theta_eval_less_its_own_term(world) -> None:
    """Without uid i under the mean merge: the loss at θ + the merge with i's values zeroed and its
    weight kept (nobody else's value grows where i was), not θ + the mean of the others (which
    un-dilutes them, and paid a freeloader for it) nor θ_eval − m_i Δ_i as under the weighted sum."""
    _, evaluator, master, deltas = world
    size = delta_norm(deltas[0])
    same = [scaled(d, size / delta_norm(d)) for d in deltas]  # one norm: zeroing one moves no clip factor
    verdicts = verdicts_of(same)
    evaluator.score(3, BLOCK_HASH, master, verdicts, {})
    weights = [verdicts[uid].merge_weight for uid in sorted(verdicts)]
    for j, uid in enumerate(sorted(verdicts)):
        zeroed = [scaled(d, 0.0) if k == j else d for k, d in enumerate(same)]
        evaluator.set_params(master)
        with torch.no_grad():
            add_(evaluator.params, merge_mean(zeroed, weights, evaluator.shapes), 1.0)
        own = evaluator.eval_sequences(uid, 3, BLOCK_HASH)
        assert evaluator.loss(own) == pytest.approx(verdicts[uid].without_local, abs=1e-6)
    # the mean of the others is a different model: the test can tell the two apart
    evaluator.set_params(master)
    with torch.no_grad():
        add_(evaluator.params, merge_mean(same[1:], weights[1:], evaluator.shapes), 1.0)
    assert evaluator.loss(evaluator.eval_sequences(1, 3, BLOCK_HASH)) != pytest.approx(
        verdicts[1].without_local, abs=1e-6
    )


def test_a_zero_delta_among_real_ones_scores_exactly_zero(world) -> None:
    """The freeloader that once broke the mean merge: its all-zero upload dilutes every mean it is in, and "the
    mean of the others" gave it the credit of un-diluting them (its summed incentive beat an honest
    miner's). Its own term is zero: θ_eval without it is θ_eval, bit for bit, and it earns 0.0."""
    _, evaluator, master, deltas = world
    verdicts = verdicts_of([*deltas, scaled(deltas[0], 0.0)])
    evaluator.score(3, BLOCK_HASH, master, verdicts, {})
    zero = verdicts[4]
    assert zero.merge_weight > 0  # it is in θ_eval, diluting the others
    assert zero.without_local == zero.with_local and zero.without_other == zero.with_other
    assert zero.score == 0.0
    assert all(verdicts[uid].without_local != verdicts[uid].with_local for uid in (1, 2, 3))  # measured


def test_share_is_one_without_overlap_and_the_weight_under_full_overlap(world) -> None:
    _, evaluator, _, deltas = world
    alone = MeanMerge(deltas[:1], [1.0], evaluator.shapes)
    assert alone.share(0) == pytest.approx(1.0)
    same = MeanMerge([deltas[0], deltas[0]], [0.25, 0.75], evaluator.shapes)
    assert same.share(0) == pytest.approx(0.25) and same.share(1) == pytest.approx(0.75)
    mixed = MeanMerge(deltas, [1 / 3] * 3, evaluator.shapes)
    assert all(1 / 3 < mixed.share(i) <= 1.0 for i in range(3))  # random top-k overlaps little


def test_the_master_merges_only_uids_the_weights_pay(world) -> None:
    """A delta that scored above 0 by chance (noise, poison) but carries no weight stays out of the
    master: under the mean merge it would count whole wherever no other delta overlaps it."""
    _, evaluator, master, deltas = world
    verdicts = verdicts_of(deltas)
    _, seqs = evaluator.score(3, BLOCK_HASH, master, verdicts, {})
    for v in verdicts.values():
        v.score = 1.0
    _, info = evaluator.propose_update(master, verdicts, float("inf"), seqs, paid={1, 3})
    assert info["merged_uids"] == [1, 3]
    update, info = evaluator.propose_update(master, verdicts, float("inf"), seqs, paid=set())
    assert update is None and info["merged_uids"] == []


def test_a_zero_delta_beside_a_real_one_neither_crashes_nor_silences_it(world) -> None:
    """Seen in a localnet: a freeloader's all-zero upload and one real delta were the window's only
    valid deltas; the zero set the median norm, the real delta's share became 0 and the validator
    died dividing by it. Now the real delta counts whole and both are scored."""
    _, evaluator, master, deltas = world
    zero = scaled(deltas[0], 0.0)
    mm = MeanMerge([zero, deltas[1]], [0.5, 0.5], evaluator.shapes)
    assert mm.clip == [1.0, 1.0] and mm.share(1) > 0.5
    verdicts = verdicts_of([zero, deltas[1]])
    evaluator.score(3, BLOCK_HASH, master, verdicts, {})
    assert math.isfinite(verdicts[1].score) and verdicts[2].score != 0.0


def test_an_update_that_overshoots_is_taken_at_half_its_size(world) -> None:
    """The master step tries U, then U/2 (evaluator.STEPS): a merge that overshoots on the global
    pages no longer stands the master still (the demo refused three honest updates in a row)."""
    from bistro.delta import scaled
    from bistro.evaluator import STEPS
    from bistro.model import token_losses

    assert STEPS == (1.0, 0.5)
    _, evaluator, master, _ = world
    _, seqs = evaluator.score(3, BLOCK_HASH, master, {}, {})
    evaluator.set_params(master)
    params = dict(evaluator.model.named_parameters())
    evaluator.model.zero_grad()
    with torch.enable_grad():
        token_losses(evaluator.model, seqs[:8]).mean().backward()
    down = {n: -params[n].grad.detach().clone() for n in master if params[n].grad is not None}
    evaluator.model.zero_grad()
    base = evaluator.loss(seqs)

    def loss_at(step: dict) -> float:
        evaluator.set_params(master)
        add_(evaluator.params, step, 1.0)
        return evaluator.loss(seqs)

    # the smallest step along the descent direction whose full size overshoots and whose half helps
    for size in (2.0**k for k in range(-6, 16)):
        update = scaled(down, size)
        if loss_at(update) >= base and loss_at(scaled(update, 0.5)) < base:
            break
    else:
        pytest.fail("no overshooting step found")
    # one helpful delta: the mean merge of it alone is itself
    verdicts = {1: Verdict.holding(1, update, merge_weight=1.0, score=1.0)}
    got, info = evaluator.propose_update(master, verdicts, base, seqs)
    assert info["accepted"] and info["step"] == 0.5 and info["global_loss_after"] < base
    assert all(torch.equal(got[n], update[n] * 0.5) for n in update)
    # a small step uphill helps at neither size: refused, whole, for the benchmarks to count
    away = scaled(down, -(2.0**-6))
    verdicts[1].delta = away
    got, info = evaluator.propose_update(master, verdicts, base, seqs)
    assert got is None and not info["accepted"] and evaluator.refused is not None


def test_scores_on_several_host_threads_are_one_threads_bit_for_bit(world) -> None:
    """`mechanism.host_threads` spreads the host work (sketches, the merge's sums, each uid's share
    and term) over threads: every loss, score and the proposed update are those of one thread."""
    settings, evaluator, master, deltas = world
    out = {}
    for threads in (1, 3):
        evaluator.settings = replace(settings, **{"mechanism.host_threads": threads})
        verdicts = verdicts_of(deltas)
        evaluator.drop_copies(verdicts, 3, BLOCK_HASH, master)
        base, seqs = evaluator.score(3, BLOCK_HASH, master, verdicts, {})
        fields = [
            (v.score, v.with_local, v.without_local, v.without_other, v.close_to) for v in verdicts.values()
        ]
        for v in verdicts.values():
            v.score = 1.0  # every delta merged
        update, _ = evaluator.propose_update(master, verdicts, float("inf"), seqs)
        out[threads] = (base, fields, update)
    evaluator.settings = settings
    assert out[1][:2] == out[3][:2]
    assert out[1][2] is not None and out[3][2] is not None
    assert delta_sha256(out[1][2]) == delta_sha256(out[3][2])
