"""The manifest of a master update: what the publisher merged, signed into update-{w}'s document, and
the checks every other node runs on it (docs/mechanism.md "A master anyone can verify").

The manifest (the `manifest` field of the signed update document):

    merge            the merge rule (`mechanism.merge`)
    uids             the merged uids, ascending (the order every node merges them in)
    blobs            sha256 of each merged uid's delta object, as fetched (hex, in `uids` order)
    weights          each one's merge weight m_i = normalize(max(I_i, 1/|V|)) over `valid`
    norms            each one's delta norm (`decode_delta`'s), the input of its clip factor
    clip             each one's clip factor min(1, median / norm) (`merge.clip_factors`)
    valid            V: the uids whose deltas the publisher found valid (the weights' support)
    step             the step taken: 1, 0.5 or 0 (none)
    global_loss_before / global_loss_after   the publisher's global losses
    update_sha256    sha256 of the merged update U before scaling and re-encoding ("" if none merged)
    residual_sha256  sha256 of the publisher's error-feedback residual before this window
    base_hash / result_hash are the document's own fields (θ_w and θ_{w+1}).

Two checks:

- `cheap_check` (every follower, no deltas needed): the manifest is well formed, its uids and V lie
  in the window's drawn sample, the step is one the protocol takes and matches `accepted`, and the
  decoded update's norm is within what a merge of clipped deltas plus a residual can reach.
- `Verifier` (a validator that scored the window, or a follower with `follow.verify`): U recomputed
  from its own verified deltas with the manifest's uids and weights must hash to `update_sha256`;
  with a shadow copy of the publisher's residual, the re-encoded wire must equal the published
  tensors bit for bit.

A failure raises `PublisherTampered` in a follower (not `MasterError`, whose path is "wait and
retry"): the node stops following that publisher.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .delta import Delta, Sparse, delta_norm, scaled
from .delta.codec import Factored, Mixed
from .delta.merge import MERGES, clip_factors

LOSS_TOLERANCE = 1e-3
"""Relative: a validator flags a step decision only when its own global losses disagree with the
publisher's (or contradict the decision) by more than this (forward passes differ slightly across
hardware; fp32 on CPU and GPU agree to about 1e-5 on the tiny model)."""

STEPS = (1.0, 0.5)
"""The steps the publisher tries, in order (evaluator.STEPS); 0 is "none"."""

NORM_SLACK = 2.0
"""The decoded update's norm may reach sqrt(#merged) · max_delta_norm · NORM_SLACK: a mean merge of
clipped deltas (each under max_delta_norm) plus what the residual carries from earlier windows."""

EMPTY = hashlib.sha256(b"").hexdigest()


class PublisherTampered(Exception):
    """The publisher's signed update contradicts its manifest or the chain: not a missing object to
    wait for, a publisher not to follow."""

    def __init__(self, window: int, publisher: str, reason: str) -> None:
        super().__init__(f"update-{window} of {publisher[:10]}…: {reason}")
        self.window, self.publisher, self.reason = window, publisher, reason


def _feed(h: Any, name: str, tag: str, t: torch.Tensor) -> None:
    t = t.detach().cpu()
    h.update(f"{name}:{tag}:{t.dtype}:{tuple(t.shape)}\n".encode())
    # flat first: a rank-1 factor [m, 1] counts as contiguous with any stride on its size-1 axis
    h.update(t.flatten().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def delta_sha256(delta: Delta) -> str:
    """sha256 of a decoded delta or merged update: names sorted, each part's kind, dtype, shape, bytes
    (a low-rank part's factors, as the merge stacks them)."""
    h = hashlib.sha256()
    for name in sorted(delta):
        part = delta[name]
        if isinstance(part, Sparse):
            _feed(h, name, "i", part.indices.to(torch.int64))
            _feed(h, name, "v", part.values.float())
        elif isinstance(part, (Mixed, Factored)):  # a low-rank part by its factors (never densified)
            low = part.low if isinstance(part, Mixed) else part
            _feed(h, name, "p", low.p.float())
            _feed(h, name, "q", low.q.float())
            if isinstance(part, Mixed):
                _feed(h, name, "i", part.sparse.indices.to(torch.int64))
                _feed(h, name, "v", part.sparse.values.float())
        else:
            _feed(h, name, "d", part.float())
    return h.hexdigest()


def residual_sha256(residual: Mapping[str, torch.Tensor]) -> str:
    """sha256 of an error-feedback residual (`EMPTY` for none)."""
    if not residual:
        return EMPTY
    h = hashlib.sha256()
    for name in sorted(residual):
        _feed(h, name, "e", residual[name].float())
    return h.hexdigest()


def blob_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def build(
    info: Mapping[str, Any], blobs: Mapping[int, str], merge: str, residual: str = EMPTY
) -> dict[str, Any]:
    """The manifest of one window from `Evaluator.propose_update`'s info and the fetched blobs' hashes."""
    uids = [int(u) for u in info.get("merged_uids", [])]
    norms = [float(n) for n in info.get("merged_norms", [])]
    return {
        "merge": merge,
        "uids": uids,
        "blobs": [blobs.get(u, "") for u in uids],
        "weights": [float(w) for w in info.get("merged_weights", [])],
        "norms": norms,
        "clip": clip_factors(norms) if norms else [],
        "valid": sorted(int(u) for u in info.get("valid_uids", [])),
        "step": float(info.get("step", 0.0)) if info.get("accepted") else 0.0,
        "global_loss_before": float(info.get("global_loss_before", 0.0)),
        "global_loss_after": float(info.get("global_loss_after", 0.0)),
        "update_sha256": str(info.get("update_sha256", "")),
        "residual_sha256": residual,
    }


def at_step(update: Delta, step: float) -> Delta:
    """U at `step` as the publisher proposes it (evaluator: U itself at 1, `scaled` otherwise)."""
    return update if step == 1.0 else scaled(update, step)


def cheap_check(
    doc: Mapping[str, Any],
    window: int,
    publisher: str,
    sample: set[int] | None,
    decoded: Delta | None,
    max_delta_norm: float,
    max_uids: int,
    require: bool = True,
) -> None:
    """What a follower checks without any delta: raises PublisherTampered. `sample`: the window's
    drawn sample (None: unknown, not checked); `decoded`: the update as applied (None: a no-op)."""

    def bad(reason: str) -> PublisherTampered:
        return PublisherTampered(window, publisher, reason)

    m = doc.get("manifest")
    accepted = bool(doc.get("accepted"))
    if m is None:
        if accepted and require:
            raise bad("an accepted update without a manifest")
        return
    if not isinstance(m, dict):
        raise bad("the manifest is not an object")
    uids, blobs, weights, norms = (m.get(k) for k in ("uids", "blobs", "weights", "norms"))
    if not all(isinstance(x, list) for x in (uids, blobs, weights, norms, m.get("valid", []))):
        raise bad("the manifest's lists are malformed")
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in [*uids, *m.get("valid", [])]):
        raise bad("the manifest's uids are not integers")
    if uids != sorted(set(uids)) or not (len(uids) == len(blobs) == len(weights) == len(norms)):
        raise bad("the manifest's uids are not ascending and unique, or its lists differ in length")
    if len(uids) > max_uids or len(m.get("valid", [])) > max_uids:
        raise bad(f"{len(uids)} merged uids: more than the sample holds ({max_uids})")
    if not set(uids) <= set(m.get("valid", uids)):
        raise bad(f"merged uids {sorted(set(uids) - set(m.get('valid', [])))} are not in its valid set")
    if sample is not None:
        outside = sorted(set(uids) - sample) or sorted(set(m.get("valid", [])) - sample)
        if outside:
            raise bad(f"uids {outside} are outside the window's drawn sample")
    step = m.get("step")
    if step not in (0, 0.0, *STEPS) or (float(step) > 0) != accepted:
        raise bad(f"step {step!r} with accepted={accepted}")
    if accepted and not uids:
        raise bad("a step with nothing merged")
    if decoded is not None:
        bound = math.sqrt(max(1, len(uids))) * max_delta_norm * NORM_SLACK
        norm = delta_norm(decoded)
        if not norm <= bound:
            raise bad(f"the update's norm {norm:.4g} is over the bound {bound:.4g}")


