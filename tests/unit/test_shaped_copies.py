"""Copiers below both copy screens: a copy plus noise shaped like the delta (the `shaped_copier`
personas), and what keeps them unpaid (docs/mechanism.md "Shaped copies")."""

from __future__ import annotations

import time
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from bistro.config import build_settings
from bistro.delta import low_rank_similarity, similarity
from bistro.delta.codec import CODECS, Mixed, codec_context, compress

SHAPES = {"attn": (96, 256), "mlp": (256, 96), "norm": (256,)}


def _source(codec_name: str, seed: int = 0):
    """A decoded delta shaped like a trained one: each matrix mostly rank 1 (Adam's few steps: the
    best rank-1 approximation holds most of the energy) plus a spread of smaller values."""
    s = build_settings("tiny", overrides={"mechanism.codec": codec_name})
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            a, b = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
            delta[name] = torch.outer(a, b) / 10 + 0.05 * torch.randn(shape, generator=g)
        else:
            delta[name] = 0.01 * torch.randn(shape, generator=g)
    codec, ctx = CODECS[codec_name], codec_context(s, 3)
    wire = compress(delta, codec, ctx, None)
    return s, codec, ctx, wire, codec.decode(wire, ctx, SHAPES)


def _miner(codec, ctx, uid: int = 7) -> SimpleNamespace:
    miner = SimpleNamespace(uid=uid, codec=codec, shapes=SHAPES, ctx=lambda window: ctx)
    miner.encode = lambda window, tensors: tensors  # the forged wire tensors, unsigned
    return miner


@pytest.mark.parametrize("persona", ["shaped_copier", "shaped_copier_05", "rotating_copier"])
def test_a_shaped_copy_sits_at_its_cosine_as_a_whole_and_in_the_low_rank_factors(persona: str) -> None:
    """The defining property: decoded with the network's codec (lowrank), the copy's cosine to its
    source is about the persona's (0.7 or 0.5) both as whole vectors (what `copy_threshold`
    compares) and in the low-rank parts (`low_rank_copy_threshold`): under both screens. Its
    low-rank part stays rank 1 (a rotation of the source's factors, not a second direction)."""
    from bistro.localnet.personas import PERSONAS

    s, codec, ctx, wire, original = _source("lowrank")
    cls = PERSONAS[persona]
    started = time.process_time()  # the forger's own CPU: what a busy test machine cannot inflate
    forged = codec.decode(cls(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES)
    seconds = time.process_time() - started
    whole, low = similarity(original, forged), low_rank_similarity(original, forged)
    assert abs(whole - cls.cosine) < 0.06, whole
    assert abs(low - cls.cosine) < 0.06, low
    assert whole < s.mechanism.copy_threshold and low < s.mechanism.low_rank_copy_threshold
    for name in ("attn", "mlp"):
        assert isinstance(forged[name], Mixed)
        assert torch.linalg.matrix_rank(forged[name].dense).item() == 1, name
    assert seconds < 10, seconds  # the copier must forge it before the upload deadline


def test_a_shaped_copy_with_another_codec_sits_at_its_cosine() -> None:
    """With a codec without low-rank parts (topk2) the noise goes on the sent values alone."""
    from bistro.localnet.personas import ShapedCopier

    _, codec, ctx, wire, original = _source("topk2")
    forged = codec.decode(ShapedCopier(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES)
    assert abs(similarity(original, forged) - 0.7) < 0.06


def test_two_windows_two_copiers_draw_different_noise() -> None:
    """The noise is seeded by the uid and the window (protocol.seed): two copiers of one source,
    or one copier in two windows, are not copies of each other."""
    from bistro.localnet.personas import ShapedCopier

    _, codec, ctx, wire, original = _source("lowrank")
    a = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(3, [(wire, original)]), ctx, SHAPES)
    b = codec.decode(ShapedCopier(_miner(codec, ctx, 8)).forge(3, [(wire, original)]), ctx, SHAPES)
    c = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(4, [(wire, original)]), ctx, SHAPES)
    again = codec.decode(ShapedCopier(_miner(codec, ctx, 7)).forge(3, [(wire, original)]), ctx, SHAPES)
    assert similarity(a, again) == pytest.approx(1.0)
    for other in (b, c):  # both hold the source (cosine 0.7 each): 0.5 between them, not a copy
        assert similarity(a, other) < 0.7 and low_rank_similarity(a, other) < 0.7


def test_the_rotating_copier_takes_a_different_paid_source_each_window() -> None:
    from bistro.localnet.personas import RotatingCopier

    copier = RotatingCopier(SimpleNamespace(uid=9))
    commitments = {1: "a", 2: "b", 3: "c", 4: "d", 9: "own", 5: "unpaid"}
    paid = {1: 0.3, 2: 0.3, 3: 0.2, 4: 0.2}
    firsts = [copier.ranked(w, commitments.items(), lambda u: paid.get(u, 0.0))[0][0] for w in range(8)]
    assert firsts == [1, 2, 3, 4, 1, 2, 3, 4]
    order = [uid for uid, _ in copier.ranked(1, commitments.items(), lambda u: paid.get(u, 0.0))]
    assert order[:4] == [2, 3, 4, 1] and set(order[4:]) == {5, 9}  # the paid first: _steal stops at unpaid


