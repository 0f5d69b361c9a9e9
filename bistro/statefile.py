"""Atomic local state: a node killed at any instant leaves either the old file or the new one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .atomicfile import write_atomic

__all__ = ["read_json", "read_tensors", "write_atomic", "write_json", "write_tensors"]


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any | None:
    """The JSON at `path`, or None if there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """safetensors, atomically (our own files: weights, optimizer state, error feedback)."""
    write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta))


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    return load_file(str(path))
