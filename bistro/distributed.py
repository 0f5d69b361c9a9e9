"""`torchrun --nproc_per_node N bistro miner …`: one miner, data parallel over N processes.

Rank 0 is the whole miner (chain, buckets, master, codec, upload). Before each window's training it
broadcasts the window, its uid and θ_w; every other rank loads θ_w, takes the same local pages and
trains the same number of steps (the Trainer gives each rank its shard of every batch and averages
the gradients), so all ranks end the window with identical weights. gloo on CPU, NCCL on GPU.

With `train.fsdp` the ranks instead hold shards (FSDP2, see `training.py` and `Shards` below):
rank 0 still alone talks to chain and buckets and holds the full master; each rank computes its
shard of the delta and of the error feedback, and rank 0 joins the wire tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import threading
from typing import Any

import torch
import torch.distributed as dist

from .config import Settings, replace
from .data import Dataset
from .data.pages import local_pages
from .delta.codec import (
    CODECS,
    Codec,
    CodecContext,
    Delta,
    ErrorFeedback,
    Factored,
    Mixed,
    Sparse,
    codec_context,
    compress,
    pack12,
    unpack12,
)
from .evaluator import Evaluator, Passes, PassLosses
from .miner import Miner
from .model import build_model, state_tensors
from .node import NotRegistered, install_signals
from .statefile import read_json, write_json
from .training import Trainer, TrainStats, local_tensor

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


def join_group(settings: Settings) -> Settings:
    """This process's rank of a torchrun group (NCCL on its own GPU, gloo on CPU): `settings` with
    the device it runs on."""
    cuda = settings.device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        settings = replace(settings, device=f"cuda:{local}")
    dist.init_process_group("nccl" if cuda else "gloo")
    return settings


def run_distributed(settings: Settings, args: argparse.Namespace) -> int:
    settings = join_group(settings)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        sharded = settings.train.fsdp
        if rank != 0:
            # torchrun passes SIGTERM to every rank: the others wait for rank 0's STOP at the end of
            # its window (a second signal still interrupts them).
            install_signals(threading.Event())
            (follow_sharded if sharded else follow)(settings)
            return 0
        try:
            miner = (ShardedMiner if sharded else RankZeroMiner)(settings)
        except NotRegistered as e:
            log.error("%s", e)
            _broadcast_header([STOP, 0, 0, 0])
            return 1
        install_signals(miner.stopping)
        log.info("miner uid %d on %d processes (%s)%s", miner.uid, world, dist.get_backend(),
                 ", FSDP2" if sharded else "")  # fmt: skip
        try:
            miner.run(args.windows)
        finally:
            miner.stop_ranks()
        return 0
    finally:
        dist.destroy_process_group()


# --- FSDP2: one miner sharded over the ranks (train.fsdp) -----------------------------------------


def shard_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of dim 0 on each rank, as FSDP2 splits it (torch.chunk: ceil-sized, trailing
    ranks possibly empty)."""
    size = -(-rows // world)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def aligned(shape: tuple[int, ...], world: int, chunk: int) -> bool:
    """Whether every rank's shard starts on a codec chunk boundary of the flattened tensor: then
    each rank can pick its chunks' top-k and keep its residual on its own, and the wire is the
    concatenation of the ranks' pieces (all large Llama matrices are, at 2-8 ranks)."""
    if len(shape) == 0:
        return False
    cols = math.prod(shape[1:])
    return all(start * cols % chunk == 0 for start, _ in shard_rows(shape[0], world))


class Shards:
    """What every rank of an FSDP2 miner does in a window: load θ_w into its shards, train, and
    encode its part of the delta; rank 0 ends up with the whole wire, encoded exactly as one
    process would encode the same delta (docs/design.md "Deltas on the wire": top-k per chunk of the
    whole flattened tensor).

    Memory: every rank keeps its parameter, gradient, AdamW and residual shards and a copy of its
    master shard (rank 0 slices its full master instead); loading θ_w holds one full tensor at a
    time; tensors whose shards do not start on a chunk boundary (the small norm vectors) are
    gathered whole to rank 0 to be encoded, one at a time.
    """

    def __init__(self, settings: Settings, model: torch.nn.Module, trainer: Trainer, dataset: Dataset,
                 ef: ErrorFeedback) -> None:  # fmt: skip
        self.settings, self.trainer, self.dataset, self.ef = settings, trainer, dataset, ef
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = dict(model.named_parameters())
        self.shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self.names = sorted(self.params)
        self.master: dict[str, torch.Tensor] = {}
        """This rank's shard of θ_w, flattened (rank 0: views into its full master)."""
        self.device = torch.device(settings.device)

    def _local(self, name: str) -> torch.Tensor:
        return local_tensor(self.params[name].data)

    @torch.no_grad()
    def load(self, full_master: dict[str, torch.Tensor] | None) -> None:
        """θ_w from rank 0 into every rank's shards, one full tensor at a time."""
        for name in self.names:
            shape = self.shapes[name]
            if self.rank == 0:
                full = full_master[name].detach().to(self.device).contiguous()
            else:
                full = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.broadcast(full, src=0)
            start, stop = shard_rows(shape[0], self.world)[self.rank]
            part = full[start:stop]
            self._local(name).copy_(part)
            self.master[name] = part.reshape(-1) if self.rank == 0 else part.reshape(-1).clone()

    def train(self, window: int, uid: int, steps: int) -> TrainStats:
        pages = local_pages(self.settings.chain.netuid, uid, window, self.dataset.page_settings)
        return self.trainer.train(self.dataset.sequences(pages), steps)

    @torch.no_grad()
    def delta(self, name: str) -> torch.Tensor:
        """This rank's shard of Δ = trained − θ_w, flattened (fp32)."""
        return self._local(name).float().reshape(-1) - self.master[name]

    def encode(self, codec: Codec, ctx: CodecContext, full_master: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:  # fmt: skip
        """The wire tensors of this window's delta with error feedback (on rank 0; None elsewhere)."""
        sharded = codec.name == "topk" and ctx.chunk <= 4096
        wire: dict[str, torch.Tensor] = {}
        pieces: list[tuple[str, dict[str, torch.Tensor]]] = []
        for name in self.names:
            if sharded and aligned(self.shapes[name], self.world, ctx.chunk):
                pieces.append((name, self._encode_shard(name, codec, ctx)))
            else:
                full = self._gather(name)
                if self.rank == 0:
                    wire.update(
                        self._compress(name, full - full_master[name].to(full.device).float(), codec, ctx)
                    )
        joined = self._join(pieces, codec, ctx)
        return None if self.rank != 0 else {**wire, **joined}

    def _encode_shard(self, name: str, codec: Codec, ctx: CodecContext) -> dict[str, torch.Tensor]:
        """Top-k of this rank's chunks, the residual kept here; indices unpacked for joining."""
        delta = self.delta(name)
        if delta.numel() == 0:
            return {}
        wire = self._compress(name, delta, codec, ctx)
        chunks = -(-delta.numel() // ctx.chunk)
        k = codec.k(ctx)
        return {"idx": unpack12(wire[f"{name}.idx"], chunks * k).to(torch.int16),
                "val": wire[f"{name}.val"], "scale": wire[f"{name}.scale"]}  # fmt: skip

    def _compress(self, name: str, delta: torch.Tensor, codec: Codec, ctx: CodecContext) -> dict[str, torch.Tensor]:  # fmt: skip
        """`compress` of one tensor with its residual (compress replaces the residual dict it gets)."""
        one = ErrorFeedback({name: self.ef.residual[name]} if name in self.ef.residual else {})
        wire = compress({name: delta}, codec, ctx, one)
        self.ef.residual[name] = one.residual[name]
        return wire

    def _gather(self, name: str) -> torch.Tensor:
        """The whole trained tensor (fp32, CPU) on rank 0; every rank takes part."""
        return (
            self.params[name].data.full_tensor().float().cpu()
            if self.rank == 0
            else _gather_quietly(self.params[name])
        )

    def _counts(self, name: str, ctx: CodecContext, k: int) -> list[int]:
        cols = math.prod(self.shapes[name][1:])
        return [
            -(-(stop - start) * cols // ctx.chunk)
            for start, stop in shard_rows(self.shapes[name][0], self.world)
        ]

    def _join(self, pieces: list[tuple[str, dict[str, torch.Tensor]]], codec: Codec, ctx: CodecContext) -> dict[str, torch.Tensor]:  # fmt: skip
        """Rank 0 receives every rank's pieces (sizes known from the shapes) and lays them end to end."""
        k = codec.k(ctx)
        kinds = (("idx", torch.int16, k), ("val", torch.int8, k), ("scale", torch.float32, 1))
        flat = {kind: [p[kind] for _, p in pieces if p] for kind, _, _ in kinds}
        mine = {
            kind: torch.cat(v) if v else torch.empty(0, dtype=dt)
            for (kind, dt, _), v in zip(kinds, flat.values(), strict=True)
        }
        if self.rank != 0:
            for kind, _, _ in kinds:
                dist.send(mine[kind].contiguous(), dst=0)
            return {}
        by_rank = [mine]
        for r in range(1, self.world):
            got = {}
            for kind, dtype, per in kinds:
                n = sum(self._counts(name, ctx, k)[r] * per for name, _ in pieces)
                buf = torch.empty(n, dtype=dtype)
                dist.recv(buf, src=r)
                got[kind] = buf
            by_rank.append(got)
        out: dict[str, torch.Tensor] = {}
        offsets = [dict.fromkeys(("idx", "val", "scale"), 0) for _ in range(self.world)]
        for name, _ in pieces:
            counts = self._counts(name, ctx, k)
            parts: dict[str, list[torch.Tensor]] = {"idx": [], "val": [], "scale": []}
            for r in range(self.world):
                for kind, _, per in kinds:
                    n = counts[r] * per
                    parts[kind].append(by_rank[r][kind][offsets[r][kind] : offsets[r][kind] + n])
                    offsets[r][kind] += n
            out[f"{name}.idx"] = pack12(torch.cat(parts["idx"]).to(torch.int32))
            out[f"{name}.val"] = torch.cat(parts["val"]).contiguous()
            out[f"{name}.scale"] = torch.cat(parts["scale"]).contiguous()
        return out


def _gather_quietly(param: torch.Tensor) -> torch.Tensor:
    """Ranks > 0 take part in rank 0's all-gather and drop the result at once."""
    param.data.full_tensor()
    return torch.empty(0)


class ShardedMiner(RankZeroMiner):
    """Rank 0 of an FSDP2 miner: the whole miner, with its model, optimizer and residual sharded.

    Restarts keep the last window only: the optimizer and residual shards live on every rank, and
    a resumed rank 0 alone could not put them back (they start fresh, as for a new miner)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)  # the Trainer shards self.model
        self.params = dict(self.model.named_parameters())  # the sharded ones; drop the full copies
        self.shards = Shards(settings, self.model, self.trainer, self.dataset, self.ef)

    def _load_state(self) -> None:
        meta = read_json(self.state_dir / "state.json")
        self.last_window = int(meta.get("last_window", -1)) if meta else -1

    def _save_state(self) -> None:
        write_json(self.state_dir / "state.json", {"last_window": self.last_window, "sharded": True})

    def honest(self, window: int) -> tuple[bytes, TrainStats]:
        steps = self.steps_that_fit(window)
        _broadcast_header([GO, window, self.uid, steps])
        self.shards.load(self.master)
        stats = self.shards.train(window, self.uid, steps)
        per_step = stats.seconds / max(stats.steps, 1)
        self.step_seconds = (
            per_step if self.step_seconds is None else 0.5 * self.step_seconds + 0.5 * per_step
        )
        wire = self.shards.encode(self.codec, self.ctx(window), self.master)
        return self.encode(window, wire), stats


def follow_sharded(settings: Settings) -> None:
    """Ranks 1..N-1 of an FSDP2 miner: their shards of every window rank 0 announces."""
    device = torch.device(settings.device)
    dataset = Dataset.open(settings)
    model = build_model(settings.model, seed=settings.model.seed).to(device)
    trainer = Trainer(model, settings.train, settings.device)
    shards = Shards(settings, model, trainer, dataset, ErrorFeedback())
    codec = CODECS[settings.mechanism.codec]
    while True:
        go, window, uid, steps = _broadcast_header(None)
        if go == STOP:
            return
        shards.load(None)
        shards.train(window, uid, steps)
        shards.encode(codec, codec_context(settings, window), None)


# --- a validator's forward passes over the GPUs of one node (torchrun) -----------------------------
#
# `torchrun --nproc_per_node N bistro validator …`: rank 0 is the whole validator (chain, buckets,
# fetch, the host work on every delta, the merge, the master step, weights). Each window it sends
# the other ranks θ_w, the merged update and each one's share of the scored uids' terms; every rank
# builds θ_eval and runs the passes of its uids (`Evaluator.passes`: each uid's pages in calls of
# their own, so the losses are those one process computes, bit for bit), and rank 0 gathers them.


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def _broadcast_json(obj: object | None) -> Any:
    """Rank 0's JSON document (`obj`), on every rank."""
    dev = _comm_device()
    data = json.dumps(obj).encode() if obj is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data else None
    if buf is None:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().numpy()))


def _send_json(obj: object, dst: int) -> None:
    dev = _comm_device()
    data = json.dumps(obj).encode()
    dist.send(torch.tensor([len(data)], dtype=torch.int64, device=dev), dst)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev), dst)


