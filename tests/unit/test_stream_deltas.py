"""A validator that streams its deltas (`mechanism.stream_deltas`: it keeps each verified
blob and decodes it again at each use) copies, scores and merges bit for bit what one that holds
every decoded delta does, and never holds more than two decoded deltas at a time.

Real signed blobs (`bench.common.sign_delta`: compress + encode_delta) of both codecs; the honest
deltas share a common direction, so their top-k positions overlap, and one uid re-signs another's
wire tensors (an exact copy, dropped by `drop_copies`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch

from bistro.bench.common import keypair, sign_delta
from bistro.config import build_settings
from bistro.data import Dataset
from bistro.delta import Delta, DeltaRejected, Reason, Sparse, decode_delta
from bistro.delta.codec import Mixed
from bistro.delta.wire import expectation
from bistro.evaluator import Evaluator, Verdict
from bistro.master import apply_update
from bistro.model import build_model, state_tensors
from bistro.plan import decoded_bytes, make_plan, model_shapes, validator_items, wire_bytes
from bistro.verdicts import V

WINDOW, DIGEST, BLOCK_HASH = 3, "ab" * 32, "cd" * 32
COPIER, AUTHOR = 5, 1
SCORED = ("merge_weight", "with_local", "without_local", "with_global", "without_global", "with_other",
          "without_other", "base_local", "base_other", "score", "verdict", "copy_of")  # fmt: skip


class Alive:
    """Wraps a streamed verdict's `source`: counts decodes and how many decoded deltas are alive."""

    def __init__(self) -> None:
        self.now = self.peak = self.decodes = 0

    def wrap(self, source: Callable[[], Delta]) -> Callable[[], Delta]:
        def read() -> Delta:
            delta = Tracked(source())  # the same parts; dies when the last reader lets go
            self.decodes, self.now = self.decodes + 1, self.now + 1
            self.peak = max(self.peak, self.now)
            weakref.finalize(delta, self._gone)
            return delta

        return read

    def _gone(self) -> None:
        self.now -= 1


class Tracked(dict):
    """A decoded delta that can be weakly referenced (a plain dict cannot)."""


def world(codec: str, merge: str):
    settings = build_settings(
        "tiny", overrides={"train.threads": 1, "mechanism.codec": codec, "mechanism.merge": merge}
    )
    model = build_model(settings.model, seed=settings.model.seed)
    master = {k: v.detach().clone() for k, v in state_tensors(model).items()}
    evaluator = Evaluator(settings, model, Dataset.open(settings))
    g = torch.Generator().manual_seed(11)
    common = {k: torch.randn(v.shape, generator=g) for k, v in master.items()}
    raw = {
        uid: {k: (common[k] + torch.randn(v.shape, generator=g)) * 2e-3 for k, v in master.items()}
        for uid in range(1, 5)
    }
    raw[COPIER] = raw[AUTHOR]  # the same wire tensors, signed by the copier
    blobs = {uid: sign_delta(settings, uid, WINDOW, d, DIGEST, None) for uid, d in raw.items()}
    return settings, evaluator, master, blobs


def verdicts_of(settings, evaluator, blobs, stream: bool, alive: Alive | None = None) -> dict[int, Verdict]:
    """What `Validator._judge` makes of each blob."""
    out = {}
    for uid, blob in blobs.items():
        exp = expectation(settings, WINDOW, keypair(uid).ss58_address, DIGEST, evaluator.shapes)
        v = out[uid] = Verdict(uid)
        v.accept(decode_delta(blob, exp), blob, exp, stream)
        if alive is not None:
            v.handle.source = alive.wrap(v.handle.source)
    return out


def window(evaluator: Evaluator, master, verdicts: dict[int, Verdict]):
    """drop_copies, score, the master step (every ok delta merged: the largest merge); returns
    θ_eval, the update and the next master."""
    evaluator.drop_copies(verdicts, WINDOW, BLOCK_HASH, master)
    base, seqs = evaluator.score(WINDOW, BLOCK_HASH, master, verdicts, {1: 0.4, 2: 0.1})
    theta_eval = {k: p.detach().clone() for k, p in evaluator.params.items()}
    for v in verdicts.values():
        v.score = 1.0 if v.verdict == V.ok else 0.0
    update, info = evaluator.propose_update(master, verdicts, float("inf"), seqs)
    assert update is not None and info["accepted"]
    after = {k: t.clone() for k, t in master.items()}
    apply_update(after, update)
    return base, theta_eval, update, after


