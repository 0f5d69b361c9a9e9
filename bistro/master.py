"""The master model: published by the top-stake validator, followed by everyone else.

Masters are numbered by the window in which miners train from them: θ_w. Right after window w's
upload deadline, the validator scores the deltas of window w on θ_w (the master they were trained
from) and computes θ_{w+1} = θ_w + U_w, where U_w is the merged update of the deltas that helped,
kept only if it lowers the global loss (docs/design.md "Mechanism" step 8). Miners of window w+1 wait for
θ_{w+1} before they train.

Why not pipeline (train window w+1 from θ_w while the validator works, and apply those deltas to
θ_{w+1})? Measured on the tiny localnet: a delta applied one master late double-steps along the
direction the previous update already took; from window 10 on honest deltas scored negative in
half the windows, the master step was refused, and the weights went to noise. Waiting costs the
miner the grace period plus the validator's scoring time at the start of each window.

In the publisher's bucket (docs/design.md "Master"):

    bistro/{netuid}/master/checkpoint-{w}.safetensors   θ_w in full, every `checkpoint_every` windows
    bistro/{netuid}/master/update-{w}.safetensors       U_w, turning θ_w into θ_{w+1}, every window
    bistro/{netuid}/master/LATEST.json                  newest window and hash, newest checkpoint

Every object is signed by the publisher's hotkey; followers refuse anything else. Catching up =
the newest checkpoint at or below the target, then each update after it, then a hash check.

What an update holds (`mechanism.master_codec`):

- `same` (the default): the publisher re-compresses the merged update with the miners' codec, plus
  an error-feedback residual of its own (`MasterCodec`): wire = encode(U_w + decay · e),
  e ← U_w + decay · e − decode(wire). The object holds the codec's wire tensors and names the codec
  and its parameters in the signed document, so it is one delta-sized object a window however many
  uids were merged, and a follower bounds it by the codec's wire size before reading it. Every node,
  the publisher included, applies θ_{w+1} = θ_w + decode(wire), so hashes agree bit for bit. The
  acceptance test (a lower global loss) is taken on θ_w + decode(wire), what followers will hold.
- `sparse`: the raw union of the merged deltas, int64 index + fp32 value an entry (12 B), or dense
  fp32 for dense parts (`update_to_tensors`): up to 3× the checkpoint at large union fractions.

The residual is publisher state: saved beside the validator's state after each published window and
tagged with the hash of the master it was left at, so a restarted publisher keeps it. It is used only
when the publisher steps from that very master: a validator that becomes the publisher after another
one (or after others published while it was away) starts with an empty residual. The old publisher's
residual is a dense fp32 tensor per parameter (the model's size), never published, so nobody else can
read it; what is lost is what it had not sent yet (at most a few windows' worth of the merged deltas'
small entries, most of it already decayed towards what later windows send). Given θ_w, the merged
update and the residual, the wire is a deterministic function (the codecs use no global RNG), so any
validator holding the same inputs recomputes the same object.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import protocol
from .config import ProtocolSettings, Settings
from .delta import Delta, Sparse, add_
from .delta.codec import CODECS, BadTensors, Codec, CodecContext, Mixed, Shapes, full
from .delta.signed import SignedObjectError, check_signed, pack_signed, tensor_views
from .manifest import cheap_check
from .model import Params, model_hash
from .statefile import write_tensors
from .storage.base import NotFound, StorageError, Store

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
    """A merged update as named tensors: `<param>::i` / `<param>::v` (sparse) or `<param>::d` (dense;
    a low-rank part with its sparse values materialised, one parameter at a time)."""
    out: dict[str, torch.Tensor] = {}
    for name, part in update.items():
        if isinstance(part, Sparse):
            out[f"{name}::i"] = part.indices.to(torch.int64).contiguous()
            out[f"{name}::v"] = part.values.to(torch.float32).contiguous()
        else:
            out[f"{name}::d"] = full(part).to(torch.float32).contiguous()
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


# --- the master's codec ---------------------------------------------------------------------------

HEADER_SLACK = 1 << 20
"""Bytes a signed update may hold beyond its wire tensors: safetensors header (a name, dtype and shape
per tensor) and the signed document (hashes, merged uids, codec parameters)."""


@dataclass(frozen=True)
class MasterFormat:
    """The codec updates travel in (`mechanism.master_codec same`): the miners' codec and parameters."""

    codec: str
    compression: float
    chunk: int
    value_bits: int
    rank: int

    @property
    def impl(self) -> Codec:
        return CODECS[self.codec]

    def context(self, netuid: int, window: int, ef_decay: float = 1.0) -> CodecContext:
        return CodecContext(
            netuid=netuid, window=window, compression=self.compression, chunk=self.chunk,
            value_bits=self.value_bits, rank=self.rank, ef_decay=ef_decay,
        )  # fmt: skip

    def doc(self, netuid: int) -> dict[str, Any]:
        """`codec` and `codec_params` of the signed update document."""
        return {"codec": self.codec, "codec_params": self.impl.params(self.context(netuid, 0))}

    def wire_bytes(self, shapes: Shapes, netuid: int = 0) -> int:
        """Bytes of the wire tensors for a model's shapes (whatever the number of merged uids)."""
        spec = self.impl.wire_spec(dict(shapes), self.context(netuid, 0))
        return sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in spec.values())

    def max_update(self, shapes: Shapes) -> int:
        """Largest update object a follower downloads: the wire plus `HEADER_SLACK`."""
        return self.wire_bytes(shapes) + HEADER_SLACK