def _recv_json(src: int) -> Any:
    dev = _comm_device()
    size = torch.empty(1, dtype=torch.int64, device=dev)
    dist.recv(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.recv(buf, src)
    return json.loads(bytes(buf.cpu().numpy()))


def _pack(delta: Delta) -> tuple[list, list[torch.Tensor]]:
    """A decoded delta as (its layout, its tensors in that order)."""
    layout, tensors = [], []
    for name, part in delta.items():
        if isinstance(part, Mixed):
            kind, ts = "m", [part.low.p, part.low.q, part.sparse.indices, part.sparse.values]
        elif isinstance(part, Factored):
            kind, ts = "f", [part.p, part.q]
        elif isinstance(part, Sparse):
            kind, ts = "s", [part.indices, part.values]
        else:
            kind, ts = "d", [part]
        layout.append([name, kind, [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in ts]])
        tensors += [t.contiguous() for t in ts]
    return layout, tensors


def _unpack(layout: list, tensors: list[torch.Tensor]) -> Delta:
    out: Delta = {}
    it = iter(tensors)
    for name, kind, specs in layout:
        ts = [next(it) for _ in specs]
        if kind == "m":
            out[name] = Mixed(Factored(ts[0], ts[1]), Sparse(ts[2], ts[3]))
        elif kind == "f":
            out[name] = Factored(ts[0], ts[1])
        elif kind == "s":
            out[name] = Sparse(ts[0], ts[1])
        else:
            out[name] = ts[0]
    return out


def _empty(layout: list) -> list[torch.Tensor]:
    dev = _comm_device()
    return [
        torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
        for _, _, specs in layout
        for shape, dtype in specs
    ]


def _broadcast_delta(delta: Delta | None) -> Delta:
    """Rank 0's `delta` on every rank, bit for bit."""
    layout, tensors = _pack(delta) if delta is not None else (None, [])
    layout = _broadcast_json(layout)
    bufs = [t.to(_comm_device()) for t in tensors] if delta is not None else _empty(layout)
    for b in bufs:
        dist.broadcast(b, src=0)
    return _unpack(layout, bufs)


def _send_delta(delta: Delta, dst: int) -> None:
    layout, tensors = _pack(delta)
    _send_json(layout, dst)
    for t in tensors:
        dist.send(t.to(_comm_device()), dst)


def _recv_delta(src: int) -> Delta:
    layout = _recv_json(src)
    bufs = _empty(layout)
    for b in bufs:
        dist.recv(b, src)
    return _unpack(layout, bufs)


def rank_of(jobs: Passes, world: int) -> dict[int, int]:
    """Which rank runs each uid's passes: scored uids and then sliced close uids, dealt in turn."""
    return {uid: k % world for k, uid in enumerate([*jobs.valid, *jobs.extras])}


def _results(out: PassLosses) -> tuple[list, torch.Tensor]:
    rows, flat = [], []
    for kind, losses in (("base", out.base), ("with_", out.with_), ("without", out.without)):
        for uid, t in losses.items():
            rows.append([kind, uid, len(t)])
            flat.append(t.double().cpu())
    return rows, torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)


