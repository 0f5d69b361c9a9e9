"""The master model: published by the top-stake validator, followed by everyone else.

Masters are numbered by the window in which miners train from them: θ_w. Right after window w's
upload deadline, the validator scores the deltas of window w on θ_w (the master they were trained
from) and computes θ_{w+1} = θ_w + U_w, where U_w is the merged update of the deltas that helped,
kept only if it lowers the global loss (DESIGN.md "Mechanism" step 8). Miners of window w+1 wait for
θ_{w+1} before they train.

Why not pipeline (train window w+1 from θ_w while the validator works, and apply those deltas to
θ_{w+1})? Measured on the tiny localnet: a delta applied one master late double-steps along the
direction the previous update already took; from window 10 on honest deltas scored negative in
half the windows, the master step was refused, and the weights went to noise. Waiting costs the
miner the grace period plus the validator's scoring time at the start of each window.

In the publisher's bucket (DESIGN.md "Master"):

    bistro/{netuid}/master/checkpoint-{w}.safetensors   θ_w in full, every `checkpoint_every` windows
    bistro/{netuid}/master/update-{w}.safetensors       U_w, turning θ_w into θ_{w+1}, every window
    bistro/{netuid}/master/LATEST.json                  newest window and hash, newest checkpoint

Every object is signed by the publisher's hotkey; followers refuse anything else. Catching up =
the newest checkpoint at or below the target, then each update after it, then a hash check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import protocol
from .config import ProtocolSettings
from .delta import Delta, Sparse, add_
from .delta.signed import SignedObjectError, check_signed, pack_signed, tensor_views
from .model import Params, model_hash
from .storage.base import NotFound, Store

log = logging.getLogger("bistro.master")


class MasterError(Exception):
    """The master cannot be followed: missing, not signed by the expected hotkey, or a wrong hash."""


class ProtocolMismatch(Exception):
    """The publisher's protocol settings differ from ours: this node cannot follow it (a setting to
    change, not a window to wait out), so it stops and says which fields differ."""


@dataclass(frozen=True)
class Position:
    """Which master a node holds."""

    window: int
    hash: str


# --- updates as tensors --------------------------------------------------------------------------


def update_to_tensors(update: Delta) -> dict[str, torch.Tensor]:
    """A merged update as named tensors: `<param>::i` / `<param>::v` (sparse) or `<param>::d`."""
    out: dict[str, torch.Tensor] = {}
    for name, part in update.items():
        if isinstance(part, Sparse):
            out[f"{name}::i"] = part.indices.to(torch.int64).contiguous()
            out[f"{name}::v"] = part.values.to(torch.float32).contiguous()
        else:
            out[f"{name}::d"] = part.to(torch.float32).contiguous()
    return out


def update_from_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Delta:
    """Inverse of `update_to_tensors`, refusing names, shapes or positions the model does not have."""
    update: Delta = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition("::")
        if name not in shapes or kind not in ("i", "v", "d"):
            raise MasterError(f"update names unknown tensor {key!r}")
        numel = int(torch.Size(shapes[name]).numel())
        if kind == "d":
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise MasterError(f"update {key}: shape {tuple(tensor.shape)} != {shapes[name]}")
            update[name] = tensor.float()
        elif kind == "i":
            values = tensors.get(f"{name}::v")
            idx = tensor.to(torch.int64)
            if values is None or values.shape != idx.shape or idx.ndim != 1:
                raise MasterError(f"update {name}: indices and values do not pair")
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise MasterError(f"update {name}: index out of range")
            update[name] = Sparse(idx, values.float())
    if not all(torch.isfinite(p.values if isinstance(p, Sparse) else p).all() for p in update.values()):
        raise MasterError("update has non-finite values")
    return update


def load_params(params: Params, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy a full checkpoint into the model's own tensors (names and shapes must match exactly)."""
    if set(tensors) != set(params):
        raise MasterError("checkpoint tensor names do not match the model")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise MasterError(
                    f"checkpoint {name}: {tuple(t.shape)} {t.dtype} != {tuple(p.shape)} {p.dtype}"
                )
            p.copy_(t)


