"""The few operations a bucket must answer. Miners and validators import only this.

A `Store` is bound to one bucket. Backends sit in sibling files: `local.py` (a directory per
bucket, atomic writes) and `s3.py` (any S3 API through boto3).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime


class StorageError(Exception):
    """The store could not answer (after retries): network, throttling, server errors."""


class PeerTimeout(TimeoutError):
    """The object did not arrive whole before the caller's deadline (the read was abandoned)."""


def check_deadline(deadline: float | None, what: str) -> float | None:
    """Seconds left before `deadline` (None: no deadline); PeerTimeout once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise PeerTimeout(f"{what}: deadline passed")
    return left


class NotFound(Exception):
    """The key is not in the bucket (or the bucket does not exist)."""


class TooLarge(Exception):
    """The object is larger than the caller's `max_bytes`; its body was not read."""

    def __init__(self, key: str, size: int, max_bytes: int) -> None:
        super().__init__(f"{key}: {size} bytes > limit {max_bytes}")
        self.key, self.size, self.max_bytes = key, size, max_bytes


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a bucket."""

    key: str
    size: int
    last_modified: datetime
    """UTC, timezone-aware."""


class Store(ABC):
    """One bucket."""

    bucket: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write `data` at `key`, whole or not at all."""

    @abstractmethod
    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        """The object at `key`. Raises NotFound, TooLarge (before reading the body), StorageError,
        and PeerTimeout when it cannot finish by `deadline` (an absolute `time.monotonic()`)."""

    def get_range(self, key: str, start: int, length: int, *, deadline: float | None = None) -> bytes:
        """Bytes [start, start + length) of the object at `key`: fewer only where the object ends
        first. A read of a peer's delta in part (`bistro.delta.slices`); a store that cannot read
        ranges raises StorageError; NotFound and PeerTimeout as in `get`."""
        raise StorageError(f"get {self.bucket}/{key}: this store reads no byte ranges")

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and time, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (all pages), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""
