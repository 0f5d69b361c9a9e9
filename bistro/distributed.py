"""`torchrun --nproc_per_node N bistro miner …`: one miner, data parallel over N processes.

Rank 0 is the whole miner (chain, buckets, master, codec, upload). Before each window's training it
broadcasts the window, its uid and θ_w; every other rank loads θ_w, takes the same local pages and
trains the same number of steps (the Trainer gives each rank its shard of every batch and averages
the gradients), so all ranks end the window with identical weights. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

from .config import Settings, replace
from .data import Dataset
from .data.pages import local_pages
from .miner import Miner, _install_signals
from .model import build_model, state_tensors
from .node import NotRegistered
from .training import Trainer

log = logging.getLogger("bistro.distributed")

STOP, GO = 0, 1


def _broadcast_header(values: list[int] | None) -> list[int]:
    header = torch.tensor(values if values is not None else [0, 0, 0, 0], dtype=torch.int64)
    dist.broadcast(header, src=0)
    return [int(x) for x in header]


def _broadcast_params(params: dict[str, torch.Tensor], device: torch.device) -> None:
    for name in sorted(params):
        t = params[name].detach()
        buf = t if t.device == device or device.type == "cpu" else t.to(device)
        dist.broadcast(buf.data, src=0)
        if buf is not t:
            t.copy_(buf)


class RankZeroMiner(Miner):
    """The real miner, telling the other ranks what to train before it trains."""

    def train(self, window: int, steps: int | None = None):
        steps = self.steps_that_fit(window) if steps is None else steps
        _broadcast_header([GO, window, self.uid, steps])
        _broadcast_params(self.master, self.device)
        return super().train(window, steps)

    def stop_ranks(self) -> None:
        _broadcast_header([STOP, 0, 0, 0])


def follow(settings: Settings) -> None:
    """Ranks 1..N-1: train whatever rank 0 says, until it says stop."""
    device = torch.device(settings.device)
    dataset = Dataset.open(settings)
    model = build_model(settings.model, seed=settings.model.seed).to(device)
    params = state_tensors(model)
    trainer = Trainer(model, settings.train, settings.device)
    while True:
        go, window, uid, steps = _broadcast_header(None)
        if go == STOP:
            return
        with torch.no_grad():
            _broadcast_params(params, device)
        pages = local_pages(settings.chain.netuid, uid, window, dataset.page_settings)
        trainer.train(dataset.sequences(pages), steps)


def run_distributed(settings: Settings, args: argparse.Namespace) -> int:
    cuda = settings.device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        settings = replace(settings, device=f"cuda:{local}")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if settings.persona != "honest":
        log.error("torchrun runs honest miners only")
        return 2
    try:
        if rank != 0:
            follow(settings)
            return 0
        try:
            miner = RankZeroMiner(settings)
        except NotRegistered as e:
            log.error("%s", e)
            _broadcast_header([STOP, 0, 0, 0])
            return 1
        _install_signals(miner.stopping)
        log.info("miner uid %d on %d processes (%s)", miner.uid, world, dist.get_backend())
        try:
            miner.run(args.windows)
        finally:
            miner.stop_ranks()
        return 0
    finally:
        dist.destroy_process_group()
