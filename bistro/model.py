"""Build the shared model from a preset; loss on pages; a stable hash of parameters."""

from __future__ import annotations

from transformers import LlamaConfig

from .config import ModelConfig


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
