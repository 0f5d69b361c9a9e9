"""The miner's inner loop: AdamW on its pages, with optimizer state kept from window to window.

docs/design.md ("Miner loop"; measured: keeping the optimizer state lifts learning efficiency from 0.81
to 0.89). One `Trainer` lives as long as the miner: its AdamW moments and its step count survive
every window, the learning rate warms up linearly over the first `warmup_steps` steps it ever takes,
and `state_dict()` / `load_state_dict()` carry all of that through a restart as tensors + JSON.

Data parallel: under `torch.distributed` (torchrun; gloo on CPU, NCCL on GPU) each step takes
`world * batch_size` sequences, rank r trains on its own `batch_size` of them, and the gradients
are averaged with one all_reduce over a flat buffer before clipping and the step, so every rank
takes the identical step.

FSDP2 (`train.fsdp` under torchrun): each decoder layer and then the whole model go through
`torch.distributed.fsdp.fully_shard`, so parameters, gradients and AdamW moments are split on dim 0
over the ranks (the optimizer is built over the sharded parameters: its state is sharded and stays
from window to window). FSDP averages gradients in its reduce-scatter, so the flat all_reduce is
skipped. On CUDA layers compute in bf16 with fp32 gradient reduction (`MixedPrecisionPolicy`); on
CPU everything stays fp32. `train.activation_checkpointing` recomputes each layer in the backward
(transformers' non-reentrant checkpointing, which composes with FSDP2).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TrainConfig
from .model import autocast_for, train_loss

StepCallback = Callable[[int, float], None]


@dataclass
class TrainStats:
    """What one call to `Trainer.train` did."""

    loss: float
    """Mean training loss over the steps (averaged over ranks)."""
    tokens: int
    """Tokens trained on, over all ranks."""
    seconds: float
    tokens_per_s: float
    step_seconds: list[float] = field(default_factory=list)
    steps: int = 0


class Trainer:
    """AdamW with warm-up and clipping on one model; lives across windows."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: str = "cpu") -> None:
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device)
        if cfg.threads > 0:
            # Process-wide, and it matters: two OpenMP threads on two cores shared with other busy
            # processes (a localnet) run ~30x slower than one thread, as each waits for the other.
            torch.set_num_threads(cfg.threads)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.fsdp = cfg.fsdp and _rank_world()[1] > 1
        if self.fsdp:
            shard_model(model, self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
        self.step_count = 0
        """Optimizer steps taken over this trainer's whole life (drives the warm-up)."""

    def lr_at(self, step: int) -> float:
        """Linear warm-up from lr/warmup to lr over the first `warmup_steps` steps, then flat."""
        if step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def _shard(self, sequences: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's batch for `step`: the sequences cycled in order, world*batch per step."""
        rank, world = _rank_world()
        bs = self.cfg.batch_size
        n = len(sequences)
        start = (step * world + rank) * bs
        if start % n + bs <= n:  # the common case: a contiguous slice, no copy
            return sequences[start % n : start % n + bs]
        return sequences[torch.arange(start, start + bs, device=sequences.device) % n]

    def train(
        self, sequences: torch.Tensor, steps: int, *, on_step: StepCallback | None = None
    ) -> TrainStats:
        """Take `steps` optimizer steps over the sequences (cycled in order, per rank)."""
        if len(sequences) == 0:
            raise ValueError("train needs at least one sequence")
        model = self.model
        model.train()
        sequences = sequences.to(self.device, non_blocking=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        step_seconds: list[float] = []
        begin = time.perf_counter()
        for i in range(steps):
            t0 = time.perf_counter()
            batch = self._shard(sequences, i)
            loss = self._step(batch)
            total += loss
            if on_step is not None:
                on_step(self.step_count, float(loss))
            step_seconds.append(time.perf_counter() - t0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - begin
        _, world = _rank_world()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        tokens = steps * world * self.cfg.batch_size * sequences.shape[1]
        return TrainStats(
            loss=float(total) / max(steps, 1),
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            step_seconds=step_seconds,
            steps=steps,
        )

    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward, backward, all-reduce, clip, AdamW step; returns the detached loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        with autocast_for(self.device):
            loss = train_loss(self.model, batch)
        loss.backward()
        if not self.fsdp:  # FSDP's reduce-scatter already averaged them
            _average_gradients(self.params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.detach()

    # --- persistence: tensors + JSON, never pickle ------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) of the optimizer and the step count."""
        raw = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in raw["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"state.{idx}.{key}"] = local_tensor(value).detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta = {"step_count": self.step_count, "param_groups": raw["param_groups"], "scalars": scalars}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (checks the parameter count matches)."""
        groups = meta["param_groups"]
        if sum(len(g["params"]) for g in groups) != len(self.params):
            raise ValueError("optimizer state is for a different model")
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            _, idx, key = name.split(".", 2)
            param = self.params[int(idx)]
            if hasattr(param, "device_mesh") and value.dim() > 0:  # FSDP2: this rank's shard back
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(value.to(self.device), param.device_mesh, param.placements)
            state.setdefault(int(idx), {})[key] = value
        for idx, values in meta.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(values)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step_count = int(meta["step_count"])

    def save(self, path: str | Path) -> None:
        """Write the optimizer state to one safetensors file (metadata holds the JSON)."""
        tensors, meta = self.state_dict()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"trainer": json.dumps(meta)})
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        """Read what `save` wrote."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
        self.load_state_dict(load_file(str(path), device=str(self.device)), meta)


def shard_model(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: every decoder layer its own unit (gathered only while it computes), then the
    root (embeddings, final norm, head). bf16 compute with fp32 reduction on CUDA only."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2 parameter or optimizer state); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params: list[torch.Tensor]) -> None:
    """Mean of every rank's gradients, with one all_reduce over a flat buffer."""
    _, world = _rank_world()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
