"""Security: no unsafe loaders, no secrets in logs or errors, and only the top validator's
signature moves the master."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from bistro import protocol
from bistro.delta.signed import unpack_signed
from bistro.storage.base import StorageError

from ..support.reliability_kit import FIRST, LAST, honest_blob, make_miner, make_world, publish_master

ROOT = Path(__file__).resolve().parents[2] / "bistro"
SENTINEL = "SENTINEL-secret-9f3c1e7a"

# --- static guard ---------------------------------------------------------------------------------

UNSAFE_CALLS = {
    ("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
    ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("shelve", "open"), ("joblib", "load"), ("pandas", "read_pickle"), ("pd", "read_pickle"),
}  # fmt: skip
UNSAFE_MODULES = {"pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")  # "?": a call result, e.g. m.eval()
    return tuple(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe deserialisation or dynamic code execution in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    found.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in (("eval",), ("exec",), ("compile",), ("__import__",)):
            found.append((node.lineno, f"{name[0]}("))
        elif name in UNSAFE_CALLS or name in {("torch", "serialization", "load")}:
            found.append((node.lineno, ".".join(name)))
        elif name == ("yaml", "load") and "Safe" not in ast.unparse(_kw(node, "Loader") or ast.Name("")):
            found.append((node.lineno, "yaml.load without SafeLoader"))
        elif name in (("np", "load"), ("numpy", "load")):
            allow = _kw(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, "numpy.load(allow_pickle=...)"))
        elif _kw(node, "trust_remote_code") is not None:
            value = _kw(node, "trust_remote_code")
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append((node.lineno, "trust_remote_code"))
    return found


def test_no_unsafe_loader_or_eval_in_bistro() -> None:
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line}: {what}"
        for path in sorted(ROOT.rglob("*.py"))
        for line, what in unsafe_uses(path.read_text())
    ]
    assert not bad, "unsafe deserialisation or code execution:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(f)",
        "import pickle",
        "from pickle import loads",
        "x = eval(s)",
        "exec(code)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "AutoTokenizer.from_pretrained(n, trust_remote_code=True)",
    ],
)
def test_the_guard_finds_each_pattern(source: str) -> None:
    assert unsafe_uses(source)


def test_the_guard_passes_safe_code() -> None:
    safe = "model.eval()\nyaml.load(t, Loader=yaml.SafeLoader)\nnp.load(f)\nsafetensors.torch.load(b)"
    assert unsafe_uses(safe) == []


# --- secrets --------------------------------------------------------------------------------------


def wallet_secrets(settings) -> list[str]:
    """The private parts of a passwordless hotkey file (the SDK writes JSON)."""
    w = settings.wallet
    doc = json.loads((Path(w.path) / w.name / "hotkeys" / w.hotkey).read_text())
    return [str(doc[k]) for k in ("secretPhrase", "secretSeed", "privateKey") if doc.get(k)]


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch):
    from bistro.storage import s3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASENTINEL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for cached in (s3._session, s3._has_credentials, s3._client):
        cached.cache_clear()
    yield
    for cached in (s3._session, s3._has_credentials, s3._client):
        cached.cache_clear()


def test_secrets_stay_out_of_logs_and_errors(
    tmp_path: Path, sentinel_env, caplog: pytest.LogCaptureFixture
) -> None:
    from bistro.config import StorageConfig
    from bistro.storage.s3 import S3Store
    from bistro.validator import Validator

    caplog.set_level(logging.DEBUG)
    # 1. an S3 failure path: nothing listens on the endpoint; retries, then StorageError
    store = S3Store(
        "bucket-x", StorageConfig(backend="s3", timeout=1.0, retries=1), endpoint_url="http://127.0.0.1:9"
    )
    with pytest.raises(StorageError) as info:
        store.get("k")
    errors = [str(info.value), repr(info.value), repr(store)]
    # 2. a miner and a validator start, train, upload and score; c's commitment fails over S3
    world = make_world(tmp_path, ["a", "c"])
    world.set_commitment("c", "http://127.0.0.1:9/bucket-c")
    miner = make_miner(world, "a")
    world.put("a", FIRST, honest_blob(miner, world, FIRST))
    validator = Validator(world.members["val"].settings)
    validator.evaluate(FIRST)
    text = "\n".join([caplog.text, *errors, (validator.state_dir / "windows.jsonl").read_text(),
                      (validator.state_dir / "state.json").read_text()])  # fmt: skip
    assert "peer_error" in text or "timeout" in text  # the failure path did run
    secrets = [
        SENTINEL,
        *wallet_secrets(world.members["val"].settings),
        *wallet_secrets(world.members["a"].settings),
    ]
    assert len(secrets) >= 3
    for secret in secrets:
        assert secret not in text


# --- signatures -----------------------------------------------------------------------------------


def test_everything_published_is_signed_by_its_author(tmp_path: Path, honest_blobs) -> None:
    """The top validator (publisher) scores a window; every object in every bucket verifies."""
    from bistro.delta.wire import expectation
    from bistro.validator import Validator

    world = make_world(tmp_path, ["a"])
    world.put("a", FIRST, honest_blobs.get(world, "a", FIRST))
    top = Validator(world.members["top"].settings)
    top.evaluate(FIRST)
    from bistro.delta.wire import decode_delta
    from bistro.validator import canary_key

    netuid, n = world.settings.chain.netuid, 0
    for name, member in world.members.items():
        for info in world.store(name).list():
            blob = world.store(name).get(info.key)
            n += 1
            if info.key in (protocol.latest_key(netuid), canary_key(netuid)):
                assert protocol.verify_document(json.loads(blob), member.hotkey)
            elif info.key.startswith(protocol.master_prefix(netuid)):
                doc, _ = unpack_signed(blob, signer=member.hotkey, max_bytes=1 << 30)
                assert doc["signer"] == member.hotkey
            else:
                _, window, hotkey = protocol.parse_delta_key(info.key)
                assert hotkey == member.hotkey
                exp = expectation(world.settings, window, hotkey, world.master_hash, top.shapes)
                decode_delta(blob, exp)
    assert n >= 2 + (LAST + 1 - FIRST) + 1


def forge(world, what: str) -> None:
    """Replace part of the top validator's master with objects signed by another hotkey."""
    netuid, store = world.settings.chain.netuid, world.store("top")
    mallory = world.members["val"]
    genuine = {info.key: store.get(info.key) for info in store.list(protocol.master_prefix(netuid))}
    for key in genuine:
        store.delete(key)
    publish_master(world, signer=mallory)  # the whole master, signed by the wrong hotkey
    forged = {info.key: store.get(info.key) for info in store.list(protocol.master_prefix(netuid))}
    keep_forged = {
        "everything": set(forged),
        "LATEST": {protocol.latest_key(netuid)},
        "checkpoint": {protocol.checkpoint_key(netuid, FIRST)},
        "one update": {protocol.update_key(netuid, FIRST + 1)},
    }[what]
    for key, blob in genuine.items():
        store.put(key, forged[key] if key in keep_forged else blob)


@pytest.mark.parametrize("what", ["everything", "LATEST", "checkpoint", "one update"])
def test_a_master_not_signed_by_the_top_validator_is_refused(
    tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    world = make_world(tmp_path, ["a"])
    forge(world, what)
    miner = make_miner(world, "a")
    caplog.set_level(logging.INFO)
    target = FIRST + 2
    assert miner.sync_master(miner.master, None, target, world.chain.metagraph()) is None
    assert "not available" in caplog.text
    assert miner.position is None


def test_a_genuine_master_is_followed(tmp_path: Path) -> None:
    """The control for the refusals above."""
    world = make_world(tmp_path, ["a"])
    miner = make_miner(world, "a")
    position = miner.sync_master(miner.master, None, FIRST + 2, world.chain.metagraph())
    assert position is not None and position.hash == world.master_hash