def apply_update(params: Params, update: Delta) -> None:
    """θ ← θ + U, the one way every node applies an update (so all get the same bits)."""
    with torch.no_grad():
        add_(params, update, 1.0)


# --- publishing ----------------------------------------------------------------------------------


class Publisher:
    """Writes master objects to the top validator's own bucket, signed by its hotkey."""

    def __init__(
        self, store: Store, keypair: protocol.Signer, netuid: int, settings: ProtocolSettings | None = None
    ) -> None:
        self.store, self.keypair, self.netuid = store, keypair, netuid
        self.settings = settings
        """The protocol settings signed into LATEST.json (followers refuse a publisher that differs)."""

    def _doc(self, kind: str, window: int, **fields: object) -> dict:
        return {"kind": kind, "netuid": self.netuid, "window": window, **fields}

    def checkpoint(self, window: int, params: Params, digest: str) -> None:
        tensors = {k: v.detach() for k, v in params.items()}
        blob = pack_signed(tensors, self._doc("checkpoint", window, hash=digest), self.keypair)
        self.store.put(protocol.checkpoint_key(self.netuid, window), blob)

    def update(
        self, window: int, update: Delta | None, base_hash: str, result_hash: str, **info: object
    ) -> None:
        """U_window (None: θ_{window+1} = θ_window)."""
        tensors = update_to_tensors(update) if update else {}
        doc = self._doc(
            "update",
            window,
            base_hash=base_hash,
            result_hash=result_hash,
            accepted=update is not None,
            **info,
        )
        self.store.put(protocol.update_key(self.netuid, window), pack_signed(tensors, doc, self.keypair))

    def prune(self, checkpoints: list[int]) -> None:
        """Delete checkpoints not in `checkpoints` and updates older than the oldest kept one."""
        oldest = min(checkpoints)
        for info in self.store.list(protocol.master_prefix(self.netuid)):
            name = info.key.rsplit("/", 1)[-1]
            kind, _, rest = name.partition("-")
            window = rest.split(".")[0]
            if not window.isdigit():
                continue
            if (kind == "checkpoint" and int(window) not in checkpoints) or (
                kind == "update" and int(window) < oldest
            ):
                self.store.delete(info.key)

    def _protocol(self) -> dict:
        if self.settings is None:
            return {}
        return {"protocol": self.settings.as_dict(), "protocol_hash": self.settings.digest}

    def latest(self, window: int, digest: str, checkpoints: list[int]) -> None:
        """Point at θ_window; `checkpoints` lists the retained checkpoint windows, newest last."""
        doc = protocol.sign_document(
            self.keypair,
            self._doc(
                "latest", window, hash=digest, checkpoint=max(checkpoints), checkpoints=sorted(checkpoints),
                version=protocol.FORMAT_VERSION, **self._protocol(),
            ),
        )  # fmt: skip
        self.store.put(protocol.latest_key(self.netuid), json.dumps(doc).encode())


# --- following -----------------------------------------------------------------------------------


