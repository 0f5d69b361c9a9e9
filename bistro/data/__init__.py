"""Data: a corpus cut into pages, the tokenizer, and pages packed into training sequences.

`Dataset.sequences(page_ids)` packs each page on its own: its documents tokenized, each followed by
EOS, cut into full rows of `sequence_length` tokens with no padding. The ragged tail of a page is
dropped (a page's rows never depend on its neighbours). A page with fewer tokens than one row is
repeated until it fills exactly one, so every page gives at least one sequence.

Tokenized pages are cached on disk as safetensors under
`<cache_dir>/pages/<corpus hash>-r<rows per page>-<tokenizer hash>/<page>.safetensors`, holding the page's whole token
stream and, in the header, the sha256 of its bytes: a corrupted entry is detected and rebuilt. An
in-memory LRU in front of it means a validator asking for a page twice does not touch disk. The disk
cache is bounded: past `data.page_cache_bytes` the least recently used pages are deleted (a read
refreshes a page's time), down to 90% of the bound.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..atomicfile import write_atomic
from ..config import DataConfig, Settings
from . import corpus as _local
from .corpus import Corpus, CorpusError, Manifest, PageOutOfRange
from .hub import IndexSource, open_hub_corpus
from .pages import PageSettings, eval_pages, global_pages, local_pages
from .tokenizer import Tok, TokenizerError, load_tokenizer


def open_corpus(cfg: DataConfig, rows_per_page: int, index_source: IndexSource | None = None) -> Corpus:
    """The corpus `cfg.corpus` names: `hf:NAME@REVISION[:SPLIT]` through data/hub.py (`index_source`:
    where else its row-group index may come from), anything else through data/corpus.py."""
    if cfg.corpus.startswith("hf:"):
        return open_hub_corpus(cfg, rows_per_page, index_source)
    return _local.open_corpus(cfg, rows_per_page)


__all__ = [
    "Corpus",
    "CorpusError",
    "Dataset",
    "Manifest",
    "PageOutOfRange",
    "PageSettings",
    "Tok",
    "TokenizerError",
    "eval_pages",
    "global_pages",
    "local_pages",
    "open_corpus",
    "load_tokenizer",
]

MEMORY_PAGES = 512
"""Tokenized pages kept in memory (a tiny page is ~16 KB of int32)."""


def pack(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[n, length] rows of a 1-D token stream: the tail dropped, or a short stream tiled to one row."""
    if tokens.numel() < length:
        reps = -(-length // tokens.numel())
        tokens = tokens.repeat(reps)[:length]
    n = tokens.numel() // length
    return tokens[: n * length].view(n, length)


class Dataset:
    """Corpus + tokenizer + page cache: what miners and validators read their tokens from."""

    def __init__(self, corpus: Corpus, tokenizer: Tok, sequence_length: int, page_settings: PageSettings, cache_dir: str, cache_bytes: int = 4 << 30) -> None:  # fmt: skip
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.page_settings = page_settings
        # A page is a run of rows_per_page documents: the same corpus cut another way has other pages.
        m = corpus.manifest
        key = f"{m.content_hash[:16]}-r{m.rows_per_page}-{tokenizer.hash[:16]}"
        self.cache = Path(cache_dir).expanduser() / "pages" / key
        self.memory: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._disk_bytes: int | None = None  # measured at the first write
        self.disk_reads = 0
        self.builds = 0

    @classmethod
    def open(cls, settings: Settings, index_source=None) -> Dataset:  # noqa: ANN001 - hub.IndexSource
        corpus = open_corpus(settings.data, settings.mechanism.rows_per_page, index_source)
        tok = load_tokenizer(settings.data, corpus, settings.model.vocab_size)
        pages = PageSettings.of(settings, corpus.num_pages)
        return cls(corpus, tok, settings.model.sequence_length, pages, settings.data.cache_dir,
                   settings.data.page_cache_bytes)  # fmt: skip

    @property
    def manifest(self) -> Manifest:
        return self.corpus.manifest

    @property
    def num_pages(self) -> int:
        return self.corpus.num_pages

    def sequences(self, page_ids: Sequence[int]) -> torch.LongTensor:
        """[n, sequence_length] int64: each page's rows, in the order of `page_ids`."""
        rows = [pack(self.page_tokens(i), self.sequence_length) for i in page_ids]
        if not rows:
            return torch.empty(0, self.sequence_length, dtype=torch.long)
        return torch.cat(rows).long()

    def page_tokens(self, page: int) -> torch.Tensor:
        """The page's whole token stream (int32): documents each followed by EOS."""
        if page in self.memory:
            self.memory.move_to_end(page)
            return self.memory[page]
        tokens = self._read(page)
        if tokens is None:
            tokens = self._build(page)
        self.memory[page] = tokens
        if len(self.memory) > MEMORY_PAGES:
            self.memory.popitem(last=False)
        return tokens

    def _path(self, page: int) -> Path:
        return self.cache / f"{page}.safetensors"

    def _build(self, page: int) -> torch.Tensor:
        docs = self.corpus.page(page)
        eos = self.tokenizer.eos_id
        flat: list[int] = []
        for ids in self.tokenizer.encode_batch(docs):
            flat.extend(ids)
            flat.append(eos)
        tokens = torch.tensor(flat, dtype=torch.int32)
        self._write(page, tokens)
        self.builds += 1
        return tokens

    def _write(self, page: int, tokens: torch.Tensor) -> None:
        meta = {"sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(), "page": str(page)}
        data = save({"tokens": tokens}, metadata=meta)
        write_atomic(self._path(page), data, durable=False)
        if self._disk_bytes is None:
            self._disk_bytes = sum(f.stat().st_size for f in self.cache.glob("*.safetensors"))
        else:
            self._disk_bytes += len(data)
        if self._disk_bytes > self.cache_bytes:
            self._evict()

    def _evict(self) -> None:
        """Delete the least recently used cached pages until they take at most 90% of the bound."""
        files = []
        for f in self.cache.glob("*.safetensors"):
            try:
                st = f.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total <= 0.9 * self.cache_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
        self._disk_bytes = total

    def _read(self, page: int) -> torch.Tensor | None:
        """The cached tokens, or None when absent or failing their hash (then rebuilt)."""
        self.corpus.page(page)  # a bad id fails here, before any file is touched
        path = self._path(page)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            size = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + size]).get("__metadata__", {})
            tokens = load(data)["tokens"]
        except (SafetensorError, ValueError, KeyError, UnicodeDecodeError):
            return None
        if tokens.dtype != torch.int32 or tokens.dim() != 1:
            return None
        if hashlib.sha256(tokens.numpy().tobytes()).hexdigest() != meta.get("sha256"):
            return None
        self.disk_reads += 1
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return tokens
