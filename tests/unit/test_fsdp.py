"""FSDP2 miner on 2 CPU ranks (gloo): its delta matches one process training the same sequences,
and its wire is exactly what one process's codec makes of that delta (top-k over whole tensors),
window after window with error feedback and the sharded optimizer kept. (A localnet with an FSDP
miner: tests/integration/test_fsdp_localnet.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bistro.config import build_settings
from bistro.delta import CODECS, ErrorFeedback, compress
from bistro.delta.codec import codec_context
from bistro.distributed import Shards, aligned, shard_rows
from bistro.model import build_model, state_tensors
from bistro.training import Trainer

WORLD, STEPS, WINDOWS = 2, 3, 2
DELTA_RTOL = 5e-3
"""max |Δ_fsdp − Δ_single| / max |Δ_single| per tensor: float sums in another order, through AdamW
(measured 2.4e-3 on the token embedding, whose rare rows AdamW normalises from tiny gradients)."""


def _settings(fsdp: bool, batch: int, preset: str = "tiny"):
    return build_settings(preset, overrides={"train.fsdp": fsdp, "train.batch_size": batch, "train.threads": 1,
                                             "mechanism.compression": 30.0})  # fmt: skip


def _sequences(settings) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, settings.model.vocab_size, (4 * 4, settings.model.sequence_length), generator=g)


class FixedData:
    """The same sequences every window: a stand-in page source so both runs see identical tokens."""

    page_settings = None

    def __init__(self, seqs: torch.Tensor) -> None:
        self.seqs = seqs


def _rank(rank: int, out: str, init: str, preset: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        settings = _settings(True, 4, preset)
        model = build_model(settings.model)
        master = {k: v.detach().clone() for k, v in state_tensors(model).items()}
        trainer = Trainer(model, settings.train)
        assert trainer.fsdp
        shards = Shards(settings, model, trainer, None, ErrorFeedback())
        seqs = _sequences(settings)
        codec = CODECS["topk"]
        for window in range(WINDOWS):
            shards.load(master if rank == 0 else None)
            trainer.train(seqs, STEPS)
            full = {n: p.data.full_tensor() for n, p in model.named_parameters()}  # for the test only
            wire = shards.encode(codec, codec_context(settings, window), master if rank == 0 else None)
            if rank == 0:
                delta = {n: full[n] - master[n] for n in master}
                save_file({**{f"delta.{k}": v for k, v in delta.items()}, **{f"wire.{k}": v for k, v in wire.items()}},
                          os.path.join(out, f"w{window}.safetensors"))  # fmt: skip
                master = {
                    n: full[n].clone() for n in master
                }  # the next window starts from the trained weights
    finally:
        dist.destroy_process_group()


def test_shard_layout() -> None:
    assert shard_rows(5, 2) == [(0, 3), (3, 5)] and shard_rows(1, 2) == [(0, 1), (1, 1)]
    assert aligned((4096, 128), 2, 4096) and not aligned((128,), 2, 4096) and not aligned((100, 100), 2, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fsdp_delta_and_wire_match_one_process(tmp_path: Path, preset: str) -> None:
    """2 gloo ranks on `tiny` and on `small` (10M parameters, 7 layers, sequences of
    256: the preset a CPU localnet runs FSDP miners on)."""
    mp.start_processes(
        _rank, args=(str(tmp_path), f"file://{tmp_path / 'rdzv'}", preset), nprocs=WORLD, start_method="spawn"
    )
    # One process, batch WORLD*4: each step sees the union of the ranks' batches.
    settings = _settings(False, WORLD * 4, preset)
    model = build_model(settings.model)
    params = state_tensors(model)
    trainer = Trainer(model, settings.train)
    seqs = _sequences(settings)
    codec, ef_same, ef_single = CODECS["topk"], ErrorFeedback(), ErrorFeedback()
    for window in range(WINDOWS):
        got = load_file(str(tmp_path / f"w{window}.safetensors"))
        master = {n: p.detach().clone() for n, p in params.items()}
        trainer.train(seqs, STEPS)
        ctx = codec_context(settings, window)
        fsdp_delta = {n[6:]: t for n, t in got.items() if n.startswith("delta.")}
        fsdp_wire = {n[5:]: t for n, t in got.items() if n.startswith("wire.")}
        single = {n: p.detach() - master[n] for n, p in params.items()}
        for name, d in single.items():
            err = float((fsdp_delta[name] - d).abs().max()) / max(float(d.abs().max()), 1e-12)
            assert err <= DELTA_RTOL, (window, name, err)
        # Encoded shard by shard, joined on rank 0: bit for bit what one process's codec makes of it.
        same = compress(fsdp_delta, codec, ctx, ef_same)
        assert (
            set(same) == set(fsdp_wire)
            and codec.check(fsdp_wire, ctx, {n: tuple(t.shape) for n, t in single.items()}) is None
        )
        for key in same:
            assert torch.equal(same[key], fsdp_wire[key]), (window, key)
        # Against the one-process run's own wire: the same chunks chosen, almost everywhere.
        ref = codec.decode(
            compress(single, codec, ctx, ef_single), ctx, {n: tuple(t.shape) for n, t in single.items()}
        )
        dec = codec.decode(fsdp_wire, ctx, {n: tuple(t.shape) for n, t in single.items()})
        agree = sum(len(set(ref[n].indices.tolist()) & set(dec[n].indices.tolist())) for n in ref)
        assert agree / sum(len(ref[n].indices) for n in ref) > 0.97
        with torch.no_grad():  # both continue from the FSDP run's weights, as the test's master does
            for n, p in params.items():
                p.copy_(master[n] + fsdp_delta[n])


def test_localnet_runs_miners_under_torchrun(tmp_path: Path) -> None:
    import argparse

    from bistro.localnet.network import LocalNet, Member

    args = argparse.Namespace(miners=1, validators=1, windows=1, personas="", block_time=1.0, json=False,
                              config=None, nproc_per_miner=2)  # fmt: skip
    net = LocalNet(build_settings("tiny", overrides={"train.fsdp": True, "dir": str(tmp_path)}), args)
    miner = Member("miner-0", "miner", "honest", bucket="bistro-0123456789abcdef")
    cmd = net.command(miner)
    assert Path(cmd[0]).name == "torchrun" and cmd[1:6] == [
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bistro.cli",
    ]
    assert cmd[cmd.index("--train.fsdp") + 1] == "true" and "miner" in cmd
    validator = net.command(Member("validator-0", "validator", "validator", bucket="bistro-0123456789abcdef"))
    assert validator[0] != cmd[0] and "--train.fsdp" not in validator
