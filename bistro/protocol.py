"""The shared contract every node agrees on: windows, object keys, seeds, canonical JSON, signatures.

Nothing here touches a chain, a store, a clock or a device. Anything two nodes must agree on is
seeded from stable inputs through sha256 (never Python's `hash()`, never wall-clock randomness).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Protocol

FORMAT_VERSION = 6
"""Version of the delta and master object formats. 2: the topk2 codec, the mean merge and error
feedback 0.95 became the defaults (what a node of version 1 would merge differently). 3: the lowrank
codec is the default, and the mean merge takes a `Mixed` part as two means (low-rank part over every
sender, sparse values over theirs). 4: the publisher sends the merged update re-encoded with the
miners' codec and its own error feedback (`mechanism.master_codec`), a scored sample per window drawn
from the seed block, and LATEST.json carries the protocol settings. 5: low-rank parts are merged as
their stacked factors (other bits than a dense sum; the manifest's update sha256 hashes the factors),
and lowrank is every preset's codec. 6: `model_hash` hashes each tensor's sha256 (taken in
parallel), not one stream of every tensor's bytes."""

EVIDENCE_PAGES = 8
"""Local pages (and as many control pages) of a uid's own-page evidence in a near-copy group
(`Evaluator.own_page_evidence`): the first of its local pages' seeded order."""

PREFIX = "bistro"


# --- time ---------------------------------------------------------------------------------------


def window_of(block: int, blocks_per_window: int) -> int:
    """The window a block belongs to."""
    return block // blocks_per_window


def window_start(window: int, blocks_per_window: int) -> int:
    """First block of a window."""
    return window * blocks_per_window


def window_last_block(window: int, blocks_per_window: int) -> int:
    """Last block of a window."""
    return (window + 1) * blocks_per_window - 1


def upload_deadline(window: int, blocks_per_window: int, grace_blocks: int) -> int:
    """The first block at which an upload for `window` is late."""
    return (window + 1) * blocks_per_window + grace_blocks


def seed_block(window: int, blocks_per_window: int, grace_blocks: int) -> int:
    """The block whose hash seeds the window's eval, other and global pages: the upload deadline.

    It exists only once uploads are closed, so no miner can know which pages it will be judged on
    (or which global pages accept the master step) while it can still change its upload. (The
    window's last block, used before, exists `1 + grace_blocks` blocks too early.)"""
    return upload_deadline(window, blocks_per_window, grace_blocks)


# --- object keys --------------------------------------------------------------------------------

_SS58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{46,48}$")


def is_hotkey(text: str) -> bool:
    """Whether `text` looks like an ss58 address (so it is safe inside an object key)."""
    return bool(_SS58.match(text))


def delta_prefix(netuid: int) -> str:
    return f"{PREFIX}/{netuid}/deltas/"


def delta_key(netuid: int, window: int, hotkey: str) -> str:
    """Where a miner uploads its delta for a window, in its own bucket."""
    if not is_hotkey(hotkey):
        raise ValueError(f"not an ss58 hotkey: {hotkey!r}")
    return f"{PREFIX}/{netuid}/deltas/{window}/{hotkey}.safetensors"


def parse_delta_key(key: str) -> tuple[int, int, str] | None:
    """(netuid, window, hotkey) of a delta key, or None if `key` is not one."""
    m = re.fullmatch(rf"{PREFIX}/(\d+)/deltas/(\d+)/([1-9A-HJ-NP-Za-km-z]{{46,48}})\.safetensors", key)
    return (int(m[1]), int(m[2]), m[3]) if m else None


def master_prefix(netuid: int) -> str:
    return f"{PREFIX}/{netuid}/master/"


def checkpoint_key(netuid: int, window: int) -> str:
    """A full master checkpoint: the master in force from `window` on."""
    return f"{PREFIX}/{netuid}/master/checkpoint-{window}.safetensors"


def update_key(netuid: int, window: int) -> str:
    """The merged, signed update that turned master `window` into master `window + 1`."""
    return f"{PREFIX}/{netuid}/master/update-{window}.safetensors"


def latest_key(netuid: int) -> str:
    """Pointer to the newest checkpoint and update."""
    return f"{PREFIX}/{netuid}/master/LATEST.json"


def hub_index_key(netuid: int, key: str) -> str:
    """The publisher's signed copy of a hub corpus's row-group index (`data/hub.py`)."""
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise ValueError(f"not a hub index key: {key!r}")
    return f"{PREFIX}/{netuid}/data/hub-index-{key}.json"


# --- seeds --------------------------------------------------------------------------------------


def digest(*parts: Any) -> bytes:
    """sha256 of the parts, each written as its str() and separated so ("1","23") != ("12","3")."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def seed(*parts: Any) -> int:
    """A 63-bit seed from stable inputs (fits torch.Generator.manual_seed and numpy)."""
    return int.from_bytes(digest(*parts)[:8], "little") >> 1


# --- canonical JSON and signatures --------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The one byte string that a JSON document signs as: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


class Signer(Protocol):
    """Anything that signs like a Bittensor keypair (a wallet's hotkey)."""

    @property
    def ss58_address(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def sign(keypair: Signer, message: bytes) -> str:
    """sr25519 signature of `message` by `keypair`, hex encoded."""
    return bytes(keypair.sign(message)).hex()


def verify(hotkey: str, message: bytes, signature_hex: str) -> bool:
    """Whether `signature_hex` is `hotkey`'s signature of `message`. Never raises on bad input."""
    from bittensor_core import Keypair  # the SDK's own sr25519 binding

    try:
        signature = bytes.fromhex(signature_hex)
        if len(signature) != 64 or not is_hotkey(hotkey):
            return False
        return bool(Keypair(ss58_address=hotkey).verify(message, signature))
    except Exception:  # noqa: BLE001 - malformed keys or signatures are simply "not verified"
        return False


def sign_document(keypair: Signer, doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with `signer` and `signature` (over the canonical JSON of the rest)."""
    body = {k: v for k, v in doc.items() if k not in ("signature", "signer")}
    body["signer"] = keypair.ss58_address
    return {**body, "signature": sign(keypair, canonical_json(body))}


def verify_document(doc: dict[str, Any], hotkey: str) -> bool:
    """Whether `doc` was signed (by `sign_document`) by `hotkey`."""
    if not isinstance(doc, dict) or doc.get("signer") != hotkey:
        return False
    signature = doc.get("signature")
    if not isinstance(signature, str):
        return False
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        message = canonical_json(body)
    except (TypeError, ValueError):
        return False
    return verify(hotkey, message, signature)
