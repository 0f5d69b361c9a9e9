"""The miner (DESIGN.md "Miner loop").

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
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import protocol
from .config import Settings
from .data.pages import local_pages
from .delta.codec import CODECS, CodecContext, ErrorFeedback, compress
from .delta.wire import encode_delta
from .master import Position
from .node import Node, NotRegistered
from .personas import Persona, make_persona
from .statefile import read_json, read_tensors, write_json, write_tensors
from .storage.base import StorageError
from .training import Trainer

log = logging.getLogger("bistro.miner")


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
        self.persona: Persona = make_persona(settings.persona, self)
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self.pending: Future | None = None
        self.last_window = -1
        self.step_seconds: float | None = None
        """Seconds per training step (moving average): how many steps fit before a deadline."""
        self.send_seconds = 2.0
        """Seconds to compress, sign and upload (moving average), kept free before a deadline."""
        self.upload_seconds = 0.0
        """Duration of the last finished upload."""
        self.stopping = threading.Event()
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
        while not self.stopping.is_set():
            if self.position is not None and self.position.window == window:
                return True
            mg = self.chain.metagraph()
            position = self.sync_master(self.master, self.position, window, mg)
            self.position = position
            if position is not None and position.window == window:
                return True
            if position is not None and position.window > window:
                return False
            if self.chain.block() >= end - 1:
                return False
            time.sleep(max(getattr(self.chain, "block_time", 1.0) / 2, 0.1))
        return False

    def steps_that_fit(self, window: int) -> int:
        """`steps_per_window`, or fewer if that many would miss the upload deadline.

        Miners start when θ_window is published, after the previous window's scoring, so the time
        left varies with the validator's load; a miner on a slow or busy machine sends a smaller
        delta on time rather than none."""
        target = self.settings.train.steps_per_window
        if self.step_seconds is None:
            return target
        block_time = float(getattr(self.chain, "block_time", 12.0))
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
        """Upload in the background unless the deadline has passed; one upload in flight at a time."""
        self.wait_upload()
        deadline = protocol.upload_deadline(window, self.bpw, self.settings.mechanism.upload_grace_blocks)
        key = protocol.delta_key(self.netuid, window, self.hotkey)

        def run() -> Upload | None:
            if self.chain.block() >= deadline:
                log.warning("window %d: upload would be late (deadline block %d): skipped", window, deadline)
                return None
            start = time.perf_counter()
            self.store.put(key, blob)
            self.upload_seconds = time.perf_counter() - start
            log.info(
                "window %d: uploaded %s (%.1f KiB in %.2fs)", window, key.rsplit("/", 1)[-1][:12],
                len(blob) / 1024, time.perf_counter() - start,
            )  # fmt: skip
            return Upload(window, key, len(blob))

        self.pending = self.uploader.submit(run)

    def wait_upload(self) -> None:
        if self.pending is not None:
            try:
                self.pending.result()
            except StorageError as e:
                log.warning("upload failed: %s", e)
            self.pending = None

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
        blob, stats = self.persona.produce(window)
        if blob is not None:
            self.upload(window, blob)
            if stats is not None:  # compress + sign now, plus the last upload's duration
                spent = time.perf_counter() - start - stats.seconds + self.upload_seconds
                self.send_seconds = 0.5 * self.send_seconds + 0.5 * spent
        incentive = self.chain.metagraph().incentive_of(self.uid)
        if stats is not None:
            log.info(
                "window %d: loss %.4f  %.0f tok/s  %d steps  %.1fs  incentive %.4f",
                window, stats.loss, stats.tokens_per_s, self.settings.train.steps_per_window,
                time.perf_counter() - start, incentive,
            )  # fmt: skip
        else:
            log.info("window %d: %s  incentive %.4f", window, self.persona.name, incentive)
        self.last_window = window
        self._save_state()
        self.cleanup(window)

    def honest(self, window: int) -> tuple[bytes, object]:
        """The honest path: train, compress with error feedback, sign."""
        delta, stats = self.train(window)
        wire = compress(delta, self.codec, self.ctx(window), self.ef)
        return self.encode(window, wire), stats

    def run(self, max_windows: int = 0) -> None:
        self.ensure_commitment()
        done = 0
        window = max(self.window(), self.last_window + 1)
        while not self.stopping.is_set() and (max_windows == 0 or done < max_windows):
            if not self.wait_for_block(protocol.window_start(window, self.bpw), self.stopping.is_set):
                break
            current = self.window()
            if current > window:
                log.info("window %d already over: joining window %d", window, current)
                window = current
            self.step(window)
            done += 1
            window += 1
        self.wait_upload()
        self.uploader.shutdown(wait=True)
        log.info("miner stopped after %d windows", done)


def codec_context(settings: Settings, window: int) -> CodecContext:
    m = settings.mechanism
    return CodecContext(
        netuid=settings.chain.netuid, window=window, compression=m.compression, chunk=m.topk_chunk
    )


def _install_signals(stop: threading.Event) -> None:
    def handler(signum, frame) -> None:  # noqa: ARG001
        log.info("signal %d: finishing the current window, then stopping", signum)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(settings: Settings, args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import run_distributed

        return run_distributed(settings, args)
    try:
        miner = Miner(settings)
    except NotRegistered as e:
        log.error("%s", e)
        return 1
    _install_signals(miner.stopping)
    log.info(
        "miner uid %d hotkey %s bucket %s persona %s",
        miner.uid,
        miner.hotkey,
        miner.commitment,
        settings.persona,
    )
    miner.run(args.windows)
    return 0