def master_format(values: Settings | ProtocolSettings) -> MasterFormat | None:
    """The update format `values` prescribe (None: `master_codec sparse`, the raw union)."""
    if isinstance(values, ProtocolSettings):
        d = values.as_dict()
        get = lambda k: d.get(f"mechanism.{k}")  # noqa: E731
    else:
        get = lambda k: getattr(values.mechanism, k)  # noqa: E731
    if (get("master_codec") or "sparse") != "same":
        return None
    return MasterFormat(
        codec=str(get("codec")), compression=float(get("master_compression") or 0) or float(get("compression")),
        chunk=int(get("topk_chunk")),
        value_bits=int(get("value_bits")), rank=int(get("master_rank") or 0) or int(get("rank")),
    )  # fmt: skip


def _dense(update: Delta, shapes: Shapes) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors of a merged update (zeros for a parameter it does not hold)."""
    out = {}
    for name, shape in shapes.items():
        part = update.get(name)
        if part is None:
            out[name] = torch.zeros(shape)
        elif isinstance(part, Sparse):
            flat = torch.zeros(int(torch.Size(shape).numel()))
            flat.index_add_(0, part.indices.cpu(), part.values.cpu().float())
            out[name] = flat.view(shape)
        elif isinstance(part, Mixed):
            out[name] = part.full().cpu().float().reshape(shape)
        else:
            out[name] = part.detach().cpu().float().reshape(shape).clone()
    return out


class MasterCodec:
    """The publisher's side of `master_codec same`: re-compresses merged updates with an
    error-feedback residual of its own (what the wire has not carried yet).

    `encode` is a proposal (the acceptance test may try several steps); `commit` makes the last one
    the published update and its residual ours, `discard` forgets it."""

    PREFIX = "residual/"

    def __init__(self, fmt: MasterFormat, netuid: int, shapes: Shapes, decay: float = 1.0) -> None:
        self.fmt, self.netuid, self.shapes, self.decay = fmt, netuid, dict(shapes), decay
        self.residual: dict[str, torch.Tensor] = {}
        self.base: str | None = None
        """Hash of the master the residual was left at (None: no residual)."""
        self._pending: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, shapes: Shapes) -> MasterCodec | None:
        fmt = master_format(settings)
        if fmt is None:
            return None
        return cls(fmt, settings.chain.netuid, shapes, settings.mechanism.master_ef_decay)

    def start(self, base_hash: str) -> None:
        """Before stepping from the master `base_hash`: keep the residual only if it was left there
        (a publisher that did not publish the previous update starts empty)."""
        if self.base != base_hash:
            if self.residual:
                log.info("master residual was left at another master: starting empty")
            self.residual, self.base = {}, base_hash
        self._pending = None

    def encode(self, update: Delta, window: int) -> Delta:
        """The update followers will apply: decode(encode(U + decay · e)); pending until `commit`."""
        target = _dense(update, self.shapes)
        for name, e in self.residual.items():
            target[name].add_(e, alpha=self.decay)
        ctx = self.fmt.context(self.netuid, window)
        wire = self.fmt.impl.encode(target, ctx)
        sent = self.fmt.impl.decode(wire, ctx, self.shapes)
        self._pending = (wire, target)
        return sent

    def commit(self, sent: Delta, result_hash: str) -> dict[str, torch.Tensor]:
        """The pending proposal (`sent`: what `encode` returned) is published: e ← target − sent."""
        if self._pending is None:
            raise RuntimeError("no pending master update to commit")
        wire, target = self._pending
        for name, part in sent.items():
            t = target[name]
            if isinstance(part, Sparse):
                t.view(-1).index_add_(0, part.indices, part.values, alpha=-1.0)
            elif isinstance(part, Mixed):
                t.sub_(part.full().view_as(t))
            else:
                t.sub_(part.view_as(t))
        self.residual, self.base, self._pending = target, result_hash, None
        return wire

    def discard(self) -> None:
        self._pending = None

    def pending_wire(self) -> dict[str, torch.Tensor]:
        """The wire tensors of the pending proposal (what `commit` would publish)."""
        if self._pending is None:
            raise RuntimeError("no pending master update")
        return self._pending[0]

    def save(self, path: Path) -> None:
        """The residual and the master it belongs to, atomically (safetensors)."""
        tensors = {self.PREFIX + n: t for n, t in self.residual.items()}
        write_tensors(path, tensors, {"base": self.base or ""})

    def load(self, path: Path) -> bool:
        """The residual saved at `path`, if any and if it fits the model; True when loaded."""
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            base = (f.metadata() or {}).get("base") or None
            residual = {k[len(self.PREFIX) :]: f.get_tensor(k).float() for k in f.keys()}
        if set(residual) - set(self.shapes) or any(
            tuple(t.shape) != tuple(self.shapes[n]) for n, t in residual.items()
        ):
            log.warning("%s does not fit the model: master residual starts empty", path)
            return False
        self.residual, self.base = residual, base
        return True


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
        self,
        window: int,
        update: Delta | None,
        base_hash: str,
        result_hash: str,
        wire: dict[str, torch.Tensor] | None = None,
        fmt: MasterFormat | None = None,
        **info: object,
    ) -> None:
        """U_window (None: θ_{window+1} = θ_window). With `wire` (and its `fmt`), the object holds
        the codec's wire tensors and names the codec in the document (`master_codec same`);
        otherwise the raw union (`update_to_tensors`)."""
        codec: dict[str, Any] = {}
        if wire is not None and update is not None:
            if fmt is None:
                raise ValueError("an update as codec wire needs its format")
            tensors, codec = wire, fmt.doc(self.netuid)
        else:
            tensors = update_to_tensors(update) if update else {}
        doc = self._doc(
            "update",
            window,
            base_hash=base_hash,
            result_hash=result_hash,
            accepted=update is not None,
            **codec,
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


class CheckpointUpload:
    """θ_window written as a checkpoint by a background thread (`Publisher.checkpoint`), from a host
    copy of the master taken here, before the thread starts: the caller's master moves on while the
    upload runs. A failure (any exception of the store) is logged with the window and kept in
    `error`; it never reaches the caller."""

    def __init__(self, publisher: Publisher, window: int, params: Params, digest: str) -> None:
        self.publisher, self.window, self.digest = publisher, window, digest
        self.error: BaseException | None = None
        self.seconds = 0.0
        with torch.no_grad():
            self._snapshot: Params = {k: v.detach().to("cpu", copy=True) for k, v in params.items()}
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{window}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self.publisher.checkpoint(self.window, self._snapshot, self.digest)
        except StorageError as e:  # our bucket failing: logged, never listed, the next one tries
            self.error = e
            log.error("checkpoint-%d upload failed: %s: not listed", self.window, e)
        except Exception as e:  # noqa: BLE001 -- anything else too, with its traceback
            self.error = e
            log.exception("checkpoint-%d upload failed: %s: not listed", self.window, e or type(e).__name__)
        finally:
            self._snapshot = {}  # the host copy is freed as soon as it is written
            self.seconds = time.perf_counter() - start
        if self.error is None:
            log.info("checkpoint-%d uploaded in %.1fs", self.window, self.seconds)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the upload (at most `timeout` seconds); True once it has ended, done or failed."""
        self._thread.join(timeout)
        return self.done

    @property
    def done(self) -> bool:
        """The upload has ended (written or failed)."""
        return not self._thread.is_alive()

    @property
    def ok(self) -> bool:
        """The checkpoint is in the store."""
        return self.done and self.error is None