@dataclass
class Check:
    """One window's verification outcome (the validator's `publisher_check`)."""

    window: int
    publisher: str
    status: str = "ok"
    """ok | unverifiable | tampered"""
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    """What was checked, and what could not be (e.g. the wire without a shadow residual)."""

    def tampered(self, reason: str) -> Check:
        self.status, self.reason = "tampered", reason
        return self

    def unverifiable(self, reason: str) -> Check:
        if self.status == "ok":
            self.status, self.reason = "unverifiable", reason
        return self

    def as_record(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "publisher": self.publisher,
            "status": self.status,
            "reason": self.reason,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        return self.status + (f"({self.reason})" if self.reason else "")


class Shadow:
    """A node's copy of the publisher's error-feedback residual, advanced with every update it
    verified. Reset when the publisher changes; `known` once its digest matched a manifest's."""

    def __init__(self, codec: Any) -> None:  # a master.MasterCodec (master imports this module)
        self.codec = codec
        self.publisher: str | None = None
        self.known = False

    def begin(self, publisher: str, base_hash: str) -> str:
        """Before checking the update of `publisher` from θ with `base_hash`: the residual's digest."""
        if publisher != self.publisher:
            self.codec.residual, self.codec.base = {}, None
            self.publisher, self.known = publisher, False
        self.codec.start(base_hash)
        return residual_sha256(self.codec.residual)

    def lost(self) -> None:
        """An update we could not recompute: the residual is out of step until the publisher changes."""
        self.codec.discard()
        self.known = False


def recompute(manifest: Mapping[str, Any], deltas: Sequence[Delta], norms: Sequence[float], shapes) -> Delta:
    """U from the manifest's weights and the verifier's own deltas and norms (in `uids` order)."""
    weights = [float(w) for w in manifest["weights"]]
    rule = MERGES.get(str(manifest.get("merge", "")))
    if rule is None:
        raise ValueError(f"manifest names no merge rule we know: {manifest.get('merge')!r}")
    return rule(deltas, weights, shapes, norms=list(norms)).update


def verify_update(
    check: Check,
    doc: Mapping[str, Any],
    published: Mapping[str, torch.Tensor],
    deltas: Mapping[int, tuple[Delta, float, str]],
    shapes,
    shadow: Shadow | None,
    sent: Delta | None = None,
    loss_of: Callable[[Delta | None], float] | None = None,
    base_loss: float | None = None,
    tolerance: float = LOSS_TOLERANCE,
) -> Check:
    """Recompute U (and, with `shadow`, the wire) from `deltas` (uid -> (delta, norm, blob sha256),
    the verifier's own verified ones) per the manifest, and compare. With `loss_of` (θ_w + an update's
    global loss), `base_loss` (θ_w's) and `sent` (the published update, decoded), check the step
    decision within `tolerance`. The shadow
    residual advances only on an update it verified (else it is marked lost)."""
    m = doc.get("manifest") or {}
    uids = [int(u) for u in m.get("uids", [])]
    step = float(m.get("step", 0.0))
    base = str(doc.get("base_hash"))

    def lose() -> Check:
        if shadow is not None:
            shadow.lost()
        return check

    missing = [u for u in uids if u not in deltas]
    if missing:
        check.unverifiable(f"we hold no verified delta of merged uids {missing}")
        return lose()
    other = [u for u, sha in zip(uids, m.get("blobs", []), strict=True) if deltas[u][2] != sha]
    if other:  # both signed by the miner: it sent different objects to different readers
        check.unverifiable(f"uids {other} served us another delta than the publisher's")
        return lose()
    ours = [deltas[u][1] for u in uids]
    if [float(n) for n in m.get("norms", [])] != ours:
        return lose() if check.tampered(f"norms {m.get('norms')} are not the deltas' {ours}") else check
    if [float(c) for c in m.get("clip", [])] != clip_factors(ours):
        return lose() if check.tampered("clip factors are not those of the deltas' norms") else check
    if uids and m.get("merge") not in MERGES:
        return (
            lose() if check.tampered(f"merge rule {m.get('merge')!r} is no rule of the protocol") else check
        )
    update = recompute(m, [deltas[u][0] for u in uids], ours, shapes) if uids else None
    got = "" if update is None else delta_sha256(update)
    if got != m.get("update_sha256", ""):
        return lose() if check.tampered("U recomputed from the listed deltas has another sha256") else check
    check.notes.append(f"U of {len(uids)} uids recomputed and matched")
    # the step decision: what the published update does to our global loss
    if loss_of is not None and base_loss is not None:
        before = float(m.get("global_loss_before", base_loss))
        if abs(base_loss - before) > tolerance * abs(before):
            return (
                lose() if check.tampered(f"global loss before {before:.6g}, ours {base_loss:.6g}") else check
            )
        if step > 0:
            after_ours = loss_of(sent) if sent is not None else None
            after = float(m.get("global_loss_after", 0.0))
            if after_ours is not None and (
                abs(after_ours - after) > tolerance * abs(after) or after_ours > base_loss * (1 + tolerance)
            ):
                reason = f"the step: loss {base_loss:.6g} -> {after_ours:.6g} here, claimed {before:.6g} -> {after:.6g}"
                return lose() if check.tampered(reason) else check
    # the wire: re-encode with our copy of the publisher's residual
    if shadow is None or not hasattr(shadow.codec, "encode"):
        check.notes.append("wire not checked (no master codec)")
        return check
    digest = shadow.begin(check.publisher, base)
    if digest != m.get("residual_sha256"):
        if shadow.known:
            return (
                lose() if check.tampered("the residual's digest is not the one its updates leave") else check
            )
        check.unverifiable("no copy of this publisher's residual yet: U verified, the wire not")
        return lose()
    shadow.known = True
    tried = [s for s in STEPS if step == 0 or s > step]  # the steps refused before the one taken
    for s in tried if (update is not None and loss_of is not None and base_loss is not None) else []:
        loss = loss_of(shadow.codec.encode(at_step(update, s), check.window))
        if loss < base_loss * (1 - tolerance):
            reason = f"refused step {s:g} lowers our loss {base_loss:.6g} -> {loss:.6g}"
            return lose() if check.tampered(reason) else check
    if step == 0:
        shadow.codec.discard()
        check.notes.append("no step: residual unchanged")
        return check
    mine = shadow.codec.encode(at_step(update, step), check.window)
    wire = shadow.codec.pending_wire()
    if set(wire) != set(published) or not all(
        wire[k].dtype == published[k].dtype and torch.equal(wire[k], published[k]) for k in wire
    ):
        return lose() if check.tampered("the published wire is not the re-encoding of U") else check
    shadow.codec.commit(mine, str(doc.get("result_hash")))
    check.notes.append("wire re-encoded and matched")
    return check


def follower_verifier(
    get_delta: Callable[[int, int, str], tuple[Delta, float, str] | None], shapes, shadow: Shadow | None
) -> Callable[..., None]:
    """`Follower.verify` for `follow.verify`: `get_delta(window, uid, base_hash)` fetches and checks
    one merged uid's delta from its miner's bucket (bounded by `max_delta_bytes`; None when it
    cannot), giving (delta, norm, blob sha256). Tampered raises PublisherTampered; unverifiable
    (a delta we could not fetch, no residual copy yet) lets the update through, as a cheap-checked one."""

    def verify(signer: str, window: int, doc: Mapping[str, Any], tensors, update: Delta | None) -> None:
        m = doc.get("manifest") or {}
        deltas = {}
        for uid in m.get("uids", []):
            got = get_delta(window, int(uid), str(doc.get("base_hash")))
            if got is not None:
                deltas[int(uid)] = got
        check = verify_update(Check(window, signer), doc, tensors, deltas, shapes, shadow)
        if check.status == "tampered":
            raise PublisherTampered(window, signer, check.reason)

    return verify
