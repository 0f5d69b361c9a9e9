"""The validator (docs/design.md "Mechanism", one validator, window w; the maths is in scoring.py).

While window w+1 runs, after window w's upload deadline:

    1. metagraph and commitments; the window's scored sample (bistro/sample.py: seeded by the
       seed block, the same on every validator, every uid within 10 windows)
    2. download the sample's deltas for w in the window's seeded order, a few at a time; validate
       (wire.decode_delta); drop copies (among the deltas fetched)
    3. merge weights m_i = normalize(max(I_i, 1/|V|))
    4. θ_eval = θ_w + Σ m_i Δ_i            (θ_w: the master these deltas were trained from)
    5. per uid: loss with (one batched pass shared by all uids) and without its delta, on its eval
       pages and on the global pages; the delta goes back bit-exactly (saved values restored)
    6. moving averages; 7. softmax weights, set on the chain every `weights_every` windows
    8. the top-stake validator: θ_{w+1} = θ_w + Σ_{s_i>0} m_i Δ_i if that lowers the global
       loss, else θ_w; published as update-{w} (+ checkpoint) and LATEST.json; miners of window
       w+1 wait for it

Whose fault (the rule; bistro/verdicts.py names the verdicts):
    - Whatever a peer's store or bytes do (any exception, header or timing) is that peer's verdict
      for the window (`fetch_verdict`): it scores zero and counts against its moving average.
      Nothing a peer sends raises out of `evaluate`; a bug of ours on a peer's input is logged with
      its traceback and is that uid's `peer_error`, and the window goes on.
    - All peer I/O of a window shares one budget, `mechanism.fetch_seconds` (at most FETCH_SHARE
      of the window: `fetch_budget`) from the start of the fetch, spent in the seeded order,
      `mechanism.fetch_concurrency` reads at a time through one shared rate limit
      (`mechanism.link_bytes_per_second`). A peer that stalls or is slow next to the window's
      others is `timeout`; what our link did not reach by the budget's end is `unfetched`: not
      judged, average frozen, no penalty (`storage/fetch.py`). No HEAD per uid: upload order does
      not come from a miner's server.
    - Only evidence about our own side may freeze averages (`skip`): the canary, a small object we
      wrote to our own bucket, read in the same gather at the same deadline. If it does not come
      back intact, the window is `skip` for every uid. "Most peers failed at once" is not such
      evidence: one operator of many sybil uids can arrange it. Our chain failing raises
      ChainError out of `evaluate`: the window is not scored at all.

Who publishes (the publisher handover): the top-stake validator at the first block of window w
(`Node.publisher_of`) publishes update-w; every node reads the same block, so all agree. A validator
that becomes the publisher continues from the previous publisher's newest master (its checkpoints
and updates), writes it as a checkpoint into its own bucket, and publishes from there; never from
its own stale θ, and a fresh initial master only when no master exists anywhere.

The publisher's due checkpoints (every `checkpoint_every` windows) are off the window's critical
path: θ_{w+1} is copied to host memory and written by a background thread (`CheckpointUpload`)
while the next window runs, one upload at a time. LATEST.json and `State.checkpoints` list a
checkpoint only once it is in the bucket, and the oldest one (with the updates after it) is pruned
only then, so a follower always reaches θ from a listed checkpoint plus updates. A failed upload is
logged and never listed; the next due one tries again. The handover and initial checkpoints are
written before LATEST.json names them.

State (moving averages, last window done, checkpoints) is saved atomically after every window,
so a validator killed at any instant resumes with nothing lost and nothing counted twice. θ is not
saved locally: a restarted validator catches up from the publisher's bucket (its own, if it is the
publisher), where full checkpoints come every `checkpoint_every` windows and signed updates between.
`windows.jsonl` holds the last `records_per_file` records; older ones move to numbered archives
(`windows-000001.jsonl`, the newest `archives_kept` kept), so start-up reads O(recent).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import manifest, protocol, sample, scoring
from .chain.base import ChainError, Metagraph
from .config import Settings
from .delta import slices
from .delta.codec import CODECS, Delta, codec_context
from .delta.wire import DeltaRejected, decode_delta, expectation
from .evaluator import Evaluator, Verdict
from .master import (
    CheckpointUpload,
    MasterCodec,
    MasterError,
    Position,
    ProtocolMismatch,
    Publisher,
    apply_update,
    load_params,
)
from .model import build_model, model_hash
from .node import Node, NotRegistered, install_signals
from .statefile import read_json, write_json
from .storage.base import StorageError, Store, TooLarge
from .storage.fetch import fetch_ordered
from .storage.link import Link
from .threads import host_threads, map_threads
from .verdicts import NOT_JUDGED, PEER_FAULTS, V, fetch_verdict
from .windowlog import WindowLog

log = logging.getLogger("bistro.validator")


NOT_HELD = frozenset({V.missing, V.timeout, V.peer_error, V.skip, V.unfetched})
"""Verdicts that say we hold no delta, not that the delta is bad: a merged uid with one of these
makes the window unverifiable for us, never tampered."""

SCORE_TOLERANCE = 0.05
"""A merged uid whose score here is below -SCORE_TOLERANCE hurt its own pages here: merging it is
`tampered`. Scores nearer zero can change sign with the hardware's rounding."""

FETCH_SHARE = 0.25
"""The largest share of a window the fetch deadline may take (the rest is for scoring)."""
SLICE_SHARE = 0.25
"""Of the fetch budget, the seconds the slices of the unsampled uploads get, after the sample's."""
SLICE_CONCURRENCY = 4
"""Slices read at once, per delta read at once (`mechanism.fetch_concurrency`): a slice is small, so
its time is mostly round trips, and a swarm of stalling servers holds fewer of the slots."""

HASHES_KEPT = 16
"""Master hashes remembered (windows back): deltas name the master they were trained from."""
MASTER_RESIDUAL = "master_residual.safetensors"
"""The publisher's residual of `master_codec same` (in the validator's state directory)."""
CHECKPOINTS_KEPT = 2
"""Checkpoints the publisher keeps in its bucket (and the updates from the oldest one on)."""
CHECKPOINT_JOIN_SECONDS = 60.0
"""How long a stopping validator waits for a checkpoint still uploading (then stops without it)."""

