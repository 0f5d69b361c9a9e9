"""Corpus sources, manifest and bad input."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bistro.config import DataConfig
from bistro.data.corpus import CorpusError, PageOutOfRange, content_hash, open_corpus, passages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cfg(corpus: str, tmp_path) -> DataConfig:
    return DataConfig(corpus=corpus, cache_dir=str(tmp_path / "cache"))


def test_shakespeare_manifest_and_pages(tmp_path):
    c = open_corpus(cfg("shakespeare", tmp_path), rows_per_page=8)
    m = c.manifest
    assert m.name == "shakespeare" and m.rows_per_page == 8
    assert m.num_documents > 3000 and m.num_pages == m.num_documents // 8
    assert m.content_hash == content_hash(c.documents)
    # every document is a passage of about 1.5 KB, none empty, no Gutenberg licence
    assert all(0 < len(d) < 4000 for d in c.documents)
    assert not any("Project Gutenberg" in d for d in c.documents)
    # pages tile the corpus in order; the last one takes the ragged tail
    joined = [d for i in range(c.num_pages) for d in c.page(i)]
    assert joined == list(c.documents)
    assert len(c.page(c.num_pages - 1)) == 8 + m.num_documents % 8


def test_cached_corpus_is_the_same(tmp_path):
    first = open_corpus(cfg("shakespeare", tmp_path), 8)
    assert list((tmp_path / "cache" / "corpus" / first.manifest.content_hash).iterdir())
    second = open_corpus(cfg("shakespeare", tmp_path), 8)
    assert second.manifest == first.manifest and second.page(5) == first.page(5)


def test_passages_cut_at_lines():
    text = "\n".join(f"line {i:04d} " + "x" * 50 for i in range(200))
    parts = passages(text, size=600)
    assert "\n".join(parts) == text
    assert all(p.startswith("line ") for p in parts)
    assert all(len(p) >= 600 - 1 for p in parts[:-1])


def test_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first block\nstill first\n\n\nsecond block\n\n")
    (tmp_path / "b.txt").write_text("third\n")
    c = open_corpus(cfg(str(tmp_path / "*.txt"), tmp_path), rows_per_page=2)
    assert list(c.documents) == ["first block\nstill first", "second block", "third"]
    assert c.num_pages == 1 and c.page(0) == list(c.documents)

    rows = [{"text": f"doc {i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = open_corpus(cfg(str(tmp_path / "d.jsonl"), tmp_path), rows_per_page=2)
    assert c.num_pages == 2 and c.page(1) == ["doc 2", "doc 3", "doc 4"]

    pq.write_table(
        pa.table({"text": [f"p{i}" for i in range(4)], "id": list(range(4))}), tmp_path / "e.parquet"
    )
    c = open_corpus(cfg(str(tmp_path / "e.parquet"), tmp_path), rows_per_page=2)
    assert c.page(1) == ["p2", "p3"]


def test_changed_file_is_rebuilt(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n")
    a = open_corpus(cfg(str(path), tmp_path), 1)
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    b = open_corpus(cfg(str(path), tmp_path), 1)
    assert b.manifest.num_documents == 2 and b.manifest.content_hash != a.manifest.content_hash


def test_bad_input(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        open_corpus(cfg(str(tmp_path / "missing.txt"), tmp_path), 8)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="no documents"):
        open_corpus(cfg(str(tmp_path / "empty.txt"), tmp_path), 8)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "notext.parquet")
    with pytest.raises(CorpusError, match="no `text` column"):
        open_corpus(cfg(str(tmp_path / "notext.parquet"), tmp_path), 8)
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(CorpusError, match="text"):
        open_corpus(cfg(str(tmp_path / "bad.jsonl"), tmp_path), 8)
    with pytest.raises(CorpusError, match="no corpus files"):
        open_corpus(cfg(str(tmp_path / "*.nothing"), tmp_path), 8)

    (tmp_path / "ok.txt").write_text("a\n\nb\n\nc\n")
    c = open_corpus(cfg(str(tmp_path / "ok.txt"), tmp_path), 1)
    for bad in (-1, 3, 100):
        with pytest.raises(PageOutOfRange):
            c.page(bad)
    assert isinstance(PageOutOfRange("x"), IndexError)
