"""`hf:NAME@REVISION[:SPLIT]`: a hub dataset's parquet files, read by page, the same on every node.

- **Pinned.** `@REVISION` (a commit sha or tag) fixes the files, so page ids never shift when the
  dataset grows; the revision is part of the content hash. Without a pin the node logs a warning.
- **Indexed once.** The index lists (file, row group, rows) of every parquet file in path order,
  read from footers only; page i is rows [i*rows, (i+1)*rows) of the concatenation. It is cached
  under `<cache_dir>/corpus/hub/`, and the publisher serves it from its bucket
  (`protocol.hub_index_key`), signed, so thousands of nodes do not each walk the hub: a node takes,
  in order, its own cache, the publisher's copy (`index_source`), then the walk.
- **Any filesystem.** Paths are `datasets/NAME@REVISION/...` on an fsspec filesystem: the Hugging
  Face Hub (`HfFileSystem`) by default, or `data.hub_root`, a directory laid out the same way (a
  mirror; how the tests run this code path offline).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import protocol
from ..atomicfile import write_atomic
from ..config import DataConfig
from .corpus import Corpus

log = logging.getLogger("bistro.data.hub")

Group = tuple[str, int, int]
IndexSource = Callable[[str], list[Group] | None]
"""Given an index key, the index from elsewhere (the publisher's bucket), or None."""

MAX_INDEX_BYTES = 64 * 1024 * 1024
"""Largest served index a node reads (~1M row groups)."""


class HubError(ValueError):
    """A hub corpus cannot be opened or its index is malformed."""


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf:NAME@REVISION[:SPLIT]`."""

    name: str
    revision: str
    split: str

    @classmethod
    def parse(cls, corpus: str) -> HubSpec:
        body = corpus.removeprefix("hf:")
        body, _, split = body.partition(":")
        name, _, revision = body.partition("@")
        if not name or name.count("/") > 1 or ".." in name:
            raise HubError(f"not a hub dataset name: {corpus!r} (hf:ORG/NAME@REVISION[:SPLIT])")
        return cls(name, revision, split)

    @property
    def root(self) -> str:
        """The dataset's directory on the filesystem (the revision in the path, as HfFileSystem has it)."""
        return f"datasets/{self.name}@{self.revision}" if self.revision else f"datasets/{self.name}"

    @property
    def key(self) -> str:
        """Names the index in caches and in the publisher's bucket."""
        return protocol.digest("hub-index", 1, self.name, self.revision, self.split).hex()[:32]


def filesystem(cfg: DataConfig) -> Any:
    """The fsspec filesystem hub paths are read from: `data.hub_root`, or the Hugging Face Hub."""
    if cfg.hub_root:
        import fsspec
        from fsspec.implementations.dirfs import DirFileSystem

        root = os.path.expanduser(cfg.hub_root)
        return DirFileSystem(path=root, fs=fsspec.filesystem("file"))
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise HubError("hub corpora need huggingface_hub (pip install 'bistro[hub]')") from None
    return HfFileSystem()


def build_index(fs: Any, spec: HubSpec) -> list[Group]:
    """(file, row group, rows) of every parquet file of the dataset, in path order: footers only."""
    import pyarrow.parquet as pq

    files = sorted(fs.glob(f"{spec.root}/**/*.parquet"))
    if spec.split:
        files = [
            f for f in files if f"/{spec.split}/" in f or f.rsplit("/", 1)[-1].startswith(f"{spec.split}-")
        ]
    if not files:
        raise HubError(
            f"hub dataset {spec.root} has no parquet files{' for split ' + spec.split if spec.split else ''}"
        )
    groups: list[Group] = []
    for path in files:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        if "text" not in meta.schema.names:
            raise HubError(f"{path}: parquet has no `text` column")
        groups.extend((str(path), i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return groups


def check_index(raw: Any, spec: HubSpec) -> list[Group]:
    """An index read from a cache or a bucket, refused unless every entry is a file of this dataset."""
    if not isinstance(raw, list) or not raw:
        raise HubError("hub index is not a non-empty list")
    out: list[Group] = []
    for g in raw:
        ok = isinstance(g, list | tuple) and len(g) == 3 and isinstance(g[0], str)
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in g[1:])
        if not ok or not g[0].startswith(spec.root + "/") or ".." in g[0]:
            raise HubError(f"hub index entry {str(g)[:80]} is not a row group of {spec.root}")
        out.append((g[0], g[1], g[2]))
    return out


def index_hash(spec: HubSpec, groups: list[Group]) -> str:
    """The corpus's content hash: name, revision, split and the index (hashing every document of a
    web-scale corpus is not practical; the pinned revision fixes the bytes behind the index)."""
    body = json.dumps([spec.name, spec.revision, spec.split, groups], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class HubDocuments(Sequence[str]):
    """Rows of the indexed parquet files, read one row group at a time (no full download).

    A page's rows usually sit in one row group, so a page costs one ranged read of one column."""

    def __init__(self, fs: Any, groups: list[Group], keep: int = 4) -> None:
        self.fs = fs
        self.groups = groups
        self.starts: list[int] = []
        total = 0
        for _, _, rows in groups:
            self.starts.append(total)
            total += rows
        self.total = total
        self.keep = keep
        self.recent: dict[int, list[str]] = {}
        self.reads = 0

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(self.total))]
        if not 0 <= j < self.total:
            raise IndexError(j)
        g = bisect.bisect_right(self.starts, j) - 1
        return self._group(g)[j - self.starts[g]]

    def _group(self, g: int) -> list[str]:
        if g not in self.recent:
            import pyarrow.parquet as pq

            path, index, rows = self.groups[g]
            with self.fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(index, columns=["text"])
            if table.num_rows != rows:
                raise HubError(f"{path} row group {index}: {table.num_rows} rows, the index says {rows}")
            if len(self.recent) >= self.keep:
                self.recent.pop(next(iter(self.recent)))
            self.recent[g] = [t if isinstance(t, str) else "" for t in table.column("text").to_pylist()]
            self.reads += 1
        return self.recent[g]


def _cache_path(cfg: DataConfig, spec: HubSpec) -> Path:
    return Path(cfg.cache_dir).expanduser() / "corpus" / "hub" / f"{spec.key}.json"


def load_index(
    cfg: DataConfig, spec: HubSpec, fs: Any, index_source: IndexSource | None = None
) -> list[Group]:
    """The index: own cache, else the publisher's copy, else walk the filesystem (then cache it)."""
    path = _cache_path(cfg, spec)
    if path.is_file():
        try:
            return check_index(json.loads(path.read_text()), spec)
        except (HubError, json.JSONDecodeError) as e:
            log.warning("cached hub index %s is bad (%s): rebuilding", path, e)
    groups = None
    if index_source is not None:
        groups = index_source(spec.key)
        if groups is not None:
            log.info("hub index of %s from the publisher (%d row groups)", spec.root, len(groups))
    if groups is None:
        log.info("indexing %s (parquet footers)", spec.root)
        groups = build_index(fs, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(groups).encode(), durable=False)
    return groups


def open_hub_corpus(
    cfg: DataConfig, rows_per_page: int, index_source: IndexSource | None = None, fs: Any = None
):
    """The Corpus that `cfg.corpus` (`hf:NAME@REVISION[:SPLIT]`) names."""
    spec = HubSpec.parse(cfg.corpus)
    if not spec.revision:
        log.warning("%s is not pinned to a revision: page ids shift when the dataset changes", cfg.corpus)
    fs = filesystem(cfg) if fs is None else fs
    groups = load_index(cfg, spec, fs, index_source)
    corpus = Corpus(cfg.corpus, HubDocuments(fs, groups), rows_per_page, index_hash(spec, groups))
    corpus.hub_key = spec.key  # type: ignore[attr-defined]  # what the publisher serves it under
    corpus.hub_index = groups  # type: ignore[attr-defined]
    return corpus


# --- serving the index from the publisher's bucket -------------------------------------------------


def publish_index(store: Any, keypair: protocol.Signer, netuid: int, corpus: Any) -> bool:
    """Put the corpus's index, signed, in our bucket (a no-op for corpora that are not hub ones)."""
    key = getattr(corpus, "hub_key", None)
    if key is None:
        return False
    doc = protocol.sign_document(keypair, {"kind": "hub-index", "netuid": netuid, "key": key,
                                           "groups": [list(g) for g in corpus.hub_index]})  # fmt: skip
    store.put(protocol.hub_index_key(netuid, key), json.dumps(doc).encode())
    return True


def fetch_index(store: Any, signer: str, netuid: int, spec_corpus: str) -> IndexSource:
    """An `IndexSource` reading the publisher's signed copy; None for anything missing or wrong."""
    spec = HubSpec.parse(spec_corpus)

    def source(key: str) -> list[Group] | None:
        from ..storage.base import NotFound, StorageError, TooLarge

        try:
            raw = store.get(protocol.hub_index_key(netuid, key), max_bytes=MAX_INDEX_BYTES)
            doc = json.loads(raw)
        except (NotFound, StorageError, TooLarge, json.JSONDecodeError, UnicodeDecodeError) as e:
            log.info("no hub index from the publisher: %s", e)
            return None
        if not protocol.verify_document(doc, signer) or doc.get("key") != key or doc.get("netuid") != netuid:
            log.warning(
                "the publisher's hub index is not signed by %s for this dataset: ignored", signer[:10]
            )
            return None
        try:
            return check_index(doc.get("groups"), spec)
        except HubError as e:
            log.warning("the publisher's hub index is refused: %s", e)
            return None

    return source
