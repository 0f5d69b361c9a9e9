"""The validator (DESIGN.md "Mechanism", one validator, window w; the maths is in scoring.py).

While window w+1 runs, after window w's upload deadline:

    1. metagraph and commitments
    2. download every uid's delta for w in parallel; validate (wire.decode_delta); drop copies
    3. merge weights m_i = normalize(max(I_i, 1/|V|))
    4. θ_eval = θ_w + Σ m_i Δ_i            (θ_w: the master these deltas were trained from)
    5. per uid: loss with (one batched pass shared by all uids) and without its delta, on its eval
       pages and on the global pages; the delta goes back bit-exactly (saved values restored)
    6. moving averages; 7. softmax weights, set on the chain every `weights_every` windows
    8. the top-stake validator: θ_{w+1} = θ_w + Σ_{s_i>0} m_i Δ_i if that lowers the global
       loss, else θ_w; published as update-{w} (+ checkpoint) and LATEST.json; miners of window
       w+1 wait for it

State (moving averages, last window done, master position) is saved atomically after every window,
so a validator killed at any instant resumes with nothing lost and nothing counted twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol, scoring
from .chain.base import ChainError, Metagraph
from .config import Settings
from .delta.wire import DeltaRejected, decode_delta
from .evaluator import Evaluator, Verdict, expectation
from .master import Position, Publisher, apply_update, load_params
from .model import build_model, model_hash
from .node import Node, NotRegistered
from .statefile import read_json, read_tensors, write_atomic, write_json, write_tensors
from .storage import gather
from .storage.base import NotFound, StorageError, TooLarge

log = logging.getLogger("bistro.validator")


@dataclass
class State:
    averages: dict[int, float] = field(default_factory=dict)
    last_window: int = -1
    position: Position | None = None
    hashes: dict[int, str] = field(default_factory=dict)
    storage_misses: dict[int, int] = field(default_factory=dict)
    weights_pending: bool = False
    last_valid: dict[int, int] = field(default_factory=dict)
    """Last window in which each uid's delta was valid (or skipped for our own storage errors)."""
    checkpoints: list[int] = field(default_factory=list)
    """Windows of the master checkpoints we publish and keep (publisher only)."""

    def to_json(self) -> dict:
        return {
            "averages": {str(k): v for k, v in self.averages.items()},
            "last_window": self.last_window,
            "position": None if self.position is None else [self.position.window, self.position.hash],
            "hashes": {str(k): v for k, v in self.hashes.items()},
            "storage_misses": {str(k): v for k, v in self.storage_misses.items()},
            "weights_pending": self.weights_pending,
            "checkpoints": self.checkpoints,
            "last_valid": {str(k): v for k, v in self.last_valid.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> State:
        pos = d.get("position")
        return cls(
            averages={int(k): float(v) for k, v in d.get("averages", {}).items()},
            last_window=int(d.get("last_window", -1)),
            position=None if pos is None else Position(int(pos[0]), str(pos[1])),
            hashes={int(k): str(v) for k, v in d.get("hashes", {}).items()},
            storage_misses={int(k): int(v) for k, v in d.get("storage_misses", {}).items()},
            weights_pending=bool(d.get("weights_pending", False)),
            checkpoints=[int(c) for c in d.get("checkpoints", [])],
            last_valid={int(k): int(v) for k, v in d.get("last_valid", {}).items()},
        )


class Validator(Node):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "validator")
        self.state_dir = settings.home / "validator"
        self.state = State()
        self.publisher = Publisher(self.store, self.keypair, self.netuid)
        self.stopping = threading.Event()
        self.model.eval()
        self.evaluator = Evaluator(settings, self.model, self.dataset)
        self._load_state()

    # --- state ------------------------------------------------------------------------------------

    def _master_file(self, window: int) -> Path:
        return self.state_dir / f"master-{window}.safetensors"

    def _load_state(self) -> None:
        raw = read_json(self.state_dir / "state.json")
        if raw is None:
            return
        self.state = State.from_json(raw)
        self._drop_unsaved_records()
        pos = self.state.position
        tensors = read_tensors(self._master_file(pos.window)) if pos else None
        if pos is not None and tensors is not None:
            load_params(self.master, tensors)
            if model_hash(self.master) != pos.hash:
                log.warning("saved master does not match its hash: will catch up again")
                self.state.position = None
        elif pos is not None:
            self.state.position = None
        log.info(
            "resumed: last window %d, %d moving averages", self.state.last_window, len(self.state.averages)
        )

    def _save_state(self) -> None:
        pos = self.state.position
        if pos is not None and not self._master_file(pos.window).exists():
            write_tensors(self._master_file(pos.window), self.master)
        write_json(self.state_dir / "state.json", self.state.to_json())
        for old in self.state_dir.glob("master-*.safetensors"):
            if pos is None or old != self._master_file(pos.window):
                old.unlink(missing_ok=True)

    def _drop_unsaved_records(self) -> None:
        """Forget records of windows the saved state does not hold (killed between writing the record
        and the state): the window is scored again, and must not be listed twice."""
        path = self.state_dir / "windows.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["window"] <= self.state.last_window:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut short by the kill
        if len(kept) != len(lines):
            write_atomic(path, "".join(line + "\n" for line in kept).encode())

    def _record(self, record: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "windows.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- master -----------------------------------------------------------------------------------

    def is_publisher(self, mg: Metagraph) -> bool:
        return mg.top_validator() == self.hotkey

    def ensure_master(self, window: int, mg: Metagraph) -> bool:
        """Hold θ_window in self.master (publishing the initial master if we are the top validator
        and there is none)."""
        pos = self.state.position
        if pos is not None and pos.window == window:
            return True
        if self.is_publisher(mg):
            if pos is None and self.follower.latest(self.store, self.hotkey) is None:
                return self._publish_initial(window)
            if pos is not None and pos.window < window:
                # We were away: the master did not move in the windows we missed.
                for w in range(pos.window, window):
                    self.publisher.update(w, None, pos.hash, pos.hash, reason="validator_offline")
                self.state.position = Position(window, pos.hash)
                self.state.hashes[window] = pos.hash
                self.publisher.latest(window, pos.hash, self.state.checkpoints)
                return True
        position = self.sync_master(self.master, pos, window, mg)
        self.state.position = position
        if position is None:
            return False
        if self.is_publisher(mg) and not self.state.checkpoints:
            # Our state is gone but our bucket holds the master: go on from its checkpoints (else
            # the next LATEST.json would name none and the master step would fail every window).
            latest = self.follower.latest(self.store, self.hotkey) or {}
            self.state.checkpoints = [int(c) for c in latest.get("checkpoints", [])]
        self.state.hashes[position.window] = position.hash
        return position.window == window

    def _publish_initial(self, window: int) -> bool:
        model = build_model(self.settings.model, seed=self.settings.model.seed)
        init = {k: v.detach().to(self.device) for k, v in dict(model.named_parameters()).items()}
        load_params(self.master, {k: init[k] for k in self.master})
        digest = model_hash(self.master)
        self.publisher.checkpoint(window, self.master, digest)
        self.state.checkpoints = [window]
        self.publisher.latest(window, digest, self.state.checkpoints)
        self.state.position = Position(window, digest)
        self.state.hashes[window] = digest
        log.info("published the initial master θ_%d %s", window, digest[:12])
        return True

    def master_step(self, window: int, verdicts: dict[int, Verdict], base_global: float, global_seqs) -> dict:
        """Step 8 and publication: θ_{window+1} = θ_window (+ U if it lowers the global loss)."""
        pos = self.state.position
        update, info = self.evaluator.propose_update(self.master, verdicts, base_global, global_seqs)
        if update is not None:
            apply_update(self.master, update)
        digest = model_hash(self.master) if update is not None else pos.hash
        self.publisher.update(window, update, pos.hash, digest, uids=info["merged_uids"])
        if (window + 1) % self.settings.mechanism.checkpoint_every == 0:
            self.publisher.checkpoint(window + 1, self.master, digest)
            self.state.checkpoints = sorted({*self.state.checkpoints, window + 1})[-2:]
            self.publisher.prune(self.state.checkpoints)
        self.state.position = Position(window + 1, digest)
        self.state.hashes[window + 1] = digest
        self.state.hashes = dict(sorted(self.state.hashes.items())[-16:])
        self.publisher.latest(window + 1, digest, self.state.checkpoints)
        return info

    # --- evaluation -------------------------------------------------------------------------------

    def fetch(self, window: int, mg: Metagraph, uids: list[int]) -> dict[int, Verdict]:
        """Download and validate every uid's delta for `window` (step 2)."""
        m = self.settings.mechanism
        commitments = self.chain.commitments()
        verdicts = {uid: Verdict(uid) for uid in uids}
        items, owners = [], []
        for uid in uids:
            commitment, hotkey = commitments.get(uid), mg.hotkey_of(uid)
            if commitment is None or hotkey is None:
                continue
            try:
                store = self.peer_store(commitment)
            except ValueError:
                verdicts[uid].verdict = "bad_commitment"
                continue
            items.append((store, protocol.delta_key(self.netuid, window, hotkey)))
            owners.append((uid, hotkey))
        results = gather(items, max_bytes=m.max_delta_bytes, timeout=self.settings.storage.timeout * 2)
        expected_master = self.state.hashes.get(window, "")
        for (store, key), (uid, hotkey), result in zip(items, owners, results, strict=True):
            v = verdicts[uid]
            if isinstance(result, NotFound):
                v.verdict = "missing"
            elif isinstance(result, TooLarge):
                v.verdict = "too_large"
            elif isinstance(result, BaseException):
                v.verdict = "storage_error"
                log.warning("uid %d: cannot fetch %s: %s", uid, key, result)
            else:
                try:
                    decoded = decode_delta(
                        result, expectation(self.settings, window, hotkey, expected_master, self.shapes)
                    )
                    v.verdict, v.delta = "ok", decoded.delta
                    info = store.head(key)
                    v.uploaded = info.last_modified.timestamp() if info else float("inf")
                except DeltaRejected as e:
                    v.verdict = e.reason.value
                    log.info("uid %d: rejected (%s): %s", uid, e.reason.value, e)
                except StorageError as e:
                    v.verdict = "storage_error"
                    log.warning("uid %d: %s", uid, e)
        return verdicts

    # --- one window -------------------------------------------------------------------------------

    def evaluate(self, window: int) -> None:
        m = self.settings.mechanism
        start = time.perf_counter()
        mg = self.chain.metagraph()
        # The deltas of window w were trained from θ_w: score them on it and merge them into it.
        if not self.ensure_master(window, mg):
            log.warning("window %d: master θ_%d not available: not scored", window, window)
            return
        everyone = [int(u) for u in mg.uids if int(u) != self.uid]
        uids = scoring.rotating_sample(everyone, window, m.max_uids_per_window)
        if len(uids) < len(everyone):
            log.info(
                "window %d: scoring a rotating sample of %d of %d uids", window, len(uids), len(everyone)
            )
        verdicts = self.fetch(window, mg, uids)
        self._forgive_own_storage_errors(verdicts)
        self.evaluator.drop_copies(verdicts)
        incentive = {int(u): float(i) for u, i in zip(mg.uids, mg.I, strict=True)}
        block_hash = self.chain.block_hash(protocol.window_last_block(window, self.bpw))
        base_global, global_seqs = self.evaluator.score(window, block_hash, self.master, verdicts, incentive)
        master_info = (
            self.master_step(window, verdicts, base_global, global_seqs) if self.is_publisher(mg) else {}
        )
        scores = {uid: v.score for uid, v in verdicts.items() if v.verdict != "skip"}
        keep = {int(u) for u in mg.uids} - {self.uid}
        evaluated = {u for u in uids if verdicts[u].verdict != "skip"}  # a skip keeps its average
        previous = {u: a for u, a in self.state.averages.items() if u in keep}
        averages = scoring.update_averages(previous, scores, evaluated, m.ma_alpha)
        # uids outside this window's sample keep their average untouched
        self.state.averages = {**{u: a for u, a in previous.items() if u not in evaluated}, **averages}
        for uid, v in verdicts.items():
            if v.verdict in ("ok", "skip"):
                self.state.last_valid[uid] = window
        self.state.last_valid = {u: w for u, w in self.state.last_valid.items() if u in keep}
        weights = scoring.weights_from_averages(self.state.averages, m.temperature, m.eligibility)
        weights = scoring.drop_inactive(weights, self.state.last_valid, window, m.inactive_windows)
        if window % m.weights_every == 0 or self.state.weights_pending:
            self.state.weights_pending = not self.set_weights(weights)
        self.state.last_window = window
        self._record(self._window_record(window, verdicts, weights, master_info, time.perf_counter() - start))
        self._save_state()
        self._log_window(window, verdicts, weights, master_info, time.perf_counter() - start)

    def _forgive_own_storage_errors(self, verdicts: dict[int, Verdict]) -> None:
        """A uid whose object we could not fetch through our own storage errors is skipped (average
        untouched) up to `storage_tolerance` windows in a row, then scored zero."""
        tolerance = self.settings.mechanism.storage_tolerance
        for uid, v in verdicts.items():
            if v.verdict == "storage_error":
                misses = self.state.storage_misses.get(uid, 0) + 1
                self.state.storage_misses[uid] = misses
                if misses <= tolerance:
                    v.verdict = "skip"
            else:
                self.state.storage_misses.pop(uid, None)

    def set_weights(self, weights: dict[int, float]) -> bool:
        uids = sorted(u for u, w in weights.items() if w > 0)
        if not uids:
            return True
        try:
            self.chain.set_weights(self.wallet, uids, [weights[u] for u in uids])
            log.info("set weights on %d uids", len(uids))
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
                    "verdict": v.verdict,
                    "merge_weight": v.merge_weight,
                    "with_local": v.with_local,
                    "without_local": v.without_local,
                    "with_global": v.with_global,
                    "without_global": v.without_global,
                    "score": v.score,
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
            counts[v.verdict] = counts.get(v.verdict, 0) + 1
        best = sorted(((w, u) for u, w in weights.items() if w > 0), reverse=True)[:4]
        master = ""
        if master_info:
            master = "  master {} {:.4f} -> {:.4f}".format(
                "accepted" if master_info["accepted"] else "kept",
                master_info["global_loss_before"], master_info["global_loss_after"],
            )  # fmt: skip
        log.info(
            "window %d scored in %.1fs: %s  top weights %s%s", window, seconds,
            " ".join(f"{k}={n}" for k, n in sorted(counts.items())),
            " ".join(f"{u}:{w:.2f}" for w, u in best), master,
        )  # fmt: skip

    def run(self, max_windows: int = 0) -> None:
        self.ensure_commitment()
        grace = self.settings.mechanism.upload_grace_blocks
        window = max(self.state.last_window + 1, self.window() - 1)
        done = 0
        while not self.stopping.is_set() and (max_windows == 0 or done < max_windows):
            if not self.wait_for_block(
                protocol.upload_deadline(window, self.bpw, grace), self.stopping.is_set
            ):
                break
            current = self.window()
            if current > window + 1:
                log.warning("behind: windows %d..%d not scored", window, current - 2)
                window = current - 1
            self.evaluate(window)
            done += 1
            window += 1
        log.info("validator stopped after %d windows", done)


def main(settings: Settings, args: argparse.Namespace) -> int:
    try:
        validator = Validator(settings)
    except NotRegistered as e:
        log.error("%s", e)
        return 1

    def handler(signum, frame) -> None:  # noqa: ARG001
        log.info("signal %d: finishing the current window, then stopping", signum)
        if validator.stopping.is_set():
            raise KeyboardInterrupt
        validator.stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    log.info("validator uid %d hotkey %s bucket %s", validator.uid, validator.hotkey, validator.commitment)
    validator.run(args.windows)
    return 0
