"""The miner's Trainer: loss falls, warm-up, state survives a restart, data parallel ranks agree."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bistro.config import build_settings, replace
from bistro.data import Dataset
from bistro.model import build_model, evaluate, model_hash, state_tensors
from bistro.training import Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # two torch threads on two cores shared with other test processes slow to a crawl
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "bistro-data-cache"  # shared with the data tests
    return build_settings("tiny", overrides={"data.cache_dir": str(cache)})


@pytest.fixture(scope="module")
def sequences(settings):
    return Dataset.open(settings).sequences([10, 11])


def test_loss_falls_on_a_few_pages(settings, sequences):
    model = build_model(settings.model)
    before = evaluate(model, sequences, 32)
    trainer = Trainer(model, settings.train, "cpu")
    seen = []
    first = trainer.train(sequences, 12, on_step=lambda step, loss: seen.append((step, loss)))
    second = trainer.train(sequences, 12)
    after = evaluate(model, sequences, 32)
    assert [s for s, _ in seen] == list(range(1, 13)) and trainer.step_count == 24
    assert first.loss == pytest.approx(sum(x for _, x in seen) / 12, rel=1e-5)
    assert second.loss < first.loss and after < before - 1.0
    assert first.tokens == 12 * 8 * 128 and first.tokens_per_s > 0 and len(first.step_seconds) == 12


def test_warmup_counts_every_step_the_trainer_takes(settings):
    cfg = replace(settings, **{"train.warmup_steps": 4, "train.lr": 1e-3}).train
    trainer = Trainer(build_model(settings.model), cfg)
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    seqs = torch.randint(0, 4096, (4, 16))
    trainer.train(seqs, 3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-4)
    trainer.train(seqs, 3)  # the next window continues the warm-up, it does not restart it
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_resumed_trainer_repeats_its_losses(settings, sequences, tmp_path):
    cfg = replace(settings, **{"train.warmup_steps": 4}).train
    seqs = sequences[:24]
    straight = Trainer(build_model(settings.model), cfg)
    straight.train(seqs, 5)
    want = [straight.train(seqs[i:], 1).loss for i in range(3)]

    first = Trainer(build_model(settings.model), cfg)
    first.train(seqs, 5)
    first.save(tmp_path / "opt.safetensors")
    save_file(state_tensors(first.model), str(tmp_path / "model.safetensors"))
    resumed_model = build_model(settings.model, seed=99)
    resumed_model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    resumed = Trainer(resumed_model, cfg)
    resumed.load(tmp_path / "opt.safetensors")
    assert resumed.step_count == 5
    assert [resumed.train(seqs[i:], 1).loss for i in range(3)] == want
    assert model_hash(resumed.model) == model_hash(straight.model)

    with pytest.raises(ValueError, match="different model"):
        other = replace(settings, **{"model.num_layers": 2}).model
        Trainer(build_model(other), cfg).load(tmp_path / "opt.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        s = build_settings(
            "tiny", overrides={"model.num_layers": 2, "train.batch_size": 2, "train.warmup_steps": 2}
        )
        seqs = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
        trainer = Trainer(build_model(s.model), s.train)
        stats = [trainer.train(seqs, 8).loss for _ in range(2)]
        save_file(state_tensors(trainer.model), f"{out}/rank{rank}.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(stats, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_take_identical_steps(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert model_hash(states[0]) == model_hash(states[1])
    assert losses[0] == losses[1] and losses[0][1] < losses[0][0]
    # the same as one process training on both ranks' batches at once
    s = build_settings(
        "tiny", overrides={"model.num_layers": 2, "train.batch_size": 4, "train.warmup_steps": 2}
    )
    seqs = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    single = Trainer(build_model(s.model), s.train)
    single.train(seqs, 8)
    single.train(seqs, 8)
    # (Adam turns float rounding in near-zero gradients into visible but rare differences)
    diffs = torch.cat(
        [(states[0][n] - v.detach()).abs().flatten() for n, v in state_tensors(single.model).items()]
    )
    assert diffs.max() < 1e-4 and diffs.mean() < 1e-7, (diffs.max(), diffs.mean())