# --- following -----------------------------------------------------------------------------------


class Follower:
    """Catches a model up to θ_w from the publisher's bucket, checking signatures and hashes."""

    def __init__(
        self,
        netuid: int,
        shapes: Mapping[str, tuple[int, ...]],
        param_bytes: int,
        settings: ProtocolSettings | None = None,
        fmt: MasterFormat | None = None,
    ) -> None:
        self.netuid = netuid
        self.settings = settings
        """Our protocol settings: a LATEST.json signed with others raises ProtocolMismatch."""
        self.own: str | None = None
        """Our own hotkey (a validator's): its own LATEST.json is not checked against our settings."""
        self.shapes = dict(shapes)
        self.max_checkpoint = int(param_bytes * 1.05) + (1 << 20)
        self.fmt = fmt if fmt is not None else (master_format(settings) if settings is not None else None)
        """The update format we expect (from our protocol settings): None accepts the raw union and
        any codec an update names, bounded as the raw union is."""
        self.max_update = (
            self.fmt.max_update(self.shapes) if self.fmt is not None else 2 * self.max_checkpoint + (1 << 20)
        )
        """Largest update object read: the codec's wire plus header slack (`master_codec same`), else
        the raw union's bound (2 checkpoints)."""
        self.require_manifest = False
        """Refuse an accepted update without a manifest (a node: True; test tooling publishes bare)."""
        self.sample_of: Callable[[int], set[int] | None] = lambda window: None
        """The window's drawn sample (from the chain's seed hashes), for the manifest's cheap check."""
        self.verify: Callable[[str, int, Mapping, Mapping[str, torch.Tensor], Delta | None], None] | None = (
            None
        )
        """`follow.verify`: recompute each update from the miners' deltas (raises PublisherTampered)."""

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
        if signer != self.own:  # our own earlier LATEST is not a publisher we follow
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

    def decode(self, doc: Mapping, tensors: dict[str, torch.Tensor], window: int) -> Delta:
        """The update a signed update object stands for: codec wire (its `codec` named in the doc) or
        the raw union. A follower that expects a codec refuses any other format or parameters."""
        name = doc.get("codec")
        if name is None:
            if self.fmt is not None:
                raise MasterError(f"update-{window} is a raw union; the protocol sends {self.fmt.codec} wire")
            return update_from_tensors(tensors, self.shapes)
        if self.fmt is not None and (name, doc.get("codec_params")) != tuple(
            self.fmt.doc(self.netuid).values()
        ):
            raise MasterError(
                f"update-{window}: codec {name} {doc.get('codec_params')} is not the protocol's"
            )
        params = doc.get("codec_params")
        if name not in CODECS or not isinstance(params, dict):
            raise MasterError(f"update-{window}: unknown codec {name!r}")
        try:
            fmt = self.fmt or MasterFormat(
                codec=str(name), compression=float(params.get("compression", 1.0)),
                chunk=int(params.get("chunk", 4096)), value_bits=int(params.get("value_bits", 2)),
                rank=int(params.get("rank", 1)),
            )  # fmt: skip
            update = fmt.impl.decode(tensors, fmt.context(self.netuid, window), self.shapes)
        except (BadTensors, ValueError, TypeError) as e:
            raise MasterError(f"update-{window}: {e}") from None
        for part in update.values():
            values = [part.low.p, part.low.q, part.sparse.values] if isinstance(part, Mixed) else [part]
            values = [v.values if isinstance(v, Sparse) else v for v in values]
            if not all(bool(torch.isfinite(v).all()) for v in values):
                raise MasterError(f"update-{window} has non-finite values")
        return update

    def check(
        self,
        signer: str,
        window: int,
        doc: Mapping,
        tensors: Mapping[str, torch.Tensor],
        update: Delta | None,
    ) -> None:
        """The manifest's cheap check (and `verify`, when set) before an update is applied: raises
        PublisherTampered, which no retry path swallows."""
        values = self.settings.as_dict() if self.settings is not None else {}
        max_norm = float(values.get("mechanism.max_delta_norm", 100.0))
        max_uids = int(values.get("mechanism.max_uids_per_window", 256))
        cheap_check(
            doc, window, signer, self.sample_of(window), update, max_norm, max_uids, self.require_manifest
        )
        if self.verify is not None and doc.get("manifest") is not None:
            self.verify(signer, window, doc, tensors, update)

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
            update = self.decode(doc, dict(tensors), window) if doc.get("accepted") else None
            self.check(signer, window, doc, tensors, update)
            if update is not None:
                apply_update(params, update)
            digest = str(doc.get("result_hash"))
        if model_hash(params) != digest:
            raise MasterError(f"θ_{target} hash mismatch after catching up")
        if target == newest and digest != latest.get("hash"):
            raise MasterError("LATEST.json hash does not match the updates")
        return Position(target, digest)
