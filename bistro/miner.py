"""The miner (docs/design.md "Miner loop").

Each window w: catch up to θ_w; train on the window's local pages (AdamW whose state stays from
window to window); Δ = trained − θ_w; compress with the codec, keeping the error-feedback residual;
sign; upload in the background while the next window trains; delete own objects older than
`retention_windows`. A window whose upload would land after its deadline is skipped, not sent late.

Under `torchrun --nproc_per_node N`, every rank trains on its shard of each batch (gradients are
averaged by the Trainer); rank 0 alone talks to the chain and the buckets and broadcasts the window
and the master to the others.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import protocol
from .chain.base import ChainError
from .config import ConfigError, Settings
from .data.pages import local_pages
from .delta import Sparse
from .delta.codec import CODECS, CodecContext, ErrorFeedback, codec_context, compress, full
from .delta.wire import encode_delta
from .master import Position, ProtocolMismatch
from .node import Node, NotRegistered, install_signals
from .statefile import read_json, read_tensors, write_json, write_tensors
from .storage.base import StorageError
from .training import Trainer

log = logging.getLogger("bistro.miner")

RETRY_PAUSE = (0.25, 2.0)
"""First and longest pause (seconds) between upload attempts within a window."""


@dataclass
class Upload:
    window: int
    key: str
    nbytes: int


class Miner(Node):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "miner")
        self.state_dir = settings.home / "miner"
        self.codec = CODECS[settings.mechanism.codec]
        self.trainer = Trainer(self.model, settings.train, settings.device)
        self.position: Position | None = None
        self.ef = ErrorFeedback()
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self.pending: Future | None = None
        self.unsent: tuple[int, dict[str, torch.Tensor]] | None = None
        """(window, wire) of the honest delta whose upload is not confirmed yet: if it never
        happens, what it carried goes back into the error-feedback residual."""
        self.last_window = -1
        self.mg = None
        """The metagraph of the window being mined (read once by `sync`)."""
        self.step_seconds: float | None = None
        """Seconds per training step (moving average): how many steps fit before a deadline."""
        self.send_seconds = 2.0
        """Seconds to compress, sign and upload (moving average), kept free before a deadline."""
        self.upload_seconds = 0.0
        """Duration of the last finished upload."""
        self._load_state()

    # --- state ------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        meta = read_json(self.state_dir / "state.json")
        if meta is None:
            return
        self.last_window = int(meta.get("last_window", -1))
        tensors = read_tensors(self.state_dir / "residual.safetensors")
        if tensors is not None:
            self.ef = ErrorFeedback.from_tensors(tensors)
        opt = read_tensors(self.state_dir / "optimizer.safetensors")
        if opt is not None and meta.get("optimizer"):
            self.trainer.load_state_dict(opt, meta["optimizer"])
        log.info("resumed: last window %d, residual %s", self.last_window, "kept" if tensors else "none")

    def _save_state(self) -> None:
        tensors, meta = self.trainer.state_dict()
        write_tensors(self.state_dir / "optimizer.safetensors", tensors)
        write_tensors(self.state_dir / "residual.safetensors", self.ef.to_tensors())
        # state.json last: it names the window the tensor files belong to.
        write_json(self.state_dir / "state.json", {"last_window": self.last_window, "optimizer": meta})

    # --- one window -------------------------------------------------------------------------------

    def sync(self, window: int) -> bool:
        """Hold θ_window in `self.master`, waiting for it while the window lasts."""
        end = protocol.window_start(window + 1, self.bpw)
        mg = self.chain.metagraph()  # once a window: polite to a public endpoint
        self.mg = mg
        while not self.stopping.is_set():
            if self.position is not None and self.position.window == window:
                return True
            position = self.sync_master(self.master, self.position, window, mg)
            self.position = position
            if position is not None and position.window == window:
                return True
            if position is not None and position.window > window:
                return False
            if self.chain.block() >= end - 1:
                return False
            time.sleep(max(self.block_time() / 2, 0.1))
        return False

    def steps_that_fit(self, window: int) -> int:
        """`steps_per_window`, or fewer if that many would miss the upload deadline.

        Miners start when θ_window is published, after the previous window's scoring, so the time
        left varies with the validator's load; a miner on a slow or busy machine sends a smaller
        delta on time rather than none."""
        target = self.settings.train.steps_per_window
        if self.step_seconds is None:
            return target
        block_time = self.block_time()
        deadline = protocol.upload_deadline(window, self.bpw, self.settings.mechanism.upload_grace_blocks)
        seconds_left = (deadline - self.chain.block() - 1) * block_time - self.send_seconds
        return max(1, min(target, int(seconds_left / self.step_seconds)))

    def train(self, window: int, steps: int | None = None) -> tuple[dict[str, torch.Tensor], object]:
        """Train from θ_window on our local pages; return Δ = trained − θ_window."""
        steps = self.steps_that_fit(window) if steps is None else steps
        if steps < self.settings.train.steps_per_window:
            log.info("window %d: %d of %d steps fit before the deadline", window, steps,
                     self.settings.train.steps_per_window)  # fmt: skip
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.master[name])
        pages = local_pages(self.netuid, self.uid, window, self.pages)
        sequences = self.dataset.sequences(pages)
        stats = self.trainer.train(sequences, steps)
        per_step = stats.seconds / max(stats.steps, 1)
        self.step_seconds = (
            per_step if self.step_seconds is None else 0.5 * self.step_seconds + 0.5 * per_step
        )
        with torch.no_grad():
            delta = {name: (p.detach() - self.master[name]) for name, p in self.params.items()}
        return delta, stats

    def encode(self, window: int, wire: dict[str, torch.Tensor]) -> bytes:
        m = self.settings.mechanism
        return encode_delta(
            wire,
            keypair=self.keypair,
            netuid=self.netuid,
            uid=self.uid,
            window=window,
            codec=m.codec,
            codec_params=self.codec.params(self.ctx(window)),
            master_window=self.position.window if self.position else window,
            master_hash=self.position.hash if self.position else "",
        )

    def ctx(self, window: int) -> CodecContext:
        return codec_context(self.settings, window)

    def upload(self, window: int, blob: bytes) -> None:
        """Upload in the background until it lands or the deadline passes; one upload at a time.

        A ChainError or StorageError inside is logged and retried (with backoff) until the deadline:
        it never ends the miner. An upload that would land late is skipped, not sent."""
        self.wait_upload()
        deadline = protocol.upload_deadline(window, self.bpw, self.settings.mechanism.upload_grace_blocks)
        key = protocol.delta_key(self.netuid, window, self.hotkey)
        block_time = self.block_time()
        # the deadline in our own clock, for when the chain does not answer
        try:
            ends = time.monotonic() + (deadline - self.chain.block()) * block_time
        except ChainError:
            ends = time.monotonic() + self.bpw * block_time

        def run() -> Upload | None:
            pause = RETRY_PAUSE[0]
            while not self.stopping.is_set():
                try:
                    return self._put_once(window, key, blob, deadline)
                except (ChainError, StorageError) as e:
                    if time.monotonic() + pause >= ends:
                        log.warning("window %d: upload failed before the deadline: %s", window, e)
                        return None
                    log.warning("window %d: upload: %s (retry in %.1fs)", window, e, pause)
                    time.sleep(pause)
                    pause = min(pause * 2, RETRY_PAUSE[1])
            return None

        self.pending = self.uploader.submit(run)

    def _put_once(self, window: int, key: str, blob: bytes, deadline: int) -> Upload | None:
        if self.chain.block() >= deadline:
            log.warning("window %d: upload would be late (deadline block %d): skipped", window, deadline)
            return None
        start = time.perf_counter()
        self.store.put(key, blob)
        self.upload_seconds = time.perf_counter() - start
        log.info(
            "window %d: uploaded %s (%.1f KiB in %.2fs)", window, key.rsplit("/", 1)[-1][:12],
            len(blob) / 1024, self.upload_seconds,
        )  # fmt: skip
        return Upload(window, key, len(blob))

    def wait_upload(self) -> Upload | None:
        """Wait for the upload in flight; settle the residual by whether it landed."""
        if self.pending is None:
            return None
        try:
            done = self.pending.result()
        except Exception:  # noqa: BLE001 -- a bug in the upload path must not end the miner
            log.exception("upload failed")
            done = None
        self.pending = None
        unsent, self.unsent = self.unsent, None
        if unsent is not None and (done is None or done.window != unsent[0]):
            self._restore_unsent(*unsent)
        return done

    def _restore_unsent(self, window: int, wire: dict[str, torch.Tensor]) -> None:
        """The upload of `window` never happened: add what it carried back into the residual, so the
        residual is again everything not sent (target, not target − sent)."""
        sent = self.codec.decode(wire, self.ctx(window), self.shapes)
        with torch.no_grad():
            for name, part in sent.items():
                t = self.ef.residual[name]
                if isinstance(part, Sparse):
                    t.view(-1).index_add_(0, part.indices.to(t.device), part.values.to(t.device))
                else:
                    t.add_(full(part).to(t.device).view_as(t))
        log.info("window %d: not uploaded: its delta stays in the error-feedback residual", window)

    def cleanup(self, window: int) -> None:
        """Delete our own deltas older than retention_windows."""
        keep_from = window - self.settings.mechanism.retention_windows
        try:
            for info in self.store.list(protocol.delta_prefix(self.netuid)):
                parsed = protocol.parse_delta_key(info.key)
                if parsed and parsed[2] == self.hotkey and parsed[1] < keep_from:
                    self.store.delete(info.key)
        except StorageError as e:
            log.warning("cleanup: %s", e)

    def step(self, window: int) -> None:
        if not self.sync(window):
            log.warning("window %d: master θ_%d not available in time: skipped", window, window)
            return
        start = time.perf_counter()
        blob, stats = self.produce(window)
        if blob is not None:
            self.upload(window, blob)
            if stats is not None:  # compress + sign now, plus the last upload's duration
                spent = time.perf_counter() - start - stats.seconds + self.upload_seconds
                self.send_seconds = 0.5 * self.send_seconds + 0.5 * spent
        # The master of the next window comes after this one's deadline anyway: wait for the upload
        # here, so the residual is settled (and saved) by whether it landed.
        self.wait_upload()
        incentive = self.mg.incentive_of(self.uid)  # this window's, read by sync
        if stats is not None:
            log.info(
                "window %d: loss %.4f  %.0f tok/s  %d steps  %.1fs  incentive %.4f",
                window, stats.loss, stats.tokens_per_s, self.settings.train.steps_per_window,
                time.perf_counter() - start, incentive, extra={"window": window},
            )  # fmt: skip
        else:
            log.info("window %d: no training  incentive %.4f", window, incentive, extra={"window": window})
        self.metrics.window({
            "window": window, "loss": getattr(stats, "loss", None), "tokens_per_s": getattr(stats, "tokens_per_s", None),
            "bytes_uploaded": len(blob) if blob else 0, "upload_seconds": self.upload_seconds, "incentive": incentive,
            "master_window": self.position.window if self.position else None,
            "master_hash": self.position.hash if self.position else None,
        })  # fmt: skip
        self.last_window = window
        self._save_state()
        self.cleanup(window)

    def produce(self, window: int) -> tuple[bytes | None, object]:
        """The blob to upload for `window` (None: nothing) and its training stats (None: no training)."""
        return self.honest(window)

    def honest(self, window: int) -> tuple[bytes, object]:
        """The honest path: train, compress with error feedback, sign."""
        delta, stats = self.train(window)
        self.wait_upload()  # the residual must be settled before it feeds this window's delta
        wire = compress(delta, self.codec, self.ctx(window), self.ef)
        self.unsent = (window, wire)
        return self.encode(window, wire), stats

    def run(self, max_windows: int = 0) -> None:
        """Mine every window from now (or the one after the last we saved) until stopped."""
        done = self.run_windows(
            lambda: max(self.window(), self.last_window + 1),
            max_windows,
            due=lambda w: protocol.window_start(w, self.bpw),
            newest=lambda current: current,
            step=self.step,
        )
        self.close()
        log.info("miner stopped after %d windows", done)

    def close(self) -> None:
        """Finish the upload in flight and stop the uploader."""
        self.wait_upload()
        self.uploader.shutdown(wait=True)


def main(settings: Settings, args: argparse.Namespace, make: Callable[[Settings], Miner] = Miner) -> int:
    """One miner process (`bistro miner`; under torchrun the CLI calls `distributed.run_distributed`).
    `make` builds the miner (a subclass for research: `bistro persona-miner`)."""
    try:
        miner = make(settings)
    except (NotRegistered, ConfigError) as e:
        log.error("%s", e)
        return 1
    install_signals(miner.stopping)
    log.info("miner uid %d hotkey %s bucket %s", miner.uid, miner.hotkey, miner.commitment)
    try:
        miner.run(args.windows)
    except ProtocolMismatch as e:
        log.error("%s", e)
        miner.close()
        return 2
    return 0
