"""The SDK's own test harness, taken from the installed `bittensor`'s source release.

The SDK's chain-access seam is its `Substrate` protocol; its source release ships an in-memory
implementation (`tests/harness/fake_substrate.py`), a JSON-RPC websocket node
(`tests/harness/fake_node.py`), the runtime metadata of a recorded chain (`tests/fixtures/golden.json`,
decoded by `tests/conftest.py`) and a corpus of values of every runtime type
(`tests/fixtures/shape_corpus/corpus.json`). It is a dependency, never copied into this repository:
`make sdk-src` (or the first test that needs it) runs

    pip download --no-binary :all: --no-deps bittensor==<installed version> -d <cache>

and unpacks it under `$BISTRO_SDK_SRC` (default `~/.cache/bistro/sdk-src`). The SDK's modules are
loaded from there by file path under the name `bittensor_harness.*`, so they never shadow our own
`tests` package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

CACHE = Path(os.environ.get("BISTRO_SDK_SRC", Path.home() / ".cache" / "bistro" / "sdk-src"))


def sdk_version() -> str:
    return importlib.metadata.version("bittensor")


def fetch_source(cache: Path = CACHE) -> Path:
    """The unpacked source release of the installed SDK, downloaded on first use."""
    version = sdk_version()
    root = cache / f"bittensor-{version}"
    if (root / "tests" / "harness" / "fake_substrate.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"bittensor-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             f"bittensor=={version}", "-d", str(cache)],
            check=True, timeout=600,
        )  # fmt: skip
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    if not (root / "tests" / "harness" / "fake_substrate.py").is_file():
        raise RuntimeError(f"{sdist} has no tests/harness: this SDK release does not ship its harness")
    return root


def _load(name: str, path: Path) -> ModuleType:
    full = f"bittensor_harness.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


@cache
def harness() -> dict[str, ModuleType]:
    """`fake_substrate`, `fake_node`, `samples` and the SDK's `conftest` (golden codec)."""
    root = fetch_source() / "tests"
    return {
        "fake_substrate": _load("fake_substrate", root / "harness" / "fake_substrate.py"),
        "fake_node": _load("fake_node", root / "harness" / "fake_node.py"),
        "samples": _load("samples", root / "harness" / "samples.py"),
        "conftest": _load("conftest", root / "conftest.py"),
    }


@cache
def shape_sample(type_name: str) -> dict[str, Any]:
    """The first recorded value of a runtime type, as the codec decodes it."""
    corpus = json.loads((fetch_source() / "tests" / "fixtures" / "shape_corpus" / "corpus.json").read_text())
    for entry in corpus["types"]:
        if entry["name"] == type_name:
            return entry["samples"][0]["decoded"]
    raise KeyError(type_name)


def through_codec(api: str, method: str, value: Any) -> Any:
    """`value` encoded as the runtime API's output by the recorded runtime, then decoded by the
    transport: exactly the shape a live node's answer takes."""
    from bittensor._transport.runtime_api import decode_runtime_api_result

    codec = harness()["conftest"].golden_codec()
    output = codec.runtime_api_map[api][method]["output"]
    return decode_runtime_api_result(codec, api, method, codec.encode(output, value))
