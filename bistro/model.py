"""Build the shared model from a preset; loss on pages; a stable hash of parameters."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import ModelConfig
from .threads import host_threads, map_threads

Params = dict[str, torch.Tensor]
"""A model's tensors by name (its parameters, or the master's copy of them)."""


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The transformers config for a preset's model shape."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.sequence_length,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )


def build_model(
    cfg: ModelConfig, seed: int | None = None, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """A freshly initialised fp32 model: the same bits for the same seed in any process.

    The init draws from torch's global generator inside `fork_rng`, so the caller's RNG state is
    left exactly as it was.
    """
    config = llama_config(cfg)
    config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        model = LlamaForCausalLM._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    return model


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 autocast is slower for small models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _shifted_targets(batch: torch.Tensor) -> torch.Tensor:
    """[b*L] next-token targets, -100 (ignored) at each row's last position.

    Padding the targets instead of slicing the logits avoids copying the [b, L, V] logits.
    """
    return F.pad(batch[:, 1:], (0, 1), value=-100).reshape(-1)


def token_losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """[b, L-1] next-token losses (fp32) of a batch of token rows."""
    logits = model(input_ids=batch).logits  # [b, L, V]
    b, length, vocab = logits.shape
    losses = F.cross_entropy(logits.view(-1, vocab).float(), _shifted_targets(batch), reduction="none")
    return losses.view(b, length)[:, :-1]


def train_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a batch (what transformers' `labels=` computes, without its copies)."""
    logits = model(input_ids=batch).logits  # [b, L, V]
    return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), _shifted_targets(batch))


def sequence_losses(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss of each sequence, float64 on the CPU, [n]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(sequences), dtype=torch.float64)
    try:
        with torch.inference_mode(), autocast_for(device):
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size].to(device, non_blocking=True)
                out[start : start + len(batch)] = token_losses(model, batch).mean(dim=1).double().cpu()
    finally:
        model.train(was_training)
    return out


def evaluate(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean loss over the sequences (every sequence has the same length, so every token counts once)."""
    if len(sequences) == 0:
        raise ValueError("evaluate needs at least one sequence")
    return float(sequence_losses(model, sequences, batch_size).mean())


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: the tensors that deltas, masters and hashes are defined over.

    Non-persistent buffers (rotary `inv_freq`) are derived from the config and left out; a tied
    output head appears once, under the embedding's name.
    """
    return dict(model.named_parameters())


def model_hash(model_or_state: nn.Module | Mapping[str, torch.Tensor], threads: int = 0) -> str:
    """sha256 over, in name order, each tensor's name, dtype and shape and the sha256 of its raw
    bytes. The tensors' digests are taken on `threads` threads (0: one a core; hashlib lets go of
    the GIL while it hashes): at 7B one sha256 stream over 27 GB takes ~19 s on one core, and every
    follower hashes the master each window."""
    state = state_tensors(model_or_state) if isinstance(model_or_state, nn.Module) else model_or_state
    names = sorted(state)

    def digest(name: str) -> bytes:
        data = state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return hashlib.sha256(memoryview(data)).digest() + data.nbytes.to_bytes(8, "little")

    h = hashlib.sha256()
    for name, tail in zip(names, map_threads(digest, names, host_threads(threads)), strict=True):
        t = state[name]
        head = f"{name}|{str(t.dtype).removeprefix('torch.')}|{','.join(map(str, t.shape))}|"
        h.update(len(head).to_bytes(8, "little"))
        h.update(head.encode())
        h.update(tail)
    return h.hexdigest()
