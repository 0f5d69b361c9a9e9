"""`bistro plan`: its memory figures against torch's own count of the bytes the real code allocates
(miner: Trainer + compress with error feedback, two windows; validator: Evaluator.score and the
master step over real decoded deltas), on `tiny` and `small`, within FACTOR."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bistro.cli import main as cli_main
from bistro.config import build_settings
from bistro.data import Dataset
from bistro.delta import CODECS, ErrorFeedback, compress
from bistro.delta.codec import codec_context
from bistro.evaluator import Evaluator, Verdict
from bistro.model import build_model, state_tensors
from bistro.plan import make_plan, measure_peak, model_shapes, wire_bytes
from bistro.training import Trainer

FACTOR = 1.35
"""The plan is within this factor of the measured peak, either way."""


def _miner(settings) -> None:
    """What `Miner.train` + `Miner.honest` allocate, for two windows (the second with a residual)."""
    model = build_model(settings.model)
    params = state_tensors(model)
    master = {k: v.detach().clone() for k, v in params.items()}
    trainer = Trainer(model, settings.train)
    ef = ErrorFeedback()
    codec = CODECS[settings.mechanism.codec]
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, settings.model.vocab_size, (2 * settings.train.batch_size, settings.model.sequence_length), generator=g)  # fmt: skip
    for window in range(2):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(master[name])
        trainer.train(seqs, 2)
        with torch.no_grad():
            delta = {name: p.detach() - master[name] for name, p in params.items()}
        compress(delta, codec, codec_context(settings, window), ef)
        del delta


def _validator(settings, uids: int) -> None:
    """Decoded deltas of `uids` miners, scored and merged by the real Evaluator."""
    model = build_model(settings.model)
    params = state_tensors(model)
    master = {k: v.detach().clone() for k, v in params.items()}
    dataset = Dataset.open(settings)
    codec, ctx = CODECS[settings.mechanism.codec], codec_context(settings, 3)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    verdicts = {}
    g = torch.Generator().manual_seed(1)
    for uid in range(uids):
        wire = codec.encode({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}, ctx)
        verdicts[uid] = Verdict(uid, "ok", delta=codec.decode(wire, ctx, shapes))
        del wire
    ev = Evaluator(settings, model, dataset)
    base, seqs = ev.score(3, "ab" * 32, master, verdicts, {u: 1.0 / uids for u in range(uids)})
    for v in verdicts.values():
        v.score = 1.0  # every delta helps: the largest merge
    ev.propose_update(master, verdicts, base, seqs)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_miner_plan_matches_measured_peak(preset: str) -> None:
    settings = build_settings(preset, overrides={"train.threads": 1})
    peak, _ = measure_peak(lambda: _miner(settings))
    planned = make_plan(settings, nproc=1)["miner"]["peak_bytes_per_rank"]
    print(f"{preset}: planned {planned / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB")
    assert 1 / FACTOR <= planned / peak <= FACTOR, (planned, peak)


@pytest.mark.parametrize(("preset", "uids"), [("tiny", 8), ("small", 3)])
def test_validator_plan_matches_measured_peak(preset: str, uids: int) -> None:
    """`small` at 3 uids: every uid costs a forward pass over its pages on one thread (8 took 149 s
    of the suite), and the plan is compared at the same uid count."""
    settings = build_settings(preset, overrides={"train.threads": 1})
    Dataset.open(settings)  # the tokenizer and corpus caches are not what the plan counts
    peak, _ = measure_peak(lambda: _validator(settings, uids))
    plan = make_plan(settings, nproc=1, uids=uids)["validator"]
    # The measured run holds no downloaded blobs (it decodes what it encodes): leave them out.
    blobs = uids * wire_bytes(settings, model_shapes(settings.model))
    planned = plan["peak_bytes_per_rank"] - blobs
    print(f"{preset}: planned {planned / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB")
    assert 1 / FACTOR <= planned / peak <= FACTOR, (planned, peak)


def test_wire_figures_come_from_the_codec() -> None:
    settings = build_settings("tiny")
    plan = make_plan(settings)
    model = build_model(settings.model)
    shapes = {k: tuple(v.shape) for k, v in state_tensors(model).items()}
    assert plan["parameters"] == sum(math.prod(s) for s in shapes.values())
    ctx = codec_context(settings, 0)
    wire = CODECS[settings.mechanism.codec].encode({k: torch.randn(s) for k, s in shapes.items()}, ctx)
    assert plan["delta_wire_bytes"] == sum(t.numel() * t.element_size() for t in wire.values())
    assert plan["validator"]["download_per_window_bytes"] == 256 * plan["delta_wire_bytes"]
    assert plan["miner"]["disk_per_1000_windows_bytes"] == 1000 * plan["delta_wire_bytes"]


def test_fsdp_shards_what_the_miner_holds() -> None:
    one = make_plan(build_settings("1B"), nproc=1)["miner"]
    eight = make_plan(build_settings("1B", overrides={"train.fsdp": True}), nproc=8)["miner"]
    # rank 0 keeps the full master (4 B/param) to follow the publisher; the rest is /8 (the
    # AdamW step's temporaries are not held between steps).
    assert eight["bytes_per_param"] == pytest.approx(4 + (one["bytes_per_param"] - 4) / 8, rel=0.001)
    assert eight["peak_bytes_per_rank"] < 0.65 * one["peak_bytes_per_rank"]


def test_plan_7b_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--preset", "7B"]) == 0
    out = capsys.readouterr().out
    for row in ("bytes per parameter held", "peak memory per rank", "delta on the wire", "256 uids",
                "1,000 windows", "6,738,415,616"):  # fmt: skip
        assert row in out, out
    assert cli_main(["plan", "--preset", "7B", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parameters"] == 6_738_415_616 and doc["miner"]["peak_bytes_per_rank"] > 100 * 2**30