class ScoringGroup:
    """Rank 0's end of the split: `Evaluator.group`, used by `Evaluator.score`."""

    def __init__(self) -> None:
        self.world = dist.get_world_size()

    def passes(self, evaluator: Evaluator, master: dict[str, torch.Tensor], update: Delta, jobs: Passes,
               terms: dict[int, Delta]) -> PassLosses:  # fmt: skip
        """`Evaluator.passes` of every uid of `jobs`, each on its rank (`rank_of`); the losses of all."""
        owner = rank_of(jobs, self.world)
        _broadcast_json({"go": GO, "window": jobs.window, "block_hash": jobs.block_hash, "valid": jobs.valid,
                         "extras": jobs.extras, "close": [[u, cs] for u, cs in jobs.close.items()]})  # fmt: skip
        _broadcast_params(master, _comm_device())
        _broadcast_delta(update)
        for uid in jobs.valid:
            if owner[uid] != 0:
                _send_delta(terms.pop(uid), owner[uid])
        mine = {u for u, r in owner.items() if r == 0}
        out = evaluator.passes(master, update, jobs, terms.pop, mine)
        for rank in range(1, self.world):
            rows = _recv_json(rank)
            flat = torch.empty(sum(n for _, _, n in rows), dtype=torch.float64, device=_comm_device())
            dist.recv(flat, rank)
            at = 0
            for kind, uid, n in rows:
                getattr(out, kind)[uid] = flat[at : at + n].cpu()
                at += n
        return out

    def stop(self) -> None:
        _broadcast_json({"go": STOP})


