"""Tokenizer and packed page sequences: determinism across processes, cache hits, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from bistro.config import build_settings, replace
from bistro.data import Dataset, PageOutOfRange, pack
from bistro.data.tokenizer import TokenizerError, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    # one cache for the session's data tests: the BPE trains once (a few seconds)
    cache = tmp_path_factory.getbasetemp() / "bistro-data-cache"
    return build_settings("tiny", overrides={"data.cache_dir": str(cache)})


@pytest.fixture(scope="module")
def data(settings):
    return Dataset.open(settings)


def test_tokenizer_round_trip(data):
    tok = data.tokenizer
    assert tok.vocab_size == 4096 and tok.eos_id == 0 and len(tok.hash) == 64
    text = data.corpus.page(3)[0]
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text and 0 not in ids
    # BPE compresses Shakespeare well below one token per 2 bytes
    assert len(ids) < len(text.encode()) / 2.5


def test_sequences_shape_and_packing(data):
    seqs = data.sequences([5, 2, 5])
    per_page = [pack(data.page_tokens(p), 128) for p in (5, 2, 5)]
    assert seqs.dtype == torch.long and seqs.shape[1] == 128
    assert torch.equal(seqs, torch.cat(per_page).long())
    # a page is its documents each followed by EOS, packed without padding, the tail dropped
    flat = []
    for ids in data.tokenizer.encode_batch(data.corpus.page(2)):
        flat += ids + [data.tokenizer.eos_id]
    n = len(flat) // 128
    assert n >= 1 and per_page[1].flatten().tolist() == flat[: n * 128]
    assert data.sequences([]).shape == (0, 128)


def test_every_page_gives_a_sequence(data):
    assert all(len(data.sequences([p])) >= 1 for p in range(0, data.num_pages, 37))
    short = pack(torch.arange(5, dtype=torch.int32), 12)
    assert short.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]]


def test_cache_hit_and_memory_lru(settings, data):
    first = data.sequences([7])
    again = Dataset.open(settings)  # a new process would see only the disk cache
    builds = again.builds
    assert torch.equal(again.sequences([7]), first)
    assert again.builds == builds and again.disk_reads == 1
    again.sequences([7])
    assert again.disk_reads == 1  # the second ask is served from memory


def test_corrupted_entry_is_rebuilt(settings, data):
    good = data.sequences([11])
    path = data.cache / "11.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the token bytes: the header still parses
    path.write_bytes(bytes(raw))
    fresh = Dataset.open(settings)
    assert torch.equal(fresh.sequences([11]), good) and fresh.builds == 1
    assert torch.equal(Dataset.open(settings).sequences([11]), good)  # rewritten whole
    path.write_bytes(b"\x00garbage")
    fresh = Dataset.open(settings)
    assert torch.equal(fresh.sequences([11]), good) and fresh.builds == 1


def test_bad_page_and_vocab(settings, data):
    with pytest.raises(PageOutOfRange):
        data.sequences([data.num_pages])
    with pytest.raises(PageOutOfRange):
        data.sequences([-1])
    with pytest.raises(TokenizerError, match="more than model.vocab_size"):
        _too_small(settings, data)
    with pytest.raises(TokenizerError):
        load_tokenizer(
            replace(settings, **{"data.tokenizer": "/nonexistent/tokenizer"}).data, data.corpus, 4096
        )


def _too_small(settings, data):
    # a tokenizer file with 4096 tokens cannot serve a model with 1000
    path = data.cache.parent / "tok.json"
    data.tokenizer.tokenizer.save(str(path))
    load_tokenizer(replace(settings, **{"data.tokenizer": str(path)}).data, data.corpus, 1000)


def test_hugging_face_tokenizer_from_file(settings, data):
    path = data.cache.parent / "tok2.json"
    data.tokenizer.tokenizer.save(str(path))
    tok = load_tokenizer(replace(settings, **{"data.tokenizer": str(path)}).data, data.corpus, 4096)
    assert tok.eos_id == 0 and tok.encode_batch(["to be"]) == data.tokenizer.encode_batch(["to be"])


SCRIPT = """
import hashlib, json, sys
from bistro.config import build_settings
from bistro.data import Dataset
s = build_settings("tiny", overrides={"data.cache_dir": sys.argv[1]})
d = Dataset.open(s)
seqs = d.sequences([3, 1, 400])
print(json.dumps({"manifest": d.manifest.content_hash, "tok": d.tokenizer.hash,
                  "seqs": hashlib.sha256(seqs.numpy().tobytes()).hexdigest()}))
"""


@pytest.mark.slow
def test_same_tokens_in_two_processes(tmp_path, settings, data):
    # one process with a fresh cache trains its own BPE; the other reads this session's cache
    caches = [str(tmp_path / "fresh"), settings.data.cache_dir]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, cache],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": str(i), "RAYON_NUM_THREADS": str(i + 1)},
        )
        for i, cache in enumerate(caches)
    ]
    out = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert out[0] == out[1]
    assert out[0]["tok"] == data.tokenizer.hash
    assert out[0]["seqs"] == hashlib.sha256(data.sequences([3, 1, 400]).numpy().tobytes()).hexdigest()


def test_pages_of_another_cut_do_not_share_a_cache(tmp_path) -> None:
    """The same corpus cut into pages of 2 and of 8 documents: page 0 differs, and so must its cache."""
    from bistro.config import build_settings
    from bistro.data import Dataset

    def page0(rows: int):
        s = build_settings("tiny", None, {"data.cache_dir": str(tmp_path), "mechanism.rows_per_page": rows})
        ds = Dataset.open(s)
        return ds, ds.sequences([0])

    small, a = page0(2)
    large, b = page0(8)
    assert small.cache != large.cache
    assert len(b) > len(a)