def test_the_shaped_finetune_starts_from_a_shaped_copy_and_trains_a_fifth_of_a_window() -> None:
    """Its copied part is the shaped copier's (cosine 0.7 to the source, decoded), then it trains a
    fifth of a window's steps on its own pages (`CopyFinetune.forge`)."""
    from bistro.delta.codec import densify
    from bistro.localnet.personas import ShapedCopier, ShapedFinetune

    _, codec, ctx, wire, original = _source("lowrank")
    finetune = ShapedFinetune(_miner(codec, ctx))
    copied = finetune.copied(3, [(wire, original)])
    shaped = densify(
        codec.decode(ShapedCopier(_miner(codec, ctx)).forge(3, [(wire, original)]), ctx, SHAPES), SHAPES
    )
    assert all(torch.equal(copied[n], shaped[n]) for n in SHAPES)
    source = densify(original, SHAPES)
    flat = (
        torch.cat([copied[n].reshape(-1) for n in SHAPES]),
        torch.cat([source[n].reshape(-1) for n in SHAPES]),
    )
    assert 0.5 < float(torch.nn.functional.cosine_similarity(*flat, dim=0)) < 0.85
    assert finetune.fraction == 0.2


# --- the own-page test against shaped copies, on real training ---------------------------------------


def shaped_separation(windows: int, overrides: dict | None = None, unsampled: tuple[int, ...] = ()) -> dict:
    """Four honest miners train for real (bench's SimMiner: the miner's own training, compression and
    signing); beside them the four shaped personas' deltas, forged by the personas' own code: a
    0.7 copy of uid 0 (uid 4), a 0.5 copy of uid 1 (uid 5), a 0.7 copy of uid `w mod 4` (uid 6) and
    a 0.7 copy of uid 2 plus a fifth of a window's training on its own pages (uid 7). The validator's
    steps: the copy screen, then the scores. Returns per kind the windows' `score` (against the
    random control pages and the close uids' pages), `control_score` (random control pages alone),
    `close_to`, copy verdicts and the seconds `Evaluator.score` took.

    `unsampled` uids are left out of the scored sample, as a validator that samples leaves them:
    only their slices are read (`bistro.delta.slices`, from the signed blobs); `alone_close_to`
    records each scored uid's close uids had no slice been read."""
    import hashlib

    from safetensors.torch import load as load_safetensors

    from bistro.bench.common import SimMiner, clone, keypair
    from bistro.bench.mechanism import decode_all
    from bistro.data import Dataset
    from bistro.data.pages import local_pages
    from bistro.delta.wire import encode_delta
    from bistro.evaluator import Evaluator
    from bistro.localnet.personas import PERSONAS
    from bistro.master import apply_update
    from bistro.model import build_model, model_hash

    s = build_settings("tiny", overrides={"train.threads": 1, **(overrides or {})})
    dataset = Dataset.open(s)
    evaluator = Evaluator(s, build_model(s.model, seed=s.model.seed).eval(), dataset)
    master = clone(evaluator.params)
    honest = [SimMiner(s, dataset, uid) for uid in range(4)]
    finetuner = SimMiner(s, dataset, 7)
    codec = CODECS[s.mechanism.codec]
    kinds = {4: "shaped_copier", 5: "shaped_copier_05", 6: "rotating_copier", 7: "shaped_finetune"}
    out: dict = {k: {"score": [], "control_score": [], "close_to": [], "verdict": [], "alone_close_to": []}
                 for k in ["honest", *kinds.values()]}  # fmt: skip

    def sign(uid: int, window: int, wire: dict, digest: str) -> tuple[str, bytes]:
        ctx = codec_context(s, window)
        blob = encode_delta(wire, keypair=keypair(uid), netuid=s.chain.netuid, uid=uid, window=window,
                            codec=codec.name, codec_params=codec.params(ctx), master_window=window,
                            master_hash=digest)  # fmt: skip
        return keypair(uid).ss58_address, blob

    for w in range(windows):
        digest = model_hash(master)
        block_hash = hashlib.sha256(f"test-seed-block-{w}".encode()).hexdigest()
        blobs = {m.uid: (m.keypair.ss58_address, m.produce(w, master, digest)) for m in honest}
        decoded = decode_all(s, evaluator.shapes, w, digest, dict(blobs))
        for uid, source in ((4, 0), (5, 1), (6, w % 4), (7, 2)):
            ctx = codec_context(s, w)
            miner = SimpleNamespace(
                uid=uid, codec=codec, shapes=evaluator.shapes, ctx=partial(codec_context, s)
            )
            miner.encode = lambda window, tensors: tensors
            stolen = [(dict(load_safetensors(blobs[source][1])), decoded[source].delta)]
            wire = PERSONAS[kinds[uid]](miner).forge(w, stolen) if uid != 7 else None
            if uid == 7:  # shaped_finetune: its shaped copy, then a fifth of a window's steps
                copied = PERSONAS["shaped_finetune"](miner).copied(w, stolen)
                with torch.no_grad():
                    for name, p in finetuner.params.items():
                        p.copy_(master[name] + copied[name])
                pages = local_pages(s.chain.netuid, uid, w, dataset.page_settings)
                finetuner.trainer.train(dataset.sequences(pages), max(1, s.train.steps_per_window // 5))
                with torch.no_grad():
                    delta = {name: p.detach() - master[name] for name, p in finetuner.params.items()}
                wire = compress(delta, codec, ctx, None)
            blobs[uid] = sign(uid, w, wire, digest)
        verdicts = decode_all(s, evaluator.shapes, w, digest, blobs)
        if unsampled:
            from bistro.delta.slices import decode_slice, plan_slice, read_slice

            ctx = codec_context(s, w)
            spec = codec.wire_spec(evaluator.shapes, ctx)
            plan = plan_slice(s.chain.netuid, w, block_hash, spec, s.mechanism.slice_fraction)
            read = {u: read_slice(lambda a, n, b=blobs[u][1]: b[a : a + n], plan, spec) for u in unsampled}
            slices = {
                u: decode_slice(r, plan, spec, codec.name, ctx, evaluator.shapes) for u, r in read.items()
            }
            verdicts = {u: v for u, v in verdicts.items() if u not in unsampled}
            valid = sorted(u for u, v in verdicts.items() if v.verdict == "ok")
            alone = evaluator.close_controls(valid, w, verdicts)
            evaluator.slices = (w, slices)
        evaluator.drop_copies(verdicts, w, block_hash, master)
        base, global_seqs = evaluator.score(w, block_hash, master, verdicts, {})
        for uid, v in verdicts.items():
            kind = out[kinds.get(uid, "honest")]
            kind["score"].append(v.score)
            kind["control_score"].append(v.control_score)
            kind["close_to"].append(list(v.close_to))
            if unsampled:
                kind["alone_close_to"].append(alone.get(uid, []))
            kind["verdict"].append(str(v.verdict))
        update, _ = evaluator.propose_update(master, verdicts, base, global_seqs,
                                             paid=[u for u in range(4) if u in verdicts and verdicts[u].score > 0])  # fmt: skip
        if update is not None:
            apply_update(master, update)
    return out


@pytest.mark.slow
def test_the_close_controls_sink_every_shaped_copy_and_never_touch_an_honest_uid() -> None:
    """Measured on real training (the figures in docs/mechanism.md "Shaped copies"): against its
    source's pages every shaped copy scores below 0 in every window where its source was scored,
    while no honest uid has another honest uid as a close uid, and honest miners
    score above 0. The symmetric side: a copy's source has the copy as its close uid, and the
    copier's pages are just other pages to it; honest deltas are never close to each other."""
    got = shaped_separation(windows=3)
    print({k: {f: v[f] for f in ("score", "control_score", "close_to")} if isinstance(v, dict) else v
           for k, v in got.items()})  # fmt: skip
    honest = got["honest"]
    assert all(u >= 4 for c in honest["close_to"] for u in c), honest["close_to"]
    assert sum(x > 0 for x in honest["score"]) >= len(honest["score"]) - 1, honest["score"]
    assert "copy" not in honest["verdict"]
    for kind in ("shaped_copier", "shaped_copier_05", "rotating_copier", "shaped_finetune"):
        k = got[kind]
        assert all(c for c in k["close_to"]), (kind, k["close_to"])  # its source is a close uid
        assert all(x < 0 for x in k["score"]), (kind, k["score"])
        assert max(k["score"]) < min(honest["score"]), (kind, k["score"], honest["score"])


@pytest.mark.slow
def test_a_copy_of_an_unsampled_uid_meets_its_sources_pages_through_the_slice() -> None:
    """Under a scored sample the source is usually not drawn with its copier. Sources 0 and 1 left
    out of the sample (only their slices read): the copies of them (uids 4 and 5) still get their
    source as a close uid and score below 0 every window, which without the slice they could not
    (no close uid at all: the random control pages alone); honest uids stay above 0."""
    got = shaped_separation(windows=2, unsampled=(0, 1))
    print({k: {f: v[f] for f in ("score", "close_to", "alone_close_to")} if isinstance(v, dict) else v
           for k, v in got.items()})  # fmt: skip
    for kind, source in (("shaped_copier", 0), ("shaped_copier_05", 1)):
        k = got[kind]
        assert all(source in c for c in k["close_to"]), (kind, k["close_to"])
        assert all(source not in c for c in k["alone_close_to"]), (kind, k["alone_close_to"])
        assert all(x < 0 for x in k["score"]), (kind, k["score"])
    honest = got["honest"]
    assert all(x > 0 for x in honest["score"]), honest["score"]
    assert all(u >= 4 for c in honest["close_to"] for u in c), honest["close_to"]