SEED_HASHES_KEPT = 128
"""Seed-block hashes remembered (the sample replays at most about 80 windows of them)."""


def canary_key(netuid: int) -> str:
    """Where a validator keeps the object it reads back from its own bucket every window."""
    return f"bistro/{netuid}/validator/canary.json"


@dataclass
class State:
    averages: dict[int, float] = field(default_factory=dict)
    last_window: int = -1
    position: Position | None = None
    """The master we hold (not saved: θ is caught up again from the publisher after a restart)."""
    hashes: dict[int, str] = field(default_factory=dict)
    """Master hash of recent windows (at most HASHES_KEPT)."""
    weights_pending: bool = False
    last_valid: dict[int, int] = field(default_factory=dict)
    """Last window in which each uid's delta was valid (or skipped because our own side failed)."""
    fault_streaks: dict[int, int] = field(default_factory=dict)
    """Judged windows in a row that were each uid's fault (`scoring.drop_inactive`)."""
    checkpoints: list[int] = field(default_factory=list)
    """Windows of the master checkpoints we publish and keep (publisher only)."""
    distrusted: dict[str, int] = field(default_factory=dict)
    """Publishers caught with a tampered update -> its window w (θ_w is the last master of theirs
    we verified): we never continue from their masters after it."""
    recent: dict[int, list[float]] = field(default_factory=dict)
    """Each uid's scores of its last `consistent_windows` scored windows (scoring.consistent)."""

    def to_json(self) -> dict:
        return {
            "averages": {str(k): v for k, v in self.averages.items()},
            "last_window": self.last_window,
            "hashes": {str(k): v for k, v in self.hashes.items()},
            "weights_pending": self.weights_pending,
            "checkpoints": self.checkpoints,
            "last_valid": {str(k): v for k, v in self.last_valid.items()},
            "fault_streaks": {str(k): v for k, v in self.fault_streaks.items()},
            "distrusted": dict(self.distrusted),
            "recent": {str(k): v for k, v in self.recent.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> State:
        hashes = {int(k): str(v) for k, v in d.get("hashes", {}).items()}
        return cls(
            averages={int(k): float(v) for k, v in d.get("averages", {}).items()},
            last_window=int(d.get("last_window", -1)),
            hashes=dict(sorted(hashes.items())[-HASHES_KEPT:]),
            weights_pending=bool(d.get("weights_pending", False)),
            checkpoints=[int(c) for c in d.get("checkpoints", [])],
            last_valid={int(k): int(v) for k, v in d.get("last_valid", {}).items()},
            fault_streaks={int(k): int(v) for k, v in d.get("fault_streaks", {}).items()},
            distrusted={str(k): int(v) for k, v in d.get("distrusted", {}).items()},
            recent={int(k): [float(x) for x in v] for k, v in d.get("recent", {}).items()},
        )


class Validator(Node):
    records_per_file = 1000
    """Records in windows.jsonl before it moves to a numbered archive."""
    archives_kept = 4
    """Numbered archives of windows.jsonl kept (older ones are deleted)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "validator")
        self.state_dir = settings.home / "validator"
        self.state = State()
        self.publisher = Publisher(self.store, self.keypair, self.netuid, self.protocol)
        self.model.eval()
        self.evaluator = Evaluator(settings, self.model, self.dataset)
        self.master_codec = MasterCodec.for_settings(settings, self.shapes)
        """The publisher's re-compression of U_w and its residual (`mechanism.master_codec same`)."""
        if self.master_codec is not None:
            self.master_codec.load(self.state_dir / MASTER_RESIDUAL)
        shadow_codec = MasterCodec.for_settings(settings, self.shapes)
        self.shadow = manifest.Shadow(shadow_codec) if shadow_codec is not None else None
        """Our copy of the current publisher's residual (reset when the publisher changes)."""
        self.blob_hashes: dict[int, str] = {}
        """sha256 of each delta object the last `fetch` verified (the manifest lists the publisher's)."""
        self._pending_check: dict | None = None
        """The window we scored whose update was not published yet: checked at the next window."""
        # signed like everything we publish (a public bucket holds nothing unsigned of ours)
        doc = {"kind": "canary", "netuid": self.netuid, "started": time.time()}
        self.canary = json.dumps(protocol.sign_document(self.keypair, doc)).encode()
        self._canary_written = False
        self.log = WindowLog(self.state_dir, self.records_per_file, self.archives_kept)
        self.fetched_bytes = 0
        self.sliced_bytes = 0
        self.io_seconds = 0.0
        """Bytes of the deltas the last `fetch` downloaded (windows.jsonl, metrics)."""
        self.link = Link(settings.mechanism.link_bytes_per_second)
        """One rate limit shared by all of our peer reads (`mechanism.link_bytes_per_second`)."""
        self.seed_hashes: dict[int, str] = {}
        """Seed-block hash of recent windows (the sample's inputs; read once from the chain)."""
        self._upload: CheckpointUpload | None = None
        """The due checkpoint being written in the background (`master_step`), at most one."""
        self._latest: Position | None = None
        """The master our last LATEST.json from `master_step` names."""
        self._load_state()

    # --- state ------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        for old in self.state_dir.glob("master-*.safetensors"):  # written by earlier versions
            old.unlink(missing_ok=True)
        raw = read_json(self.state_dir / "state.json")
        if raw is None:
            return
        self.state = State.from_json(raw)
        self.log.keep_through(self.state.last_window)
        log.info(
            "resumed: last window %d, %d moving averages", self.state.last_window, len(self.state.averages)
        )

    def _save_state(self) -> None:
        write_json(self.state_dir / "state.json", self.state.to_json())

    def _record(self, record: dict) -> None:
        self.log.append(record)
        self.metrics.window(record)

    def _hold(self, position: Position) -> None:
        """We hold `position` in self.master; remember its hash (bounded)."""
        self.state.position = position
        self.state.hashes[position.window] = position.hash
        self.state.hashes = dict(sorted(self.state.hashes.items())[-HASHES_KEPT:])

    # --- master -----------------------------------------------------------------------------------

    def publishes(self, window: int, mg: Metagraph) -> bool:
        """Whether we publish update-{window} (the top-stake validator at the window's first block)."""
        return self.publisher_of(window, mg) == self.hotkey

    def ensure_master(self, window: int, mg: Metagraph) -> bool:
        """Hold θ_window in self.master: followed from its publisher, or, if we publish this window,
        continued from the previous publisher's newest master (`_take_over`)."""
        pos = self.state.position
        if pos is not None and pos.window == window:
            return True
        if self.publishes(window, mg):
            try:
                return self._take_over(window, mg)
            except StorageError as e:  # our own bucket: try again next window
                log.error("window %d: cannot publish θ_%d: %s", window, window, e)
                self.state.position = None
                return False
        position = self.sync_master(self.master, pos, window, mg)
        self.state.position = position
        if position is None:
            return False
        self._hold(position)
        return position.window == window

    def _take_over(self, window: int, mg: Metagraph) -> bool:
        """We publish `window`: bring θ_window into our own bucket from where the master is."""
        self._drop_checkpoint()  # of the chain we published before: LATEST says what it holds
        found = self._newest_master(window, self.master_source(window, mg))
        if found is None:
            return False
        signer, position = found
        if position is None:
            return self._publish_initial(window)
        self._hold(position)
        if signer != self.hotkey:
            # Followers must find θ in our bucket: the handover starts with a checkpoint of it.
            self.publisher.checkpoint(position.window, self.master, position.hash)
            self.state.checkpoints = [position.window]
            self.publisher.prune(self.state.checkpoints)
            log.info("publisher from θ_%d %s (was %s…)", position.window, position.hash[:12], signer[:10])
        else:  # our bucket's LATEST says which checkpoints it holds (our state may be older)
            latest = self.follower.latest(self.store, self.hotkey) or {}
            self.state.checkpoints = [int(c) for c in latest.get("checkpoints", [])] or [position.window]
        if position.window < window:
            return self._carry_on(window)
        self.publisher.latest(window, position.hash, self.state.checkpoints)
        return True

    def _newest_master(
        self, window: int, source: tuple[Store, str] | None
    ) -> tuple[str, Position | None] | None:
        """(signer, newest θ_≤window) from the previous publisher's bucket, else from our own;
        (us, None) when neither bucket holds any master; None when one failed (wait, never fork)."""
        candidates = [source] if source is not None and source[1] != self.hotkey else []
        candidates.append((self.store, self.hotkey))
        failed = False
        for store, signer in candidates:
            try:
                if self.follower.latest(store, signer) is None:
                    continue  # nothing ever published there
                # a publisher caught tampering: from θ_w, the last master of theirs we verified
                target = min(window, self.state.distrusted.get(signer, window))
                return signer, self.follower.sync(store, signer, self.master, self.state.position, target)
            except (StorageError, TooLarge, TimeoutError) as e:
                log.warning("θ_%d not available from %s…: %s", window, signer[:10], e)
                self.state.position = None
                return None
            except MasterError as e:
                log.warning("cannot continue from %s…'s master: %s", signer[:10], e)
            except ProtocolMismatch:
                raise  # a setting to change: the validator stops (main says which)
            except Exception:  # noqa: BLE001 -- a bug of ours on a peer's bytes: loud, the window goes on
                log.exception("following %s…'s master failed", signer[:10])
            self.state.position, failed = None, True
        return None if failed else (self.hotkey, None)

    def _carry_on(self, window: int) -> bool:
        """The master did not move in the windows we missed: no-op updates up to θ_window."""
        pos = self.state.position
        for w in range(pos.window, window):
            self.publisher.update(w, None, pos.hash, pos.hash, reason="publisher_offline")
        self._hold(Position(window, pos.hash))
        self.publisher.latest(window, pos.hash, self.state.checkpoints or [window])
        return True

    def _publish_initial(self, window: int) -> bool:
        model = build_model(self.settings.model, seed=self.settings.model.seed)
        init = {k: v.detach().to(self.device) for k, v in dict(model.named_parameters()).items()}
        load_params(self.master, {k: init[k] for k in self.master})
        digest = model_hash(self.master)
        self.publisher.checkpoint(window, self.master, digest)
        from .data.hub import publish_index  # hf: corpora: serve the row-group index to every node

        publish_index(self.store, self.keypair, self.netuid, self.dataset.corpus)
        self.state.checkpoints = [window]
        self.publisher.latest(window, digest, self.state.checkpoints)
        self._hold(Position(window, digest))
        log.info("published the initial master θ_%d %s", window, digest[:12])
        return True

    def master_step(
        self,
        window: int,
        verdicts: dict[int, Verdict],
        base_global: float,
        global_seqs,
        paid: set[int] | None = None,
    ) -> dict:
        """Step 8 and publication: θ_{window+1} = θ_window (+ U if it lowers the global loss); U
        merges the helpful deltas of the uids in `paid` (the weights' support), all if None."""
        pos = self.state.position
        codec = self.master_codec
        recompress = None
        residual = manifest.EMPTY
        if codec is not None:  # U as followers get it: the codec's wire, with our residual
            codec.start(pos.hash)
            residual = manifest.residual_sha256(codec.residual)
            recompress = lambda u: codec.encode(u, window)  # noqa: E731
        update, info = self.evaluator.propose_update(
            self.master, verdicts, base_global, global_seqs, paid, recompress
        )
        if update is not None:
            self.state.position = None  # θ moves: until published, we hold no named master
            apply_update(self.master, update)
        digest = model_hash(self.master) if update is not None else pos.hash
        wire = None
        if codec is not None:
            if update is not None:
                wire = codec.commit(update, digest)
            else:
                codec.discard()
            codec.save(self.state_dir / MASTER_RESIDUAL)
        signed = manifest.build(info, self.blob_hashes, self.settings.mechanism.merge, residual)
        self.publisher.update(
            window, update, pos.hash, digest, wire, codec.fmt if codec else None,
            uids=info["merged_uids"], manifest=signed,
        )  # fmt: skip
        listed = self._collect_checkpoint()
        every = self.settings.mechanism.checkpoint_every
        if (window + 1) % every == 0:
            if self._upload is not None:  # at most one upload in flight
                log.warning(
                    "window %d: checkpoint-%d is still uploading: waiting for it before checkpoint-%d "
                    "(checkpoint uploads are slower than checkpoint_every = %d windows)",
                    window, self._upload.window, window + 1, every,
                )  # fmt: skip
                listed = self._collect_checkpoint(wait=True) or listed
            # θ_{window+1} in full, written from a host copy while the next window runs; listed
            # (and the oldest checkpoint pruned) at the first LATEST.json after it is in the bucket
            self._upload = CheckpointUpload(self.publisher, window + 1, self.master, digest)
        self._hold(Position(window + 1, digest))
        self.publisher.latest(window + 1, digest, self.state.checkpoints)
        self._latest = Position(window + 1, digest)
        if listed:
            self._prune()
        return info

    def _collect_checkpoint(self, wait: bool = False) -> bool:
        """List the background checkpoint in `state.checkpoints` once it is in the bucket (waiting
        for it if `wait`); True when the list changed. A failed upload was logged and is forgotten:
        the next due checkpoint tries again."""
        upload = self._upload
        if upload is None or not (upload.join() if wait else upload.done):
            return False
        self._upload = None
        if not upload.ok:
            return False
        if self.state.hashes.get(upload.window, upload.digest) != upload.digest:
            log.warning("checkpoint-%d is not of the master we hold: not listed", upload.window)
            return False
        self.state.checkpoints = sorted({*self.state.checkpoints, upload.window})[-CHECKPOINTS_KEPT:]
        return True

    def _prune(self) -> None:
        """Delete the checkpoints not listed and the updates before the oldest one; a checkpoint
        still uploading is kept (its object may already be there)."""
        uploading = [self._upload.window] if self._upload is not None else []
        self.publisher.prune(sorted({*self.state.checkpoints, *uploading}))

    def _drop_checkpoint(self) -> None:
        """Forget the background checkpoint, after it ended (no put of it lands after this)."""
        if self._upload is not None:
            if not self._upload.done:
                log.info("waiting for checkpoint-%d to finish uploading", self._upload.window)
            self._upload.join()
            self._upload = None

    def finish_checkpoint(self, timeout: float = CHECKPOINT_JOIN_SECONDS) -> None:
        """On stopping: wait up to `timeout` seconds for the background checkpoint; once it is in
        the bucket, write LATEST.json again so that it is listed (and save the state)."""
        upload = self._upload
        if upload is None:
            return
        if not upload.join(timeout):
            log.warning(
                "checkpoint-%d still uploading after %.0fs: stopping without it (not listed)",
                upload.window, timeout,
            )  # fmt: skip
            return
        latest = self._latest
        if latest is None or upload.window > latest.window or not self._collect_checkpoint():
            self._upload = None
            return
        try:
            self.publisher.latest(latest.window, latest.hash, self.state.checkpoints)
            self._prune()
        except StorageError as e:
            log.error("could not list checkpoint-%d: %s", upload.window, e)
        self._save_state()

    # --- checking the publisher ---------------------------------------------------------------------

    def _check_pending(self, mg: Metagraph) -> manifest.Check | None:
        """Check the update of the window we scored last (`_pending_check`) if its publisher has
        published it; None while it has not (we try again at the next window, θ_w still held)."""
        ctx = self._pending_check
        if ctx is None:
            return None
        window = ctx["window"]
        pos = self.state.position
        if pos is None or pos.window != window or pos.hash != ctx["hash"]:
            self._pending_check = None  # θ_w is gone (we moved on without it): nothing to check with
            return None
        publisher = self.publisher_of(window, mg)
        store = self.bucket_of(publisher, mg) if publisher else None
        if publisher is None or store is None or publisher == self.hotkey:
            self._pending_check = None
            return None
        try:
            doc, tensors = self.follower._get(
                store, protocol.update_key(self.netuid, window), publisher, self.follower.max_update,
                "update", window,
            )  # fmt: skip
        except MasterError as e:
            if "missing" in str(e):
                return None  # not published yet
            check = manifest.Check(window, publisher).unverifiable(f"update unreadable: {e}")
        except (StorageError, TooLarge, TimeoutError) as e:
            return manifest.Check(window, publisher).unverifiable(f"publisher's bucket: {e}")
        else:
            try:
                check = self.check_update(ctx, publisher, doc, dict(tensors))
            except Exception as e:  # noqa: BLE001 -- a bug of ours on the publisher's bytes: loud, no verdict
                log.exception("checking update-%d of %s… failed", window, publisher[:10])
                check = manifest.Check(window, publisher).unverifiable(f"our check failed: {e}")
        self._pending_check = None
        self._report(check)
        return check

    def check_update(
        self, ctx: dict, publisher: str, doc: dict, tensors: dict[str, torch.Tensor]
    ) -> manifest.Check:
        """Our verification of `publisher`'s update-{w} against the window w we scored (`ctx`):
        the manifest's cheap check, its merged set and weights against our verdicts and the chain,
        then U, the step decision (within manifest.LOSS_TOLERANCE) and the wire (`manifest.verify_update`)."""
        window, verdicts = ctx["window"], ctx["verdicts"]
        check = manifest.Check(window, publisher)
        if doc.get("base_hash") != ctx["hash"]:
            return check.unverifiable("the update starts from another θ_w than ours")
        m = self.settings.mechanism
        try:
            sent = self.follower.decode(doc, tensors, window) if doc.get("accepted") else None
            manifest.cheap_check(
                doc, window, publisher, ctx["sample"], sent, m.max_delta_norm, m.max_uids_per_window
            )
        except manifest.PublisherTampered as e:
            return check.tampered(e.reason)
        except MasterError as e:
            return check.tampered(str(e))
        man = doc.get("manifest")
        if man is None:
            check.notes.append("a no-op without a manifest")
            return check
        uids = [int(u) for u in man["uids"]]
        for uid in uids:
            v = verdicts.get(uid)
            if v is not None and v.verdict not in NOT_HELD and v.verdict != V.ok:
                return check.tampered(f"merged uid {uid}, whose delta is {v.verdict} here")
            if v is not None and v.verdict == V.ok and v.score < -SCORE_TOLERANCE:
                if set(v.close_to) - ctx["sample"]:  # against a slice's pages: one the publisher may
                    check.unverifiable(  # not have read (its peer's server, its budget): disputed
                        f"merged uid {uid}, whose delta hurt here against a slice's pages (score {v.score:.4g})"
                    )
                    continue
                return check.tampered(f"merged uid {uid}, whose delta hurt here (score {v.score:.4g})")
        # the weights: normalize(max(I_i, 1/|V|)) over the publisher's V, from the chain's incentive
        expected = scoring.merge_weights(ctx["incentive"], [int(u) for u in man.get("valid", [])])
        for uid, w in zip(uids, man["weights"], strict=True):
            if abs(expected.get(uid, 0.0) - float(w)) > 1e-9 * max(abs(float(w)), 1e-12):
                return check.tampered(
                    f"merge weight {w} of uid {uid}: the chain's incentive gives {expected.get(uid)}"
                )
        ours = self._expected_merge(verdicts, ctx["paid"], man)
        if set(ours) != set(uids):  # who is paid follows each validator's history: disputed, not proof
            check.unverifiable(
                f"merged {sorted(set(uids) - set(ours))} that we do not pay, left out {sorted(set(ours) - set(uids))}"
            )
        held = {
            u: (verdicts[u].delta, verdicts[u].measured_norm(), self.blob_hashes.get(u, ""))
            for u in uids if u in verdicts and verdicts[u].verdict == V.ok
        }  # fmt: skip
        hashes = self._pending_blob_hashes(ctx)
        held = {u: (d, n, hashes.get(u, sha)) for u, (d, n, sha) in held.items()}

        def loss_of(update) -> float:
            self.evaluator.set_params(self.master)
            if update is not None:
                apply_update(self.evaluator.params, update)
            return self.evaluator.loss(ctx["global_seqs"])

        return manifest.verify_update(
            check, doc, tensors, held, self.shapes, self.shadow, sent, loss_of, ctx["base_global"]
        )

    def _pending_blob_hashes(self, ctx: dict) -> dict[int, str]:
        return ctx.get("blob_hashes") or self.blob_hashes

    def _expected_merge(self, verdicts: dict, paid: set[int], man: dict) -> list[int]:
        """The merged set our own scores and weights give: paid, helpful (score above the tolerance),
        capped at `merge_peers` by the manifest's weights (the chain's), as the publisher caps it."""
        ours = [
            u
            for u, v in sorted(verdicts.items())
            if v.verdict == V.ok and v.score > SCORE_TOLERANCE and u in paid
        ]
        near = {u for u, v in verdicts.items() if v.verdict == V.ok and abs(v.score) <= SCORE_TOLERANCE}
        listed = [int(u) for u in man["uids"]]
        ours = sorted(set(ours) | (near & set(listed)))  # a score within the tolerance goes either way
        peers = self.settings.mechanism.merge_peers
        if peers and len(ours) > peers:
            w = {u: verdicts[u].merge_weight for u in ours}
            ours = sorted(sorted(ours, key=lambda u: (-w[u], u))[:peers])
        return ours

    def _report(self, check: manifest.Check) -> None:
        """Log (loud when tampered), metric, and on `tampered` distrust the publisher."""
        self.metrics.publisher_check(check.status)
        if check.status == "tampered":
            log.error(
                "PUBLISHER TAMPERED: update-%d of %s…: %s. We keep scoring (the miners did nothing wrong) "
                "and never continue from its masters after θ_%d", check.window, check.publisher[:10],
                check.reason, check.window,
            )  # fmt: skip
            known = self.state.distrusted.get(check.publisher)
            self.state.distrusted[check.publisher] = min(
                check.window, known if known is not None else check.window
            )
        elif check.status == "unverifiable":
            log.warning(
                "update-%d of %s…: unverifiable: %s", check.window, check.publisher[:10], check.reason
            )
        else:
            log.info(
                "update-%d of %s…: verified (%s)", check.window, check.publisher[:10], "; ".join(check.notes)
            )

    # --- evaluation -------------------------------------------------------------------------------

    def _open_peer(self, uid: int, commitment: str) -> Store | V:
        try:
            return self.peer_store(commitment)
        except ValueError as e:  # BadCommitment, a bad endpoint
            log.info("uid %d: bad commitment: %s", uid, e)
            return V.bad_commitment
        except Exception:  # noqa: BLE001 -- a bug of ours on a peer's input: loud, but the window goes on
            log.exception("uid %d: opening its commitment failed", uid)
            return V.peer_error

    def _peer_stores(
        self, window: int, mg: Metagraph, uids: list[int], block_hash: str
    ) -> Iterator[tuple[int, str, Store | V]]:
        """Each of `uids` that has committed a bucket and has a hotkey, in the window's seeded fetch
        order (`sample.fetch_order`), with its store opened, or the verdict its commitment earns."""
        commitments = self.chain.commitments()
        for uid in sample.fetch_order(self.netuid, window, block_hash, uids):
            commitment, hotkey = commitments.get(uid), mg.hotkey_of(uid)
            if commitment is not None and hotkey is not None:
                yield uid, hotkey, self._open_peer(uid, commitment)

    def fetch(self, window: int, mg: Metagraph, uids: list[int], block_hash: str = "") -> dict[int, Verdict]:
        """Download and validate the deltas of `uids` (the window's sample) for `window` (step 2), in
        the window's seeded order (`sample.fetch_order` of `block_hash`, the seed block's),
        `mechanism.fetch_concurrency` at a time, all within the fetch budget: what our own link could
        not fetch by then is `unfetched`, what a peer was slow with is `timeout` (`fetch_ordered`).

        Our canary is read first, on its own: if it does not come back intact, every uid is `skip`."""
        m = self.settings.mechanism
        self.io_seconds = 0.0  # the gather's seconds, for the record's fetch_seconds
        verdicts = {uid: Verdict(uid) for uid in uids}
        self.blob_hashes = {}
        items: list[tuple[Store, str]] = []
        owners: list[tuple[int, str]] = []
        for uid, hotkey, store in self._peer_stores(window, mg, uids, block_hash):
            if isinstance(store, V):
                verdicts[uid].verdict = store
                continue
            items.append((store, protocol.delta_key(self.netuid, window, hotkey)))
            owners.append((uid, hotkey))
        if not self._write_canary():
            return self._skip_all(verdicts, "cannot write our canary")
        io_start = time.perf_counter()
        deadline = time.monotonic() + self.fetch_budget()
        # The canary alone first, outside our link's rate limit: with the peers in the same fetch, a
        # read that charged the link first could leave our own canary `unfetched` and skip the window.
        (canary,) = fetch_ordered([(self.store, canary_key(self.netuid))], max_bytes=m.max_delta_bytes,
                                  deadline=deadline, concurrency=1, stall=m.fetch_stall_seconds)  # fmt: skip
        results = fetch_ordered(
            items, max_bytes=m.max_delta_bytes, deadline=deadline, concurrency=m.fetch_concurrency,
            link=self.link, stall=m.fetch_stall_seconds, slow_fraction=m.fetch_slow_fraction,
        ) if canary == self.canary else []  # fmt: skip
        self.io_seconds = time.perf_counter() - io_start
        self.fetched_bytes = sum(len(r) for r in results if isinstance(r, bytes | bytearray))
        if canary != self.canary:
            self._canary_written = False  # write it again next window (it may be gone)
            return self._skip_all(verdicts, f"our canary read back as {canary!r:.80}")
        expected_master = self.state.hashes.get(window, "")
        map_threads(  # decode and verify on `mechanism.host_threads` threads, each uid on its own
            lambda job: self._judge(verdicts[job[0][0]], window, job[0][1], expected_master, job[1]),
            zip(owners, results, strict=True), host_threads(m.host_threads),
        )  # fmt: skip
        self.blob_hashes = dict(sorted(self.blob_hashes.items()))  # uid order, whatever finished first
        return verdicts

    def fetch_slices(self, window: int, mg: Metagraph, uids: list[int], block_hash: str) -> dict[int, Delta]:
        """The slices (`bistro.delta.slices`) of `uids`' uploads for `window`: the uids outside the
        window's sample, read after it under `SLICE_SHARE` of the fetch budget, through our link, in
        the window's seeded order. A slice is a hint for the close controls, never a verdict: one
        that does not come back or does not decode is simply not there (logged)."""
        m = self.settings.mechanism
        if m.slice_fraction <= 0 or not uids:
            return {}
        ctx = codec_context(self.settings, window)
        spec = CODECS[m.codec].wire_spec(self.shapes, ctx)
        plan = slices.plan_slice(self.netuid, window, block_hash, spec, m.slice_fraction)
        items: list[tuple[Store, str]] = []
        owners: list[int] = []
        for uid, hotkey, store in self._peer_stores(window, mg, uids, block_hash):
            if isinstance(store, V):
                continue
            items.append((_SliceReader(store, plan, spec), protocol.delta_key(self.netuid, window, hotkey)))
            owners.append(uid)
        if not items:
            return {}
        results = fetch_ordered(
            items, max_bytes=plan.max_bytes,
            deadline=time.monotonic() + SLICE_SHARE * self.fetch_budget(), concurrency=SLICE_CONCURRENCY * m.fetch_concurrency,
            link=self.link, stall=m.fetch_stall_seconds, slow_fraction=m.fetch_slow_fraction,
        )  # fmt: skip
        out: dict[int, Delta] = {}
        why: dict[str, int] = {}
        for uid, result in zip(owners, results, strict=True):
            try:
                if isinstance(result, BaseException):
                    raise result
                out[uid] = slices.decode_slice(bytes(result), plan, spec, m.codec, ctx, self.shapes)
            except Exception as e:  # noqa: BLE001 -- a peer's bytes: no slice, and the window goes on
                log.debug("uid %d: no slice: %s: %s", uid, type(e).__name__, str(e)[:200])
                why[type(e).__name__] = why.get(type(e).__name__, 0) + 1
        self.sliced_bytes = sum(len(r) for r in results if isinstance(r, bytes | bytearray))
        log.info("window %d: slices of %d of %d unsampled uploads (%d parameters)%s", window, len(out),
                 len(uids), len(plan.names), f"; none from {why}" if why else "")  # fmt: skip
        return out

    def _write_canary(self) -> bool:
        if self._canary_written:
            return True
        try:
            self.store.put(canary_key(self.netuid), self.canary)
        except StorageError as e:
            log.warning("own bucket: %s", e)
            return False
        self._canary_written = True
        return True

    def seed_hash(self, window: int) -> str:
        """The hash of `window`'s seed block (`protocol.seed_block`), read once from the chain."""
        if window not in self.seed_hashes:
            grace = self.settings.mechanism.upload_grace_blocks
            self.seed_hashes[window] = self.chain.block_hash(protocol.seed_block(window, self.bpw, grace))
            if len(self.seed_hashes) > SEED_HASHES_KEPT:
                del self.seed_hashes[min(self.seed_hashes)]
        return self.seed_hashes[window]

    def fetch_budget(self) -> float:
        """Seconds all peer I/O of a window may take: `mechanism.fetch_seconds`, but never more than
        FETCH_SHARE of a window, so a hostile peer cannot make scoring miss the next window (a 20 s
        localnet window gets 5 s; Bittensor's 120 s window the full 30 s)."""
        window_seconds = self.bpw * self.block_time()
        return min(self.settings.mechanism.fetch_seconds, FETCH_SHARE * window_seconds)

    def _skip_all(self, verdicts: dict[int, Verdict], why: str) -> dict[int, Verdict]:
        log.warning("our own bucket failed (%s): the window is skipped for every uid", why)
        self.metrics.canary_failed()
        for v in verdicts.values():
            v.verdict, v.delta = V.skip, None
        return verdicts

    def _judge(
        self, v: Verdict, window: int, hotkey: str, master: str, result: bytes | BaseException
    ) -> None:
        """`v`'s verdict and delta from what its store gave us: never raises. With
        `mechanism.stream_deltas` the verified blob is kept and decoded again at each use."""
        uid = v.uid
        if isinstance(result, BaseException):
            v.verdict = fetch_verdict(result)
            log.log(logging.INFO if v.verdict in (V.missing, V.unfetched) else logging.WARNING,
                    "uid %d: %s: %s", uid, v.verdict.value, str(result)[:300])  # fmt: skip
            return
        try:
            blob = bytes(result)  # `bytes` is immutable: what redecode reads later is what was verified
            exp = expectation(self.settings, window, hotkey, master, self.shapes)
            v.accept(decode_delta(blob, exp), blob, exp, stream=self.settings.mechanism.stream_deltas)
            self.blob_hashes[uid] = manifest.blob_sha256(blob)
        except DeltaRejected as e:
            log.info("uid %d: rejected (%s): %s", uid, e.reason.value, e)
            v.verdict = fetch_verdict(e)
        except Exception:  # noqa: BLE001 -- a bug of ours on a peer's bytes: loud, but only this uid's
            log.exception("uid %d: decoding its delta failed", uid)
            v.verdict = V.peer_error

    # --- one window -------------------------------------------------------------------------------

    def evaluate(self, window: int) -> None:
        m = self.settings.mechanism
        start = time.perf_counter()
        mg = self.chain.metagraph()
        deferred = self._check_pending(mg)  # the previous window's update, with θ of then still held
        # The deltas of window w were trained from θ_w: score them on it and merge them into it.
        if not self.ensure_master(window, mg):
            log.warning("window %d: master θ_%d not available: not scored", window, window)
            return
        everyone = [int(u) for u in mg.uids if int(u) != self.uid]
        block_hash = self.seed_hash(window)
        uids = everyone
        drawn: list[int] | None = None
        if len(everyone) > m.max_uids_per_window:
            # drawn over every uid, ours included, so that every validator draws the same sample
            hashes = {w: self.seed_hash(w) for w in sample.hash_windows(window)}
            drawn = sample.scored_sample(
                self.netuid, window, hashes, [int(u) for u in mg.uids], m.max_uids_per_window
            )
            uids = [u for u in drawn if u != self.uid]
            log.info(
                "window %d: scoring the window's sample of %d of %d uids", window, len(uids), len(everyone)
            )
        fetch_start = time.perf_counter()
        verdicts = self.fetch(window, mg, uids, block_hash)
        # fetch_seconds: the peer I/O, what the deadline bounds; decode_seconds: our own checks and
        # decoding of what arrived (bounded by the codec's fixed layout, whatever a peer sends)
        fetched = time.perf_counter() - fetch_start
        timings = {
            "fetch_seconds": min(self.io_seconds, fetched),
            "decode_seconds": max(0.0, fetched - self.io_seconds),
        }
        self.sliced_bytes, slice_start = 0, time.perf_counter()
        outside = [u for u in everyone if u not in set(uids)]  # empty unless the window samples
        self.evaluator.slices = (window, self.fetch_slices(window, mg, outside, block_hash))
        timings["slice_seconds"] = time.perf_counter() - slice_start
        incentive = {int(u): float(i) for u, i in zip(mg.uids, mg.I, strict=True)}
        self.evaluator.drop_copies(verdicts, window, block_hash, self.master)
        base_global, global_seqs = self.evaluator.score(
            window, block_hash, self.master, verdicts, incentive, self.state.averages
        )
        timings["score_seconds"] = time.perf_counter() - fetch_start - fetched - timings["slice_seconds"]
        keep = {int(u) for u in mg.uids} - {self.uid}
        # skip and unfetched (our side, our link) judge nothing: the average stays as it was
        evaluated = {u for u in uids if verdicts[u].verdict not in NOT_JUDGED}
        previous = {u: a for u, a in self.state.averages.items() if u in keep}
        # The peer's fault costs more than a zero: skipping windows must not pay (m.fault_penalty).
        fault = scoring.fault_score(previous, m.fault_penalty)
        scores = {uid: (verdicts[uid].score if verdicts[uid].verdict == V.ok else fault) for uid in evaluated}
        averages = scoring.update_averages(previous, scores, evaluated, m.ma_alpha)
        # uids outside this window's sample keep their average untouched
        self.state.averages = {**{u: a for u, a in previous.items() if u not in evaluated}, **averages}
        for uid, v in verdicts.items():
            if v.verdict in (V.ok, V.skip):
                self.state.last_valid[uid] = window
        self.state.last_valid = {u: w for u, w in self.state.last_valid.items() if u in keep}
        judged = {u: verdicts[u].verdict == V.ok for u in evaluated}
        self.state.fault_streaks = scoring.update_fault_streaks(self.state.fault_streaks, judged, keep)
        # Paid only when consistently positive: one lucky window of a copy pays nothing.
        # Of windows it delivered a scored delta in: faults already cost it (fault_penalty, drop_faulted),
        # and a window every uid missed (our load, or the whole network's) must not reset them all.
        delivered = {uid: v.score for uid, v in verdicts.items() if v.verdict == V.ok}
        recent = scoring.remember_scores(self.state.recent, delivered, m.consistent_windows)
        self.state.recent = {u: xs for u, xs in recent.items() if u in keep}
        consistent = scoring.consistent(self.state.recent, m.consistent_windows)
        weights = scoring.weights_from_averages(self.state.averages, m.temperature, m.eligibility, consistent)
        weights = scoring.drop_inactive(weights, self.state.fault_streaks, m.inactive_windows)
        weights = scoring.drop_faulted(weights, (u for u, v in verdicts.items() if v.verdict in PEER_FAULTS))
        # The master takes only the deltas of uids the weights pay: under the mean merge a delta
        # counts whole wherever no other overlaps it, so a noise or poison delta that scored above 0
        # in one window by chance would enter the master at full strength.
        paid = {u for u, w in weights.items() if w > 0}
        master_info = self._publish(window, mg, verdicts, base_global, global_seqs, paid)
        if not master_info:  # another validator publishes update-{window}: check it against ours
            self._pending_check = {
                "window": window, "verdicts": verdicts, "base_global": base_global,
                "global_seqs": global_seqs, "paid": paid, "incentive": incentive,
                "sample": set(drawn) if drawn is not None else {int(u) for u in mg.uids}, "hash": self.state.hashes.get(window),
                "blob_hashes": dict(self.blob_hashes),
            }  # fmt: skip
            check = self._check_pending(mg)
        else:
            check = None
        if window % m.weights_every == 0 or self.state.weights_pending:
            self.state.weights_pending = not self.set_weights(weights)
        self.state.last_window = window
        record = self._window_record(window, verdicts, weights, master_info, time.perf_counter() - start)
        record.update({k: round(v, 3) for k, v in timings.items()}, bytes_fetched=self.fetched_bytes)
        record.update(sampled=len(uids), registered=len(everyone))  # the window's scored sample
        record.update(sliced=len(self.evaluator.slices[1]), bytes_sliced=self.sliced_bytes)
        for key, done in (("publisher_check", check), ("publisher_check_deferred", deferred)):
            if done is not None:
                record[key] = done.as_record()
        self._record(record)
        self._save_state()
        self._log_window(window, verdicts, weights, master_info, time.perf_counter() - start)

    def _publish(
        self, window: int, mg: Metagraph, verdicts, base_global: float, global_seqs, paid: set[int]
    ) -> dict:
        """The master step if we publish this window; our own bucket failing costs the publication
        (the next window carries the master on), not the scores."""
        if not self.publishes(window, mg):
            return {}
        try:
            return self.master_step(window, verdicts, base_global, global_seqs, paid)
        except StorageError as e:
            log.error("window %d: could not publish θ_%d: %s", window, window + 1, e)
            self.state.position = None  # caught up again from our bucket next window
            return {}

    def set_weights(self, weights: dict[int, float]) -> bool:
        uids = sorted(u for u, w in weights.items() if w > 0)
        if not uids:
            return True
        try:
            self.chain.set_weights(self.wallet, uids, [weights[u] for u in uids])
            log.info("set weights on %d uids", len(uids))
            self.metrics.weights_set()
            return True
        except ChainError as e:
            log.warning("set_weights refused: %s (will retry next window)", e)
            return False

    def _window_record(self, window, verdicts, weights, master_info, seconds) -> dict:
        return {
            "window": window,
            "master_window": self.state.position.window if self.state.position else None,
            "master_hash": self.state.position.hash if self.state.position else None,
            "seconds": round(seconds, 3),
            **master_info,
            "uids": {
                str(uid): {
                    "verdict": str(v.verdict),
                    "merge_weight": v.merge_weight,
                    "with_local": v.with_local,
                    "without_local": v.without_local,
                    "with_global": v.with_global,
                    "without_global": v.without_global,
                    "with_other": v.with_other,
                    "without_other": v.without_other,
                    "base_local": v.base_local,
                    "base_other": v.base_other,
                    "score": v.score,
                    "control_score": v.control_score,
                    "close_to": v.close_to,
                    "copy_of": v.copy_of,
                    "moving_average": self.state.averages.get(uid, 0.0),
                    "weight": weights.get(uid, 0.0),
                }  # fmt: skip
                for uid, v in sorted(verdicts.items())
            },
        }

    def _log_window(self, window, verdicts, weights, master_info, seconds) -> None:
        counts: dict[str, int] = {}
        for v in verdicts.values():
            counts[str(v.verdict)] = counts.get(str(v.verdict), 0) + 1
        best = sorted(((w, u) for u, w in weights.items() if w > 0), reverse=True)[:4]
        master = ""
        if master_info:
            state, step = "kept", master_info.get("step", 1.0)
            if master_info["accepted"]:
                state = "accepted" if step == 1.0 else f"accepted at {step:g}×U"
            master = "  master {} {:.4f} -> {:.4f}".format(
                state, master_info["global_loss_before"], master_info["global_loss_after"]
            )
        log.info(
            "window %d scored in %.1fs: %s  top weights %s%s", window, seconds,
            " ".join(f"{k}={n}" for k, n in sorted(counts.items())),
            " ".join(f"{u}:{w:.2f}" for w, u in best), master, extra={"window": window},
        )  # fmt: skip

    def run(self, max_windows: int = 0) -> None:
        """Score window w once its uploads are due (w's deadline, in w + 1), from the one after the
        last we saved, or the one that just closed, until stopped."""
        grace = self.settings.mechanism.upload_grace_blocks
        try:
            done = self.run_windows(
                lambda: max(self.state.last_window + 1, self.window() - 1),
                max_windows,
                due=lambda w: protocol.upload_deadline(w, self.bpw, grace),
                newest=lambda current: current - 1,
                step=self.evaluate,
                # a bug of ours (peers' bytes are judged per uid inside): loud, this window unscored
                on_bug="scoring failed: not scored",
                unfinished="not scored yet",
            )
        finally:
            self.finish_checkpoint()  # a checkpoint still uploading: listed if it ends in time
        log.info("validator stopped after %d windows", done)


def main(settings: Settings, args: argparse.Namespace, group: object | None = None) -> int:
    """`bistro validator`; `group`: the `distributed.ScoringGroup` of a validator under torchrun."""
    try:
        validator = Validator(settings)
    except NotRegistered as e:
        log.error("%s", e)
        return 1
    validator.evaluator.group = group
    install_signals(validator.stopping)
    log.info("validator uid %d hotkey %s bucket %s", validator.uid, validator.hotkey, validator.commitment)
    try:
        validator.run(args.windows)
    except ProtocolMismatch as e:
        log.error("%s", e)
        return 2
    return 0


class _SliceReader(Store):
    """A peer's store seen through `slices.read_slice`: `get` returns the slice's bytes (header and
    run) by two range reads, so `fetch_ordered` bounds, orders and times slices as it does deltas."""

    def __init__(self, store: Store, plan: slices.SlicePlan, spec: dict) -> None:
        self.store, self.plan, self.spec, self.bucket = store, plan, spec, store.bucket

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        return slices.read_slice(
            lambda start, length: self.store.get_range(key, start, length, deadline=deadline),
            self.plan, self.spec,
        )  # fmt: skip

    def put(self, key: str, data: bytes) -> None:
        raise StorageError("read only")

    def head(self, key: str) -> None:
        raise StorageError("read only")

    def list(self, prefix: str = "") -> list:
        raise StorageError("read only")

    def delete(self, key: str) -> None:
        raise StorageError("read only")