def assert_same_delta(a: Delta, b: Delta) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert type(x) is type(y), name
        if isinstance(x, Sparse):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values), name
        elif isinstance(x, Mixed):
            assert torch.equal(x.dense, y.dense) and torch.equal(x.sparse.values, y.sparse.values), name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize(
    ("codec", "merge"),
    [pytest.param("lowrank", "mean", marks=pytest.mark.slow), ("topk2", "mean"), ("topk2", "sum")],
)
def test_streaming_gives_the_same_bits_and_holds_two_deltas(codec: str, merge: str) -> None:
    settings, evaluator, master, blobs = world(codec, merge)
    held = verdicts_of(settings, evaluator, blobs, stream=False)
    alive = Alive()
    streamed = verdicts_of(settings, evaluator, blobs, stream=True, alive=alive)
    assert all(not v.handle.streamed and v.handle.held is not None for v in held.values())
    assert all(v.handle.streamed and v.handle.held is None for v in streamed.values())
    if codec == "topk2":  # the common direction makes the honest deltas' top-k positions overlap
        a, b = held[1].delta, held[2].delta
        name = max(a, key=lambda n: a[n].indices.numel())
        shared = len(set(a[name].indices.tolist()) & set(b[name].indices.tolist()))
        assert shared > a[name].indices.numel() // 20  # by chance: 1 in 64

    want = window(evaluator, master, held)
    got = window(evaluator, master, streamed)

    copies = {u for u, v in held.items() if v.verdict == V.copy}
    assert copies in ({COPIER}, {AUTHOR}), copies  # the exact copy pair: one is dropped
    for uid in blobs:
        for key in SCORED:
            assert getattr(streamed[uid], key) == getattr(held[uid], key), (uid, key)
    assert got[0] == want[0]  # the master's global loss
    for theta_got, theta_want in zip(got[1:2] + got[3:], want[1:2] + want[3:], strict=True):
        assert all(torch.equal(theta_got[k], theta_want[k]) for k in theta_want)  # θ_eval, next master
    assert_same_delta(got[2], want[2])  # the update the master applies
    assert any(v.score > 0 for v in held.values())
    # Streamed: decoded again at each use, never more than two at once.
    assert alive.decodes > 2 * len(blobs)
    assert 1 <= alive.peak <= 2, alive.peak
    assert alive.now == 0


def test_a_streamed_delta_that_fails_to_decode_again_is_rejected_and_the_window_goes_on() -> None:
    """Should never happen (the blob passed decode_delta); if it does, the uid is `bad_tensors` and
    the others are scored as if fetch had refused it."""
    settings, evaluator, master, blobs = world("topk2", "mean")
    del blobs[COPIER]
    streamed = verdicts_of(settings, evaluator, blobs, stream=True)
    calls = []

    def broken() -> Delta:
        calls.append(1)
        if len(calls) > 1:  # the first pass reads it fine, a later one does not
            raise DeltaRejected(Reason.bad_tensors, "decoded differently")
        return verdicts_of(settings, evaluator, {3: blobs[3]}, stream=False)[3].delta

    streamed[3].handle.source = broken
    refused = verdicts_of(settings, evaluator, blobs, stream=False)
    refused[3].verdict, refused[3].delta = V.bad_tensors, None
    evaluator.drop_copies(streamed, WINDOW, BLOCK_HASH, master)
    evaluator.drop_copies(refused, WINDOW, BLOCK_HASH, master)
    got = evaluator.score(WINDOW, BLOCK_HASH, master, streamed, {})
    got_eval = {k: p.detach().clone() for k, p in evaluator.params.items()}
    want = evaluator.score(WINDOW, BLOCK_HASH, master, refused, {})
    assert len(calls) >= 2  # it did fail on a re-read
    assert streamed[3].verdict == V.bad_tensors and streamed[3].score == 0.0 and streamed[3].delta is None
    assert got[0] == want[0]
    assert all(torch.equal(got_eval[k], p) for k, p in evaluator.params.items())
    for uid in (1, 2, 4):
        assert (
            streamed[uid].score == refused[uid].score
            and streamed[uid].without_local == refused[uid].without_local
        )


def test_the_plan_counts_two_decoded_deltas_when_streaming() -> None:
    # No preset streams: a validator decodes its sample once a window (32 decoded lowrank deltas
    # at 7B: about 19 GiB of host memory); a node short of host memory streams.
    assert not any(build_settings(p).mechanism.stream_deltas for p in ("tiny", "150M", "1B", "7B"))
    on = build_settings("7B", overrides={"mechanism.stream_deltas": True})
    off = build_settings("7B")
    shapes = model_shapes(on.model)
    items = {s: {i.name: i.bytes for i in validator_items(x, shapes, 256)["score"]} for s, x in (("on", on), ("off", off))}  # fmt: skip
    assert items["on"]["decoded deltas"] == 2 * decoded_bytes(on, shapes)
    assert items["off"]["decoded deltas"] == 256 * decoded_bytes(on, shapes)
    assert items["on"]["downloaded blobs"] == items["off"]["downloaded blobs"] == 256 * wire_bytes(on, shapes)
    # Every phase holds the decoded deltas: streaming saves 254 of them whatever phase peaks (a
    # decoded lowrank delta at 7B is its factors and sparse values, 0.6 GiB: 152 GiB saved).
    saved = (
        make_plan(off)["validator"]["peak_bytes_per_rank"] - make_plan(on)["validator"]["peak_bytes_per_rank"]
    )
    assert saved == 254 * decoded_bytes(on, shapes) > 150 * 2**30
