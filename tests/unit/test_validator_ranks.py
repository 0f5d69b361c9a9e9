"""A validator's forward passes split over ranks (`torchrun … bistro validator`, gloo on CPU): the
scores, θ_eval and the master's update are one process's, bit for bit."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bistro.config import build_settings
from bistro.data import Dataset
from bistro.delta import CODECS
from bistro.delta.codec import codec_context
from bistro.evaluator import Evaluator, Verdict
from bistro.manifest import delta_sha256
from bistro.model import build_model, model_hash, state_tensors

BLOCK_HASH = "ab" * 32
FIELDS = ("score", "control_score", "with_local", "without_local", "with_other", "without_other",
          "base_local", "base_other", "with_global", "close_to")  # fmt: skip


def settings():
    return build_settings("tiny", overrides={"train.threads": 1, "mechanism.host_threads": 2})


def world():
    """An evaluator at the initial master and five lowrank deltas, the last a copy of the first
    scaled a little (so it has a close uid whose pages its test reads too)."""
    s = settings()
    model = build_model(s.model, seed=s.model.seed)
    master = {k: v.detach().clone() for k, v in state_tensors(model).items()}
    evaluator = Evaluator(s, model, Dataset.open(s))
    codec, ctx = CODECS[s.mechanism.codec], codec_context(s, 3)
    g = torch.Generator().manual_seed(11)
    dense = [{k: torch.randn(v.shape, generator=g) * 3e-3 for k, v in master.items()} for _ in range(4)]
    dense.append({k: v * 1.02 for k, v in dense[0].items()})
    deltas = [codec.decode(codec.encode(d, ctx), ctx, evaluator.shapes) for d in dense]
    return evaluator, master, deltas


def window(evaluator: Evaluator, master, deltas) -> dict:
    verdicts = {uid: Verdict.holding(uid, d) for uid, d in enumerate(deltas, start=1)}
    incentive = {uid: 0.2 for uid in verdicts}
    base, seqs = evaluator.score(3, BLOCK_HASH, master, verdicts, incentive)
    theta_eval = model_hash(evaluator.params)
    for v in verdicts.values():
        v.score = abs(v.score) + 1.0  # every delta merged
    update, _ = evaluator.propose_update(master, verdicts, float("inf"), seqs)
    return {"base": base, "theta_eval": theta_eval, "update": delta_sha256(update),
            "verdicts": {uid: [getattr(v, f) for f in FIELDS] for uid, v in verdicts.items()}}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, out: str) -> None:
    from bistro.distributed import ScoringGroup, serve_passes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        if rank != 0:
            serve_passes(settings())
            return
        group = ScoringGroup()
        evaluator, master, deltas = world()
        evaluator.group = group
        try:
            result = window(evaluator, master, deltas)
        finally:
            group.stop()
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_passes_split_over_ranks_give_one_processes_scores_and_master(tmp_path) -> None:
    """Two ranks, five uids dealt in turn: rank 0 runs three uids' passes, rank 1 two."""
    out = tmp_path / "rank0.json"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    split = json.loads(out.read_text())
    torch.set_num_threads(1)
    one = json.loads(json.dumps(window(*world())))  # through JSON as the ranks' result went
    assert split == one
    assert any(v[-1] for v in one["verdicts"].values())  # a close uid's pages were read too
    assert len({tuple(v[:2]) for v in one["verdicts"].values()}) == 5
