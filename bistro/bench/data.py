"""Data and training throughput: the page pipeline, and the miner's Trainer against a plain loop.

- page pipeline: tokens/s that `Dataset.sequences` delivers from a warm disk cache (a fresh
  Dataset, so the in-memory LRU is cold) and from memory, next to the model's training tokens/s.
- hub pages: pages/s that an `hf:NAME@REVISION` corpus serves from parquet row groups through
  fsspec (a hub-layout directory written from the local corpus: the same code path as the Hugging
  Face Hub, without the network), raw documents with a cold row-group cache and tokenized pages.
- miner training: `Trainer.train` tokens/s for `tiny` and `small` next to a plain transformers loop
  (`model(input_ids, labels=...).loss`, backward, clip, `torch.optim.AdamW` step, zero_grad) on the
  same initial model, batch and sequences, in the same run; repeats interleave and medians count.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..config import Settings, build_settings, replace
from ..data import Dataset
from ..model import build_model
from ..training import Trainer


def _plain_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, seqs: torch.Tensor, steps: int, bs: int, clip: float) -> float:  # fmt: skip
    """Tokens/s of the textbook transformers + AdamW loop."""
    start = time.perf_counter()
    for i in range(steps):
        j = (i * bs) % (len(seqs) - bs + 1)
        batch = seqs[j : j + bs]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    float(loss)
    return steps * bs * seqs.shape[1] / (time.perf_counter() - start)


def _training_pair(settings: Settings, seqs: torch.Tensor, steps: int, repeats: int) -> dict[str, Any]:
    """Median tokens/s of the Trainer and of the plain loop, measured alternately."""
    t = settings.train
    trainer = Trainer(build_model(settings.model), t)
    plain = build_model(settings.model)
    opt = torch.optim.AdamW(
        plain.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )
    trainer.train(seqs, 2)  # warm both up (allocator, optimizer state)
    _plain_loop(plain, opt, seqs, 2, t.batch_size, t.grad_clip)
    ours, theirs = [], []
    for r in range(repeats):  # alternate which goes first, so drift in machine load hits both
        if r % 2:
            theirs.append(_plain_loop(plain, opt, seqs, steps, t.batch_size, t.grad_clip))
        ours.append(trainer.train(seqs, steps).tokens_per_s)
        if not r % 2:
            theirs.append(_plain_loop(plain, opt, seqs, steps, t.batch_size, t.grad_clip))
    return {"trainer": statistics.median(ours), "plain": statistics.median(theirs), "runs": [ours, theirs]}


def _pipeline(settings: Settings, pages: list[int], repeats: int) -> dict[str, float]:
    """Tokens/s of packed sequences from a warm disk cache and from memory."""
    Dataset.open(settings).sequences(pages)  # make sure the disk cache is warm
    disk, memory = [], []
    for _ in range(repeats):
        data = Dataset.open(settings)
        start = time.perf_counter()
        seqs = data.sequences(pages)
        disk.append(seqs.numel() / (time.perf_counter() - start))
        start = time.perf_counter()
        seqs = data.sequences(pages)
        memory.append(seqs.numel() / (time.perf_counter() - start))
    return {"disk": statistics.median(disk), "memory": statistics.median(memory)}


def _hub_pages(settings: Settings, quick: bool) -> dict[str, float]:
    """Pages/s of a hub corpus on a local hub-layout directory: documents, then tokenized pages."""
    import random
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data import open_corpus

    docs = list(open_corpus(settings.data, settings.mechanism.rows_per_page).documents)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "hub" / "datasets" / "bench" / "corpus@pinned" / "data"
        base.mkdir(parents=True)
        per = -(-len(docs) // 4)
        for f in range(4):
            table = pa.table({"text": docs[f * per : (f + 1) * per]})
            pq.write_table(table, base / f"train-{f:05d}.parquet", row_group_size=256)
        s = replace(settings, **{"data.corpus": "hf:bench/corpus@pinned", "data.hub_root": str(Path(tmp) / "hub"),
                                 "data.cache_dir": str(Path(tmp) / "cache")})  # fmt: skip
        data = Dataset.open(s)
        pages = random.Random(0).sample(range(data.num_pages), min(data.num_pages, 32 if quick else 128))
        data.corpus.documents.recent.clear()
        start = time.perf_counter()
        for p in pages:
            data.corpus.page(p)
        raw = len(pages) / (time.perf_counter() - start)
        data.corpus.documents.recent.clear()
        start = time.perf_counter()
        data.sequences(pages)
        tokenized = len(pages) / (time.perf_counter() - start)
    return {"raw": raw, "tokenized": tokenized, "pages": len(pages)}


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    threads = settings.train.threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(settings, quick, threads)
    finally:
        torch.set_num_threads(previous)


def _run(settings: Settings, quick: bool, threads: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"threads": threads}
    steps, repeats = (5, 4) if quick else (10, 8)
    for preset in ("tiny", "small"):
        s = replace(
            build_settings(preset),
            **{"data.cache_dir": settings.data.cache_dir, "data.corpus": settings.data.corpus},
        )
        data = Dataset.open(s)
        seqs = data.sequences(list(range(4)))
        pair = _training_pair(s, seqs, steps, repeats)
        raw[f"train_{preset}"] = pair
        rows.append(
            {"name": f"miner training tokens/s ({preset})", "value": pair["trainer"], "unit": "tok/s",
             "baseline": pair["plain"], "ratio": pair["trainer"] / pair["plain"], "target": ">= 0.95",
             "ok": pair["trainer"] >= 0.95 * pair["plain"]}
        )  # fmt: skip
        if preset == "tiny":
            pipe = _pipeline(s, list(range(8, 8 + (16 if quick else 64))), repeats)
            raw["pipeline"] = pipe
            for where in ("disk", "memory"):
                rows.append(
                    {"name": f"page pipeline tokens/s ({where}) vs tiny training", "value": pipe[where],
                     "unit": "tok/s", "baseline": pair["trainer"], "ratio": pipe[where] / pair["trainer"],
                     "target": ">= 100", "ok": pipe[where] >= 100 * pair["trainer"]}
                )  # fmt: skip
    hub = _hub_pages(build_settings("tiny", overrides={"data.cache_dir": settings.data.cache_dir}), quick)
    raw["hub_pages"] = hub
    for kind in ("raw", "tokenized"):
        rows.append({"name": f"hub pages/s ({kind}, parquet row groups via fsspec)", "value": hub[kind],
                     "unit": "pages/s", "baseline": None, "ratio": None, "target": None, "ok": None})  # fmt: skip
    return {"rows": rows, **raw, "headline": {"train_ratio_tiny": rows[0]["ratio"]}}