def serve_passes(settings: Settings) -> None:
    """Ranks 1..N-1 of a validator: run the passes rank 0 deals out, until it says stop."""
    device = torch.device(settings.device)
    model = build_model(settings.model, seed=settings.model.seed).to(device)
    evaluator = Evaluator(settings, model, Dataset.open(settings))
    master = {k: v.detach().clone() for k, v in evaluator.params.items()}
    rank = dist.get_rank()
    while True:
        msg = _broadcast_json(None)
        if msg["go"] == STOP:
            return
        jobs = Passes(
            msg["window"], msg["block_hash"], msg["valid"], msg["extras"], {u: cs for u, cs in msg["close"]}
        )
        with torch.no_grad():
            _broadcast_params(master, _comm_device())
        update = _broadcast_delta(None)
        owner = rank_of(jobs, dist.get_world_size())
        terms = {uid: _recv_delta(0) for uid in jobs.valid if owner[uid] == rank}
        out = evaluator.passes(master, update, jobs, terms.pop, {u for u, r in owner.items() if r == rank})
        rows, flat = _results(out)
        _send_json(rows, 0)
        dist.send(flat.to(_comm_device()), 0)


def run_validator(settings: Settings, args: argparse.Namespace) -> int:
    """`torchrun --nproc_per_node N bistro validator …`: rank 0 the validator, the others its passes."""
    from .validator import main as validator_main

    settings = join_group(settings)
    try:
        if dist.get_rank() != 0:
            install_signals(threading.Event())  # rank 0 says stop at the end of its window
            serve_passes(settings)
            return 0
        group = ScoringGroup()
        log.info("validator passes on %d processes (%s)", group.world, dist.get_backend())
        try:
            return validator_main(settings, args, group=group)
        finally:
            group.stop()
    finally:
        dist.destroy_process_group()
