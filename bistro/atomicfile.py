"""The one way BISTRO replaces a file: write a temp file beside it, then rename it over the target.

A reader (or a node killed at any instant) sees either the old file or the new one, never a part.
`durable=True` also fsyncs the data and the directory, so the rename survives a power cut: state,
buckets. Caches that can be rebuilt (tokenized pages, tokenizers, corpora) skip the fsyncs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the renames in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True, temp_prefix: str | None = None) -> None:
    """Replace `path` with `data` atomically (parents created). The temp file is named
    `<temp_prefix><random>` (default `.<name>.<random>.tmp`) so listings can tell it apart; it is
    removed if anything fails. OSErrors (a vanished or blocked directory) propagate unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    tmp = path.parent / (f"{temp_prefix}{token}" if temp_prefix else f".{path.name}.{token}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
