"""Catch-up of a late joiner: `python -m bistro.bench.catchup [--preset small] [--windows 50]`.

A `Publisher` writes θ_0 (a checkpoint) and `windows` signed merged updates to a `LocalStore` in a
temporary directory, each a sparse update over ~4% of the positions (what a window's merge of
four helpful miners' 1% top-k deltas publishes); then a fresh process builds the model and `Follower.sync`s from
nothing to θ_windows, as a node that joins late does. Reported: seconds, the process's peak
resident memory over its resident memory just before the sync (what catching up costs on top of
holding the model), torch's own allocations during the sync (`plan.measure_peak`), and the model's
size for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bittensor_core
import torch

from ..config import build_settings
from ..delta import Sparse
from ..master import Follower, Publisher, apply_update
from ..model import build_model, model_hash, state_tensors
from ..storage.local import LocalStore

NETUID = 212
KEY = bittensor_core.Keypair.create_from_uri("//Alice")


def publish(root: Path, preset: str, windows: int) -> str:
    """θ_0 and `windows` updates in `root`'s bucket `publisher`; returns the final hash."""
    settings = build_settings(preset)
    params = state_tensors(build_model(settings.model))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    store, pub = LocalStore(root, "publisher"), Publisher(LocalStore(root, "publisher"), KEY, NETUID)
    digest = model_hash(params)
    pub.checkpoint(0, params, digest)
    g = torch.Generator().manual_seed(0)
    for w in range(windows):
        update = {}
        for name, shape in shapes.items():  # ~4% of positions: four miners' 1% top-k, barely overlapping
            n = math.prod(shape)
            idx = torch.unique(torch.randint(n, (max(1, n // 25),), generator=g))
            update[name] = Sparse(idx, torch.randn(len(idx), generator=g) * 1e-3)
        apply_update(params, update)
        new = model_hash(params)
        pub.update(w, update, digest, new, uids=[1, 2, 3, 4])
        digest = new
    pub.latest(windows, digest, [0])
    del store
    return digest


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process's resident set (Linux); its size now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak_rss() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def follow(root: Path, preset: str) -> dict:
    """In this process: build the model, then catch up from nothing; figures as a dict."""
    from ..plan import measure_peak

    settings = build_settings(preset)
    params = state_tensors(build_model(settings.model))
    param_bytes = sum(v.numel() * 4 for v in params.values())
    follower = Follower(NETUID, {k: tuple(v.shape) for k, v in params.items()}, param_bytes)
    store = LocalStore(root, "publisher")
    before = _reset_peak_rss()
    start = time.perf_counter()
    position = follower.sync(store, KEY.ss58_address, params, None)
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss()
    tensors, _ = measure_peak(lambda: follower.sync(store, KEY.ss58_address, params, None))
    return {"preset": preset, "windows": position.window, "hash": position.hash, "seconds": seconds,
            "param_bytes": param_bytes, "rss_over_model_bytes": peak_rss - before,
            "torch_peak_bytes": tensors}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--windows", type=int, default=50)
    parser.add_argument("--follow", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.follow:
        print(json.dumps(follow(Path(args.follow), args.preset)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        digest = publish(Path(tmp), args.preset, args.windows)
        out = subprocess.run([sys.executable, "-m", "bistro.bench.catchup", "--preset", args.preset, "--follow", tmp],
                             check=True, capture_output=True, text=True)  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        blobs = sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
    result["hash_ok"] = result.pop("hash") == digest
    result["published_bytes"] = blobs
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
