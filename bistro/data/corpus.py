"""A corpus: a fixed, ordered list of documents, cut into pages of `rows_per_page` documents.

Sources (`DataConfig.corpus`):
- `shakespeare`: the embedded default, shipped as package data (`bistro/data/embedded/`, see the
  README there): the Project Gutenberg edition of each work, in file-name order, cut at line
  boundaries into passages of about 1.5 KB (`strip_gutenberg`, then `passages`), one JSON string a
  line, xz-compressed; checked against the content hash recorded beside it.
- a path or glob of `.txt` (one document per blank-line block), `.jsonl` or `.parquet` (one document
  per row, from its `text` field), files taken in sorted path order.
- `hf:NAME@REVISION[:SPLIT]`: a Hugging Face dataset's parquet files, by row group (`hub.py`).

Pages: page `i` holds documents `[i*rows, (i+1)*rows)`; the last page also takes the ragged tail,
so every page has at least `rows_per_page` documents (or all of them, for a corpus that small).
Local corpora are materialised once under `<cache_dir>/corpus/<content_hash>/` and found again by a
key over the source files' names, sizes and modification times.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomicfile import write_atomic
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


EMBEDDED = Path(__file__).parent / "embedded"
"""Package data: `shakespeare.jsonl.xz` (the documents) and `shakespeare.json` (their manifest)."""


def shakespeare_files() -> list[Path]:
    """The embedded corpus's package data file."""
    path = EMBEDDED / "shakespeare.jsonl.xz"
    if not path.is_file():
        raise CorpusError(f"the embedded corpus is missing from the installed package ({path})")
    return [path]


def read_embedded(path: Path) -> list[str]:
    """The embedded documents, refused unless they hash to the manifest's content hash."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    expected = json.loads(path.with_name("shakespeare.json").read_text())["content_hash"]
    if content_hash(docs) != expected:
        raise CorpusError(f"{path}: content hash does not match shakespeare.json (a damaged install)")
    return docs


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
        return read_embedded(files[0])
    docs: list[str] = []
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
    write_atomic(path, text.encode(), durable=False)


def _store(root: Path, key: str, name: str, docs: list[str], chash: str) -> None:
    entry = root / chash
    body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    _write_atomic(entry / "documents.jsonl", body)
    _write_atomic(entry / "source.json", json.dumps({"name": name, "num_documents": len(docs)}))
    _write_atomic(root / "sources" / f"{key}.json", json.dumps({"content_hash": chash}))


def open_corpus(cfg: DataConfig, rows_per_page: int) -> Corpus:
    """Open (and on first use materialise and cache) the local corpus that `cfg.corpus` names (the
    embedded one, files or a glob; `hf:` corpora open through `bistro.data.open_corpus`)."""
    if cfg.corpus.startswith("hf:"):
        raise CorpusError(f"{cfg.corpus}: a hub corpus, opened by bistro.data.open_corpus (data/hub.py)")
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
