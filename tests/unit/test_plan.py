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
from bistro.master import master_format
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
        verdicts[uid] = Verdict.holding(uid, codec.decode(wire, ctx, shapes))
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


@pytest.mark.parametrize(("preset", "uids"), [("tiny", 8), pytest.param("small", 3, marks=pytest.mark.slow)])
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


# --- time, bandwidth and the design knobs (`--hardware`) -------------------------------------------

NEW_KEYS = {
    "validator": (
        "seconds_per_window",
        "peak_bytes_per_gpu",
        "download_per_window_bytes",
        "scored_uids_per_window",
    ),
    "miner": ("seconds_per_window", "peak_bytes_per_gpu", "download_per_window_bytes", "train_fraction"),
    "publisher": ("upload_per_window_bytes", "disk_per_1000_windows_bytes"),
}


def _timed(
    preset: str, uids: int = 256, hardware: str = "8xH100", flags: dict | None = None, **knobs
) -> dict:
    from bistro.plan import design_from

    return make_plan(build_settings(preset, None, flags or {}), uids=uids, hardware=hardware, link_gbit=1.0,
                     design=design_from(knobs))  # fmt: skip


def test_time_plan_keeps_todays_fields_and_adds_the_named_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--preset", "7B", "--uids", "256", "--hardware", "8xH100", "--link-gbit", "1",
                     "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc["window_seconds"], float) and doc["window_seconds"] == 1200.0
    for role, keys in NEW_KEYS.items():
        for key in keys:
            value = doc[role][key]
            assert isinstance(value, int | float) and math.isfinite(value) and value >= 0, (role, key, value)
    for key in ("peak_bytes_per_rank", "bytes_per_param", "items", "delta_wire_bytes"):  # today's
        assert key in doc["validator"] and key in doc["miner"]
    # the 7B preset's sample (`SCORED_PER_WINDOW`) reaches every uid within 10 windows
    assert doc["validator"]["scored_uids_per_window"] == 32 and 256 / 32 <= 10
    for role in ("validator", "miner"):
        assert set(doc["breakdown"][role]) and all(v >= 0 for v in doc["breakdown"][role].values())
    assert {"validator", "miner", "critical_path"} <= set(doc["fits"])
    assert {"pages", "tokens", "tokens_per_page"} <= set(doc["validator"]["forward"])
    # followers download one re-compressed update (`mechanism.master_codec same`): one delta's wire
    shapes = model_shapes(build_settings("7B").model)
    master = master_format(build_settings("7B")).wire_bytes(shapes)
    assert doc["miner"]["download_per_window_bytes"] == master <= 5 * 2**30
    # The table prints too, and the design flags reach the plan.
    assert cli_main(["plan", "--preset", "7B", "--hardware", "8xH100", "--design", "new",
                     "--plan.set", "scored_uids=40", "--schedule", "serial"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "40 / 7 windows" in out and "schedule serial" in out


@pytest.mark.parametrize("preset", ["1B", "7B"])
def test_1b_and_7b_fit_their_window_on_8xh100_at_256_uids(
    capsys: pytest.CaptureFixture[str], preset: str
) -> None:
    """The code as it is, planned at a subnet's size: the validator's path (fetch, score, publish)
    and then the miner's (sync, train, upload) fit the window, every GPU holds at most 80e9 bytes, a
    miner downloads at most 5 GiB to follow the master, training fills at least 80% of the window,
    and every uid is scored within 10 windows. A change that breaks one of these fails here."""
    assert cli_main(["plan", "--preset", preset, "--uids", "256", "--hardware", "8xH100", "--link-gbit", "1",
                     "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    window = doc["window_seconds"]
    assert doc["schedule"] == "serial"
    assert doc["validator"]["seconds_per_window"] + doc["miner"]["seconds_per_window"] <= window
    assert doc["fits"]["critical_path"] and doc["fits"]["validator"] and doc["fits"]["miner"]
    assert max(doc["validator"]["peak_bytes_per_gpu"], doc["miner"]["peak_bytes_per_gpu"]) <= 80e9
    assert doc["miner"]["download_per_window_bytes"] <= 5 * 2**30
    assert doc["miner"]["train_fraction"] >= 0.8
    assert 256 / doc["validator"]["scored_uids_per_window"] <= 10
    # at one GPU and one host thread the same code does not: the plan tells them apart
    assert cli_main(["plan", "--preset", preset, "--uids", "256", "--hardware", "8xH100", "--link-gbit", "1",
                     "--plan.set", "validator_gpus=1", "--plan.set", "host_threads=1", "--json"]) == 0  # fmt: skip
    assert not json.loads(capsys.readouterr().out)["fits"]["critical_path"]


def test_time_plan_grows_with_uids() -> None:
    every = {"mechanism.max_uids_per_window": 256}  # every uid scored, not the preset's sample of 32
    small, large = _timed("150M", uids=64, flags=every), _timed("150M", uids=128, flags=every)
    for key in ("seconds_per_window", "download_per_window_bytes"):
        assert large["validator"][key] > small["validator"][key], key
    assert large["validator"]["breakdown_s"]["forward"] > small["validator"]["breakdown_s"]["forward"]
    cpu_small, cpu_large = _timed("tiny", uids=8, hardware="cpu"), _timed("tiny", uids=16, hardware="cpu")
    assert cpu_large["validator"]["seconds_per_window"] > cpu_small["validator"]["seconds_per_window"]


def test_pipelined_trains_at_least_as_much_as_serial() -> None:
    for preset in ("1B", "7B"):
        serial = _timed(preset, **{**NEW, "schedule": "serial"})
        pipelined = _timed(preset, **{**NEW, "schedule": "pipelined"})
        assert pipelined["miner"]["train_fraction"] >= serial["miner"]["train_fraction"]
        assert pipelined["miner"]["steps_that_fit"] > serial["miner"]["steps_that_fit"]
        fixed_s, fixed_p = _timed(preset, schedule="serial"), _timed(preset, schedule="pipelined")
        assert fixed_p["miner"]["train_fraction"] >= fixed_s["miner"]["train_fraction"]
        assert fixed_s["fits"]["critical_path_seconds"] >= fixed_p["fits"]["critical_path_seconds"]


NEW = {"scored_uids": 32, "decode_on_device": True, "weight_sum": True, "master_on_host": True,
       "factored_lowrank": True, "follower_update": "recompressed", "fetch_concurrency": 8,
       "checkpoint_every": 50, "checkpoint_async": True, "hash_threads": 8, "validator_gpus": 0,
       "host_threads": 8, "steps_per_window": -1, "miner_checkpointing": True}  # fmt: skip


def test_7b_numbers_follow_the_protocol_knobs() -> None:
    a, b = _timed("7B", scored_uids=32), _timed("7B", scored_uids=64)
    assert a["validator"]["scored_uids_per_window"] == 32 and b["validator"]["scored_uids_per_window"] == 64
    assert b["validator"]["seconds_per_window"] > a["validator"]["seconds_per_window"]
    # the sample's deltas whole, and a slice of every other upload (`bistro.delta.slices`)
    whole = {k: p["validator"]["download_per_window_bytes"] - p["validator"]["slice_download_per_window_bytes"]
             for k, p in (("a", a), ("b", b))}  # fmt: skip
    assert whole["b"] == 2 * whole["a"]
    wire = a["validator"]["delta_wire_bytes"]
    sliced = a["validator"]["slice_download_per_window_bytes"]
    assert 224 * wire / 40 < sliced < 224 * wire / 25  # 224 unsampled uploads, about 1/32 of each
    assert b["validator"]["slice_download_per_window_bytes"] < sliced  # fewer left out of a larger sample
    assert a["validator"]["rotation_windows"] == 8
    # What a follower downloads: the union of the merged deltas today, one delta re-compressed, or a
    # bounded merge set.
    union = _timed("7B", scored_uids=64, follower_update="union")["miner"]["download_per_window_bytes"]
    recompressed = _timed("7B", scored_uids=64, follower_update="recompressed")["miner"]
    merge_set = _timed("7B", scored_uids=64, follower_update="merge_set", merge_peers=20)["miner"]
    # one re-compressed update: a miner's wire with the update's own factors and a sparse part 4x a
    # miner's (`mechanism.master_rank`, `master_compression`)
    assert recompressed["upload_per_window_bytes"] < recompressed["download_per_window_bytes"] < union
    assert recompressed["download_per_window_bytes"] < 4 * recompressed["upload_per_window_bytes"]
    assert merge_set["download_per_window_bytes"] == 20 * recompressed["upload_per_window_bytes"]
    # Each memory knob moves the bytes it names.
    base = _timed("7B", scored_uids=32)
    on_host = _timed("7B", scored_uids=32, master_on_host=True)
    assert (
        base["validator"]["peak_bytes_per_gpu"] - on_host["validator"]["peak_bytes_per_gpu"]
        == 4 * base["parameters"]
    )
    summed = _timed("7B", scored_uids=32, weight_sum=True)
    assert summed["validator"]["peak_host_bytes"] < base["validator"]["peak_host_bytes"]
    # Decoding on the device, once, takes the host's per-uid work away.
    dev = _timed("7B", scored_uids=32, decode_on_device=True, weight_sum=True)
    assert (
        dev["validator"]["breakdown_s"]["decode_merge"]
        < base["validator"]["breakdown_s"]["decode_merge"] / 10
    )
    # Checkpoint cadence sets the publisher's disk.
    rare = _timed("7B", checkpoint_every=100)["publisher"]["disk_per_1000_windows_bytes"]
    assert rare < _timed("7B", checkpoint_every=10)["publisher"]["disk_per_1000_windows_bytes"]


def test_design_rejects_unknown_knobs() -> None:
    from bistro.plan import design_from

    with pytest.raises(ValueError, match="unknown"):
        design_from({"no_such_knob": 1})
    with pytest.raises(ValueError, match="schedule"):
        design_from({"schedule": "sometimes"})
    assert design_from({"scored_uids": "12", "weight_sum": "true"}).scored_uids == 12


@pytest.mark.slow
def test_bench_scale_quick_reports_a_ratio() -> None:
    """The suite's path, scaled down (fit on tiny with 4 uids, check on a 4-uid tiny window): the
    ratio is a positive finite number. Its size is a timing, reported by the full suite, not tested."""
    from bistro.bench.scale import run

    result = run(build_settings("tiny"), quick=True)
    for key in ("plan_vs_measured", "miner_plan_vs_measured"):
        assert math.isfinite(result[key]) and result[key] > 0, result[key]
    assert result["check"]["measured_s"] > 0 and result["check"]["predicted_s"] > 0
    rates = result["rates"]
    assert all(
        rates[k] > 0
        for k in ("decode_ns", "sketch_ns", "merge_sums_ns", "share_term_ns", "abs_sum_ns", "leave_one_out_ns",
                  "theta_eval_ns", "hash_ns_per_byte")
    )  # fmt: skip
    assert set(result["large_matrix"]) <= set(rates) and all(v > 0 for v in result["large_matrix"].values())
