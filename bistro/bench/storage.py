"""`bistro bench storage`: put/get throughput of one large object through our stores, next to the
plainest way to do the same (raw file I/O; a default boto3 client's put_object/get_object) on the
same disk or the same loopback S3 endpoint (moto's server), in the same run. Target: ≥ 0.9× raw."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3

from ..config import Settings, StorageConfig
from ..localnet.s3server import start_s3_server
from ..storage.local import LocalStore
from ..storage.s3 import S3Store

MB = 1024 * 1024
TARGET = 0.9


def _mbps(size: int, fn: Callable[[], Any], repeats: int) -> float:
    """Median MB/s of `repeats` runs of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return size / MB / statistics.median(times)


def _raw_file_put(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:  # the same durability as LocalStore: fsync before done
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _row(name: str, value: float, baseline: float) -> dict[str, Any]:
    ratio = value / baseline
    return {"name": name, "value": value, "unit": "MB/s", "baseline": baseline, "ratio": ratio,
            "target": f">= {TARGET}", "ok": ratio >= TARGET}  # fmt: skip


def _pairs(size: int, repeats: int, ours: dict[str, Callable[[], Any]], raw: dict[str, Callable[[], Any]]):
    """Alternate ours and raw, op by op, so drift in the machine hits both alike."""
    out: dict[str, tuple[list[float], list[float]]] = {op: ([], []) for op in ours}
    for _ in range(repeats):
        for op in ours:
            out[op][0].append(_mbps(size, ours[op], 1))
            out[op][1].append(_mbps(size, raw[op], 1))
    return {op: (statistics.median(a), statistics.median(b)) for op, (a, b) in out.items()}


def _local(data: bytes, repeats: int) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="bistro-bench-") as tmp:
        store = LocalStore(tmp, "bench")
        raw = Path(tmp) / "raw.bin"
        store.put("obj", data)
        _raw_file_put(raw, data)
        ours = {"put": lambda: store.put("obj", data), "get": lambda: store.get("obj", max_bytes=len(data))}
        base = {"put": lambda: _raw_file_put(raw, data), "get": raw.read_bytes}
        return _pairs(len(data), repeats, ours, base)


def _s3(data: bytes, repeats: int, cfg: StorageConfig) -> dict[str, tuple[float, float]]:
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(k, v)  # moto accepts any key; real ones, if set, stay untouched
    server = start_s3_server()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        store_cfg = StorageConfig(
            **{**cfg.__dict__, "backend": "s3", "endpoint_url": server.url, "region": "us-east-1"}
        )
        store = S3Store(bucket, store_cfg)
        store.create_bucket()
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        store.put("obj", data)
        client.put_object(Bucket=bucket, Key="raw", Body=data)
        ours = {"put": lambda: store.put("obj", data), "get": lambda: store.get("obj", max_bytes=len(data))}
        base = {
            "put": lambda: client.put_object(Bucket=bucket, Key="raw", Body=data),
            "get": lambda: client.get_object(Bucket=bucket, Key="raw")["Body"].read(),
        }
        return _pairs(len(data), repeats, ours, base)
    finally:
        server.stop()


def run(settings: Settings, *, quick: bool) -> dict:
    size = (12 if quick else 50) * MB
    repeats = 2 if quick else 3
    data = os.urandom(size)
    cfg = settings.storage
    # one stream: what our wrapper costs over raw boto3 (the object is under the threshold)
    single = StorageConfig(**{**cfg.__dict__, "multipart_threshold": 2 * size})
    # parts: multipart upload and parallel ranged GETs, as the settings do above their threshold
    parted = StorageConfig(
        **{**cfg.__dict__, "multipart_threshold": max(5 * MB, min(cfg.multipart_threshold, size // 2))}
    )
    figures = {
        "local": _local(data, repeats),
        "s3": _s3(data, repeats, single),
        "s3 parts": _s3(data, repeats, parted),
    }
    rows = [
        _row(f"{where} {op} {size // MB}MB", ours, raw)
        for where, ops in figures.items()
        for op, (ours, raw) in ops.items()
    ]
    raw_figures = {
        f"{where} {op}": {"store_mbps": ours, "raw_mbps": raw}
        for where, ops in figures.items()
        for op, (ours, raw) in ops.items()
    }
    return {
        "rows": rows,
        "headline": {},
        "object_bytes": size,
        "repeats": repeats,
        "figures": raw_figures,
        # moto answers each ranged GET by copying the whole object under a per-key lock, and shares
        # our two CPUs, so the parts rows measure moto, not S3; they are here to show the path works
        "note": "parts rows on moto: ranged GETs each copy the whole object server-side",
    }