class Follower:
    """Catches a model up to θ_w from the publisher's bucket, checking signatures and hashes."""

    def __init__(
        self,
        netuid: int,
        shapes: Mapping[str, tuple[int, ...]],
        param_bytes: int,
        settings: ProtocolSettings | None = None,
    ) -> None:
        self.netuid = netuid
        self.settings = settings
        """Our protocol settings: a LATEST.json signed with others raises ProtocolMismatch."""
        self.shapes = dict(shapes)
        self.max_checkpoint = int(param_bytes * 1.05) + (1 << 20)
        self.max_update = 2 * self.max_checkpoint + (1 << 20)

    def latest(self, store: Store, signer: str) -> dict | None:
        """The publisher's LATEST.json, if there is one signed by `signer`."""
        try:
            raw = store.get(protocol.latest_key(self.netuid), max_bytes=64 * 1024)
        except NotFound:
            return None
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MasterError("LATEST.json does not parse") from None
        if not protocol.verify_document(doc, signer):
            raise MasterError(f"LATEST.json is not signed by the top validator {signer[:10]}…")
        if doc.get("netuid") != self.netuid or not isinstance(doc.get("window"), int):
            raise MasterError("LATEST.json is for another subnet or malformed")
        self.check_protocol(doc)
        return doc

    def check_protocol(self, latest: Mapping) -> None:
        """Raise ProtocolMismatch, naming the fields, if the publisher's signed protocol settings
        differ from ours (a LATEST.json without them, from an older publisher, is not checked)."""
        theirs = latest.get("protocol")
        if self.settings is None or latest.get("protocol_hash") is None:
            return
        if latest.get("protocol_hash") == self.settings.digest:
            return
        diff = self.settings.differences(theirs if isinstance(theirs, dict) else {})
        raise ProtocolMismatch(
            "the publisher's protocol settings differ from ours (ours != the publisher's): "
            + ("; ".join(diff) if diff else "the same values under another hash (another version?)")
        )

    def _get(self, store: Store, key: str, signer: str, max_bytes: int, kind: str, window: int):
        try:
            blob = store.get(key, max_bytes=max_bytes)
        except NotFound:
            raise MasterError(f"missing {key}") from None
        expect = {"kind": kind, "window": window, "netuid": self.netuid}
        try:  # every check of unpack_signed; the tensors are views of the blob, read one by one
            header, entries = check_signed(blob, signer=signer, max_bytes=max_bytes, expect=expect)
            return header.doc, tensor_views(blob, header, entries)
        except SignedObjectError as e:
            raise MasterError(f"{key}: {e}") from None

    def sync(
        self, store: Store, signer: str, params: Params, have: Position | None, target: int | None = None
    ) -> Position:
        """Bring `params` (holding master `have`) to θ_target (default: the newest), in place."""
        latest = self.latest(store, signer)
        if latest is None:
            raise MasterError("no master published yet")
        newest = int(latest["window"])
        target = newest if target is None else min(target, newest)
        if have is not None and have.window == target:
            return have
        if have is not None and have.window < target:
            try:
                return self._replay(store, signer, params, have.window, have.hash, target, latest)
            except MasterError as e:
                log.info("cannot continue from θ_%d (%s): loading a checkpoint", have.window, e)
        checkpoints = [int(c) for c in latest.get("checkpoints", [latest["checkpoint"]]) if int(c) <= target]
        if not checkpoints:
            raise MasterError(f"no checkpoint at or before θ_{target}")
        start = max(checkpoints)
        doc, tensors = self._get(
            store,
            protocol.checkpoint_key(self.netuid, start),
            signer,
            self.max_checkpoint,
            "checkpoint",
            start,
        )
        load_params(params, tensors)
        digest = model_hash(params)
        if digest != doc.get("hash"):
            raise MasterError(f"checkpoint-{start} hash mismatch")
        return self._replay(store, signer, params, start, digest, target, latest)

    def _replay(
        self, store: Store, signer: str, params: Params, start: int, digest: str, target: int, latest: dict
    ) -> Position:
        """Apply update-{start} … update-{target-1} to `params` (holding θ_start, hash `digest`)."""
        newest = int(latest["window"])
        for window in range(start, target):
            doc, tensors = self._get(
                store, protocol.update_key(self.netuid, window), signer, self.max_update, "update", window
            )
            if doc.get("base_hash") != digest:
                raise MasterError(f"update-{window} does not start from the master we hold")
            if doc.get("accepted"):
                apply_update(params, update_from_tensors(tensors, self.shapes))
            digest = str(doc.get("result_hash"))
        if model_hash(params) != digest:
            raise MasterError(f"θ_{target} hash mismatch after catching up")
        if target == newest and digest != latest.get("hash"):
            raise MasterError("LATEST.json hash does not match the updates")
        return Position(target, digest)
