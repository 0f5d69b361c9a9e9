"""A bucket as a directory: `<root>/buckets/<bucket>/<key>`.

The embedded default (one machine, no accounts). Writes are atomic: the bytes go to a temp file in
the key's own directory, are fsynced, renamed over the key, and the directory is fsynced, so a
reader sees the old object or the new one, never half of one, and a killed writer leaves at most a
stray temp file, which `list()` never shows.
"""

from __future__ import annotations

import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

from ..atomicfile import write_atomic
from .base import NotFound, ObjectInfo, StorageError, Store, TooLarge, check_deadline

TEMP_PREFIX = ".bistro-tmp-"
"""Temp files start with this; keys whose segments start with it are refused, so none collide."""

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class BadKey(ValueError):
    """A key (or bucket name) that could escape the bucket directory or cannot be a file name."""


def check_key(key: str) -> str:
    """`key` if it is a safe relative path of `/`-separated segments; raises BadKey otherwise."""
    if not isinstance(key, str) or not key:
        raise BadKey("empty key")
    if "\x00" in key or "\\" in key:
        raise BadKey(f"{key!r}: NUL or backslash")
    if key.startswith("/"):
        raise BadKey(f"{key!r}: absolute")
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise BadKey(f"{key!r}: empty, '.' or '..' segment")
        if seg.startswith(TEMP_PREFIX):
            raise BadKey(f"{key!r}: reserved prefix {TEMP_PREFIX}")
    return key


def check_bucket_name(bucket: str) -> str:
    """`bucket` if it is a plain directory name (letters, digits, `.`, `_`, `-`); BadKey otherwise."""
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or bucket.strip(".") == "":
        raise BadKey(f"bad bucket name {bucket!r}")
    return bucket


class LocalStore(Store):
    """One bucket directory under `<root>/buckets/`."""

    def __init__(self, root: str | Path, bucket: str) -> None:
        self.bucket = check_bucket_name(bucket)
        self.dir = Path(root).expanduser() / "buckets" / bucket

    def __repr__(self) -> str:
        return f"LocalStore({str(self.dir)!r})"

    def _path(self, key: str) -> Path:
        return self.dir / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        # a concurrent delete may remove the (empty) parent directory under us: try again
        for attempt in range(3):
            try:
                write_atomic(path, data, temp_prefix=TEMP_PREFIX)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise StorageError(f"put {self.bucket}/{key}: directory vanished") from None
            except (NotADirectoryError, FileExistsError) as e:
                raise StorageError(f"put {self.bucket}/{key}: a key is in the way: {e}") from None
            except OSError as e:
                raise StorageError(f"put {self.bucket}/{key}: {e.strerror}") from None

    def _inside(self, path: Path) -> bool:
        """Whether `path`, symlinks resolved, stays in the bucket: a bucket's owner may plant a
        symlink to another bucket or to the reader's own files (its wallet), which we never read."""
        return os.path.realpath(path).startswith(os.path.realpath(self.dir) + os.sep)

    def _open(self, key: str, deadline: float | None) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file at `key` (never through a symlink out of the bucket)."""
        check_deadline(deadline, f"get {self.bucket}/{key}")
        path = self._path(key)
        try:
            if not self._inside(path):
                raise NotFound(f"{self.bucket}/{key}")
            # O_NONBLOCK: opening a FIFO planted at the key would otherwise block until a writer comes
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.bucket}/{key}") from None
        except OSError as e:  # a symlink loop (ELOOP), a key we may not read: the bucket owner's doing
            raise StorageError(f"get {self.bucket}/{key}: {e.strerror or type(e).__name__}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory, FIFO or device planted at the key
            os.close(fd)
            raise StorageError(f"get {self.bucket}/{key}: not a regular file")
        return fd, st

    def get_range(self, key: str, start: int, length: int, *, deadline: float | None = None) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range {start}+{length}")
        fd, _ = self._open(key, deadline)
        with os.fdopen(fd, "rb") as f:
            f.seek(start)
            return f.read(length)

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        fd, st = self._open(key, deadline)
        with os.fdopen(fd, "rb") as f:
            # the size of the very file we opened, checked before one byte is read
            if max_bytes is not None and st.st_size > max_bytes:
                raise TooLarge(key, st.st_size, max_bytes)
            # a file that grows while we read (its owner appending) is cut at max_bytes + 1
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(key, len(data), max_bytes)
        return data

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not self._inside(path):
            return None
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # start the walk at the deepest directory the prefix names, not at the bucket root
        head, _, _ = prefix.rpartition("/")
        start = self.dir / check_key(head) if head else self.dir
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            rel = Path(dirpath).relative_to(self.dir).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in filenames:
                key = base + name
                if name.startswith(TEMP_PREFIX) or not key.startswith(prefix):
                    continue
                info = self.head(key)
                if info is not None:  # deleted while we walked
                    out.append(info)
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        # drop now-empty parents (old windows), stopping at the bucket directory
        parent = path.parent
        while parent != self.dir:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
