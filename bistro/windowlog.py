"""The validator's window log: one JSON record a scored window, the file every tool reads.

`<dir>/windows.jsonl` holds the newest `per_file` records; older ones move to numbered archives
(`windows-000001.jsonl`, …, the newest `archives_kept` kept), so a start-up reads O(recent). The
validator appends; the local network, the report and the tests read with `read`, which stops at a
line cut short (a record being written, or a kill mid-line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomicfile import write_atomic

FILE = "windows.jsonl"


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of one file, up to the first line that is not whole JSON (missing file: [])."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class WindowLog:
    """Append, rotate and read a directory's window records."""

    def __init__(self, directory: Path, per_file: int = 1000, archives_kept: int = 4) -> None:
        self.dir, self.per_file, self.archives_kept = Path(directory), per_file, archives_kept
        self.path = self.dir / FILE
        self.lines = len(read_lines(self.path))
        """Records in the current file."""

    def read(self) -> list[dict[str, Any]]:
        """Every record kept: the archives, oldest first, then the current file."""
        out = []
        for path in [*sorted(self.dir.glob("windows-*.jsonl")), self.path]:
            out += read_lines(path)
        return out

    def append(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.lines >= self.per_file:
            self.rotate()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1

    def rotate(self) -> None:
        """The current file becomes the next archive; archives beyond `archives_kept` are deleted."""
        archives = sorted(self.dir.glob("windows-*.jsonl"))
        number = int(archives[-1].stem.split("-")[1]) + 1 if archives else 1
        self.path.rename(self.dir / f"windows-{number:06d}.jsonl")
        for old in archives[: max(len(archives) + 1 - self.archives_kept, 0)]:
            old.unlink(missing_ok=True)
        self.lines = 0

    def keep_through(self, last_window: int) -> None:
        """Forget records of windows after `last_window` (a node killed between writing a record
        and saving its state scores that window again, and must not list it twice). Reads only the
        current file: archives hold saved windows."""
        kept = []
        for r in read_lines(self.path):
            if not isinstance(r, dict) or not isinstance(r.get("window"), int) or r["window"] > last_window:
                break
            kept.append(r)
        if self.path.exists() and len(kept) != len(self.path.read_text().splitlines()):
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.lines = len(kept)
