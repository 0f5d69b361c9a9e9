"""Miner behaviours for testing the incentive: the honest miner and the cheats it must beat.

    honest      train, compress with error feedback, sign, upload
    idle        registered, bucket committed, uploads nothing
    freeloader  uploads a zero delta
    noise       uploads random noise with the norm of a real delta (measured once by training)
    copycat     re-signs another miner's delta of the same window as its own, after it appears
    poison      uploads its trained delta reversed and amplified
    stale       re-uploads its delta of an older window
    backdater   a copycat that uploads itself and sets its object's time back to the window's start
                (os.utime on a local bucket; on S3 its own server would lie in Last-Modified)
    noisy_copier  a copy with its sent values jittered and re-encoded, decoded cosine about 0.92 to
                the original (the old copy_threshold 0.98 missed it, 0.8 catches it)
    blender     the mean of two other miners' deltas, re-encoded (cosine about 0.5-0.7 to each)
    copy_finetune  a copy plus a few training steps (a fifth of a window's) on its own pages
    shaped_copier  a copy of one paid miner's delta plus noise shaped like it (a random rank-1
                matrix on each matrix's low-rank part, Gaussian noise on the sparse values), sized
                so the decoded cosine to the source is about 0.7 both as whole vectors and in the
                low-rank factors: under both copy screens (0.8, 0.9)
    shaped_copier_05  the same at cosine about 0.5
    rotating_copier  a shaped copier (0.7) that copies a different paid miner each window
    shaped_finetune  a shaped copy (0.7) plus a fifth of a window's training on its own pages
    hostile:B   trains, signs and uploads honestly, but commits its own loopback HTTP server
                (`bistro.localnet.hostile`), which serves its bucket with misbehaviour B
                (`no_last_modified`, `content_range_star`, `status_500`, `trickle`,
                `hang_after_headers`, `slow_first_byte`, `redirect_metadata`, `huge_header`,
                `reset_mid_body`, `endless_chunked`, … : any of `BEHAVIOURS`)
    one_in_three  trains and uploads one real window in three (the first it mines, then every
                third); its server answers 500 for the others (the issue-13 attack that made a peer's failures look like ours)
    bad_commitment  commits `http://169.254.169.254/latest` (the cloud metadata service) as its
                bucket and uploads nothing

Each persona runs inside a real miner process, a `PersonaMiner` (`bistro persona-miner --persona
NAME`, started by the local network): only what it uploads (and commits) differs from `bistro miner`.
A production miner never imports this module.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Callable

import torch
from safetensors.torch import load as load_safetensors

from .. import protocol
from ..config import ConfigError, Settings
from ..data.pages import local_pages
from ..delta import Delta, delta_norm, low_rank_part, low_rank_similarity, similarity
from ..delta.codec import Mixed, Sparse, compress, densify
from ..delta.wire import DeltaRejected, decode_delta, expectation
from ..miner import Miner
from ..miner import main as miner_main
from ..storage.base import NotFound, StorageError
from .hostile import BEHAVIOURS, Behaviour, HostileServer, status_500

log = logging.getLogger("bistro.persona")

HOSTILE_PREFIX = "hostile:"
"""`hostile:<behaviour>`: an honest miner behind its own misbehaving server (`hostile.BEHAVIOURS`)."""


class Persona:
    name = "honest"

    def __init__(self, miner: Miner) -> None:
        self.miner = miner

    def produce(self, window: int) -> tuple[bytes | None, object]:
        """The blob to upload for `window` (None: nothing) and training stats (None: no training)."""
        return self.miner.honest(window)

    def commitment(self, own: str) -> str:
        """What the miner commits on chain as its bucket (`own`: its real bucket's commitment)."""
        return own

    def close(self) -> None:
        """Release what the persona started (the miner is stopping)."""

    def compress_plain(self, window: int, delta: dict[str, torch.Tensor]) -> bytes:
        """Encode without error feedback (cheats keep no residual)."""
        return self.miner.encode(window, compress(delta, self.miner.codec, self.miner.ctx(window), None))


class Idle(Persona):
    name = "idle"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        return None, None


class Freeloader(Persona):
    name = "freeloader"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        zero = {k: torch.zeros_like(v) for k, v in self.miner.master.items()}
        return self.compress_plain(window, zero), None


class Noise(Persona):
    name = "noise"
    norm: float | None = None

    def produce(self, window: int) -> tuple[bytes | None, object]:
        stats = None
        if self.norm is None:
            delta, stats = self.miner.train(window)
            self.norm = delta_norm(delta)
        g = torch.Generator().manual_seed(protocol.seed("noise", self.miner.uid, window))
        noise = {k: torch.randn(v.shape, generator=g) for k, v in self.miner.master.items()}
        scale = self.norm / delta_norm(noise)
        return self.compress_plain(window, {k: n * scale for k, n in noise.items()}), stats


class Poison(Persona):
    name = "poison"
    factor = -4.0

    def produce(self, window: int) -> tuple[bytes | None, object]:
        delta, stats = self.miner.train(window)
        return self.compress_plain(window, {k: d * self.factor for k, d in delta.items()}), stats


class Stale(Persona):
    name = "stale"
    blob: bytes | None = None

    def produce(self, window: int) -> tuple[bytes | None, object]:
        if self.blob is None:
            self.blob, stats = self.miner.honest(window)
            return self.blob, stats
        return self.blob, None


class Copycat(Persona):
    """Waits for another miner's delta of this window, then re-signs it as its own."""

    name = "copycat"
    sources = 1
    """How many other miners' deltas it needs."""

    def produce(self, window: int) -> tuple[bytes | None, object]:
        stolen = self.wait_for(window)
        return (None, None) if stolen is None else (self.forge(window, stolen), None)

    def forge(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> bytes:
        """The blob to upload from the stolen (wire tensors, decoded delta) pairs."""
        return self.miner.encode(window, stolen[0][0])

    def wait_for(self, window: int) -> list[tuple[dict[str, torch.Tensor], Delta]] | None:
        m = self.miner
        # up to the last block before the upload deadline: the honest uploads land late in a window
        grace = m.settings.mechanism.upload_grace_blocks
        deadline = protocol.upload_deadline(window, m.bpw, grace) - 1
        while m.chain.block() < deadline and not m.stopping.is_set():
            # Only paid work is worth stealing (a noise or idle uid's upload lands first) until the
            # last block before the deadline; then whatever is there.
            stolen = self._steal(window, paid_only=m.chain.block() < deadline - 1)
            if len(stolen) >= self.sources:
                return stolen
            time.sleep(0.5)
        return None

    def ranked(
        self, window: int, commitments: object, incentive_of: Callable[[int], float]
    ) -> list[tuple[int, str]]:
        """Whom to try first: the best-paid miners (that is whose work is worth stealing); the
        paid ones must come before the unpaid ones (`_steal` stops at the first unpaid one)."""
        return sorted(commitments, key=lambda kv: (-incentive_of(kv[0]), kv[0]))

    def _steal(self, window: int, paid_only: bool = False) -> list[tuple[dict[str, torch.Tensor], Delta]]:
        m = self.miner
        mg = m.chain.metagraph()
        ranked = self.ranked(window, m.chain.commitments().items(), mg.incentive_of)
        anyone_paid = any(mg.incentive_of(uid) > 0 for uid, _ in ranked)
        stolen = []
        for uid, commitment in ranked:
            hotkey = mg.hotkey_of(uid)
            if uid == m.uid or hotkey is None:
                continue
            if paid_only and anyone_paid and mg.incentive_of(uid) <= 0:
                break  # ranked: the rest are unpaid too
            try:
                blob = m.peer_store(commitment).get(
                    protocol.delta_key(m.netuid, window, hotkey),
                    max_bytes=m.settings.mechanism.max_delta_bytes,
                )
                exp = expectation(m.settings, window, hotkey, m.position.hash if m.position else "", m.shapes)
                decoded = decode_delta(blob, exp)
                if decoded.norm == 0.0:  # only copy what a validator would accept
                    continue
            except (NotFound, StorageError, ValueError, DeltaRejected):
                continue
            log.info("%s: copying uid %d's delta of window %d", self.name, uid, window)
            stolen.append((dict(load_safetensors(blob)), decoded.delta))
            if len(stolen) == self.sources:
                break
        return stolen


class Backdater(Copycat):
    """A copy whose object claims to be older than the original: uploads it itself, then sets the
    file's time to the window's start. Copy order by storage time would make the honest miner the
    copy; by own-page evidence, the backdate changes nothing."""

    name = "backdater"

    def produce(self, window: int) -> tuple[bytes | None, object]:
        stolen = self.wait_for(window)
        if stolen is None:
            return None, None
        m = self.miner
        key = protocol.delta_key(m.netuid, window, m.hotkey)
        m.store.put(key, self.forge(window, stolen))
        path = getattr(m.store, "dir", None)
        if path is not None:  # a local bucket: the file's mtime is what it reports as Last-Modified
            started = time.time() - (m.chain.block() - protocol.window_start(window, m.bpw)) * m.block_time()
            os.utime(path / key, (started, started))
            log.info("backdater: window %d object dated %.0fs earlier", window, time.time() - started)
        return None, None


class NoisyCopier(Copycat):
    """A copy with its sent values jittered, at the same positions (a `Mixed` part: its sparse values;
    its low-rank part is copied as is), and re-encoded with the codec (whatever its layout), the
    jitter sized so the decoded cosine (`similarity`) to the original is about
    `cosine`: under the old copy_threshold 0.98, over today's 0.8. A quantising codec snaps small
    jitter back to the original's bins, so the size is found by bisection on the decoded result."""

    name = "noisy_copier"
    cosine = 0.92

    def forge(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> bytes:
        m, original = self.miner, stolen[0][1]
        g = torch.Generator().manual_seed(protocol.seed("noisy-copier", m.uid, window))
        dense = densify(original, m.shapes)  # every codec's parts (sparse, dense, mixed) as tensors
        held = {  # the values it jitters: sparse ones (a Mixed part's too: its low-rank part stays), or all
            n: p.indices if isinstance(p, Sparse) else p.sparse.indices if isinstance(p, Mixed) else torch.arange(dense[n].numel())
            for n, p in original.items()
        }  # fmt: skip
        noise = {n: torch.randn(idx.shape, generator=g) for n, idx in held.items()}
        rms = {n: float(dense[n].reshape(-1)[idx].float().pow(2).mean().sqrt()) for n, idx in held.items()}

        def wire_at(size: float) -> dict[str, torch.Tensor]:
            jittered = {n: t.clone() for n, t in dense.items()}
            for n, idx in held.items():
                jittered[n].view(-1).index_add_(0, idx, size * rms[n] * noise[n])
            return compress(jittered, m.codec, m.ctx(window), None)

        low, high = 0.0, 2.0
        for _ in range(8):
            size = (low + high) / 2
            got = similarity(original, m.codec.decode(wire_at(size), m.ctx(window), m.shapes))
            low, high = (size, high) if got > self.cosine else (low, size)
        return m.encode(window, wire_at((low + high) / 2))


class Blender(Copycat):
    """The mean of two other miners' deltas, re-encoded: trains nothing, still lowers the loss."""

    name = "blender"
    sources = 2

    def forge(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> bytes:
        dense = [densify(delta, self.miner.shapes) for _, delta in stolen]
        blend = {k: sum(d[k] for d in dense) / len(dense) for k in dense[0]}
        return self.compress_plain(window, blend)


class CopyFinetune(Copycat):
    """A copy plus a few steps on its own pages: only those steps may earn anything."""

    name = "copy_finetune"
    fraction = 0.2
    """Of a window's training steps, how many it spends."""

    def copied(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> dict[str, torch.Tensor]:  # fmt: skip
        """The copied part, dense: the stolen delta as decoded."""
        return densify(stolen[0][1], self.miner.shapes)

    def forge(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> bytes:
        m = self.miner
        copied = self.copied(window, stolen)
        with torch.no_grad():
            for name, p in m.params.items():
                p.copy_(m.master[name] + copied[name].to(p.device))
        steps = max(1, int(m.settings.train.steps_per_window * self.fraction))
        m.trainer.train(m.dataset.sequences(local_pages(m.netuid, m.uid, window, m.pages)), steps)
        with torch.no_grad():
            delta = {name: p.detach() - m.master[name] for name, p in m.params.items()}
        return self.compress_plain(window, delta)


def shaped_noise(
    original: Delta, shapes: dict[str, tuple[int, ...]], g: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unit-free noise shaped like a decoded delta, as two dense parts (each of the same norm as the
    delta's matching part, so a copy plus `s` times it has cosine about 1/sqrt(1 + s²) to the
    original): on each low-rank part (a `Mixed` part's dense term) a random rank-1 matrix that
    keeps one of its factors (the left or the right, by a seeded coin) and draws the other at random,
    so the sum is rank 1 again and its factors are a rotation of the original's; on every sparse
    value (or every value of a dense part) Gaussian noise, at the original's positions."""
    low, rest = {}, {}
    for name, part in original.items():
        shape = shapes[name]
        low[name] = torch.zeros(shape)
        if isinstance(part, Mixed) and part.dense.dim() == 2 and float(part.dense.norm()) > 0:
            dense = part.dense.float()
            left = bool(torch.randint(0, 2, (1,), generator=g))
            kept = dense[:, dense.norm(dim=0).argmax()] if left else dense[dense.norm(dim=1).argmax()]
            kept = kept / kept.norm()
            other = dense.T @ kept if left else dense @ kept  # the original's other factor
            other = other / other.norm()
            drawn = torch.randn(other.shape, generator=g)
            drawn = drawn - (drawn @ other) * other  # orthogonal to it: the noise adds no signal
            matrix = torch.outer(kept, drawn) if left else torch.outer(drawn, kept)
            low[name] = matrix * (float(dense.norm()) / float(matrix.norm()))
        values = part.sparse if isinstance(part, Mixed) else part
        flat = torch.zeros(math.prod(shape))
        if isinstance(values, Sparse):
            if values.values.numel():
                noise = torch.randn(values.values.shape, generator=g)
                flat[values.indices] = noise * (float(values.values.norm()) / float(noise.norm()))
        else:
            noise = torch.randn(flat.shape, generator=g)
            flat = noise * (float(values.norm()) / float(noise.norm()))
        rest[name] = flat.view(shape)
    return low, rest


class ShapedCopier(Copycat):
    """A copy of one paid miner's delta plus noise shaped like it (`shaped_noise`), re-encoded with
    the codec and signed as its own: trains nothing. Sized by bisection on the decoded result (the
    codec re-quantises) so that its cosine to the source is about `cosine` both as whole vectors
    (`similarity`, the copy screen's) and in the low-rank parts (`low_rank_similarity`, the second
    screen's): 0.7 sits under both thresholds (0.8, 0.9), with noise about as large as the delta."""

    name = "shaped_copier"
    cosine = 0.7

    def shaped(self, window: int, original: Delta) -> dict[str, torch.Tensor]:
        """The forged wire tensors (unsigned)."""
        m = self.miner
        g = torch.Generator().manual_seed(protocol.seed(self.name, m.uid, window))
        dense = densify(original, m.shapes)
        low, rest = shaped_noise(original, m.shapes, g)
        has_low = bool(low_rank_part(original))
        ctx = m.ctx(window)

        def wire_at(a: float, b: float) -> dict[str, torch.Tensor]:
            return compress({n: dense[n] + a * low[n] + b * rest[n] for n in dense}, m.codec, ctx, None)

        start = math.sqrt(1.0 / self.cosine**2 - 1.0)  # the size that gives `cosine` before the codec
        brackets = [[0.0, 4.0 * start], [0.0, 4.0 * start]]  # low-rank noise, the rest's
        for _ in range(8):
            a, b = (sum(brackets[0]) / 2, sum(brackets[1]) / 2)
            decoded = m.codec.decode(wire_at(a, b), ctx, m.shapes)
            got = (
                low_rank_similarity(original, decoded) if has_low else self.cosine,
                similarity(original, decoded),
            )
            for bracket, size, cosine in zip(brackets, (a, b), got, strict=True):
                bracket[:] = [size, bracket[1]] if cosine > self.cosine else [bracket[0], size]
        return wire_at(sum(brackets[0]) / 2, sum(brackets[1]) / 2)

    def forge(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> bytes:
        return self.miner.encode(window, self.shaped(window, stolen[0][1]))


class ShapedCopier05(ShapedCopier):
    """`shaped_copier` at cosine about 0.5 to its source."""

    name = "shaped_copier_05"
    cosine = 0.5


class RotatingCopier(ShapedCopier):
    """A shaped copier (cosine about 0.7) that copies a different paid miner each window: the paid
    uids in uid order, starting at the window's turn, so no one source's pages are helped twice in a
    row."""

    name = "rotating_copier"

    def ranked(
        self, window: int, commitments: object, incentive_of: Callable[[int], float]
    ) -> list[tuple[int, str]]:
        items = sorted(commitments, key=lambda kv: kv[0])
        paid = [kv for kv in items if incentive_of(kv[0]) > 0 and kv[0] != self.miner.uid]
        unpaid = [kv for kv in items if kv not in paid]
        turn = window % len(paid) if paid else 0
        return paid[turn:] + paid[:turn] + unpaid


class ShapedFinetune(CopyFinetune):
    """A shaped copy (`shaped_copier`, cosine about 0.7) plus a fifth of a window's training steps
    on its own pages: only what those steps add to its own pages may earn anything."""

    name = "shaped_finetune"

    def copied(self, window: int, stolen: list[tuple[dict[str, torch.Tensor], Delta]]) -> dict[str, torch.Tensor]:  # fmt: skip
        m = self.miner
        shaped = ShapedCopier(m).shaped(window, stolen[0][1])
        return densify(m.codec.decode(shaped, m.ctx(window), m.shapes), m.shapes)


class Hostile(Persona):
    """An honest miner behind a hostile server: trains, signs and uploads to its own bucket as the
    honest one does, but commits `http+get://127.0.0.1:PORT/<behaviour>`, a `HostileServer` in this
    process that serves its own deltas (read from its bucket) with that behaviour. On loopback, so
    only for the embedded chain (a real network refuses the address: `bad_commitment`)."""

    name = "hostile"

    def __init__(self, miner: Miner, behaviour: str) -> None:
        super().__init__(miner)
        self.behaviour = behaviour
        self.name = f"{HOSTILE_PREFIX}{behaviour}"
        self.server: HostileServer | None = None

    def commitment(self, own: str) -> str:
        if self.server is None:
            self.server = HostileServer(source=self._own_delta, missing=self.missing())
            log.info("%s: serving our bucket at %s", self.name, self.server.url)
        return f"http+get://127.0.0.1:{self.server.server_address[1]}/{self.behaviour.replace('_', '-')}"

    def missing(self) -> Behaviour | None:
        """What the server answers for a delta we do not have (None: a plain 404)."""
        return None

    def _own_delta(self, key: str) -> bytes | None:
        """Our own delta at `key` from our bucket, or None: the server serves nothing else."""
        m = self.miner
        parsed = protocol.parse_delta_key(key)
        if parsed is None or parsed[0] != m.netuid or parsed[2] != m.hotkey:
            return None
        try:
            return m.store.get(key, max_bytes=m.settings.mechanism.max_delta_bytes)
        except (NotFound, StorageError, ValueError):
            return None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class OneInThree(Hostile):
    """Trains and uploads one real window in three (the first it mines, then every third) and saves
    the compute of the others; its server answers 500 for the deltas it never made, so that the
    missing windows look like a storage failure (which validators once forgave as their own)."""

    name = "one_in_three"
    first: int | None = None

    def __init__(self, miner: Miner) -> None:
        super().__init__(miner, "honest")
        self.name = OneInThree.name

    def missing(self) -> Behaviour | None:
        return status_500

    def produce(self, window: int) -> tuple[bytes | None, object]:
        self.first = window if self.first is None else self.first
        return self.miner.honest(window) if (window - self.first) % 3 == 0 else (None, None)


class BadCommitmentPersona(Persona):
    """Commits the cloud metadata service as its bucket (a request-forgery probe); uploads nothing,
    since no validator may read it."""

    name = "bad_commitment"
    target = "http://169.254.169.254/latest"

    def commitment(self, own: str) -> str:
        return self.target

    def produce(self, window: int) -> tuple[bytes | None, object]:
        return None, None


PERSONAS = {  # fmt: skip
    p.name: p
    for p in (
        Persona,
        Idle,
        Freeloader,
        Noise,
        Poison,
        Stale,
        Copycat,
        Backdater,
        NoisyCopier,
        Blender,
        CopyFinetune,
        ShapedCopier,
        ShapedCopier05,
        RotatingCopier,
        ShapedFinetune,
        OneInThree,
        BadCommitmentPersona,
    )
}


def persona_problem(name: str) -> str | None:
    """Why `name` is no persona, or None if it is one."""
    if name.startswith(HOSTILE_PREFIX):
        behaviour = name[len(HOSTILE_PREFIX) :]
        if behaviour not in BEHAVIOURS:
            return (
                f"persona {name!r}: no server behaviour {behaviour!r} (choose from {', '.join(BEHAVIOURS)})"
            )
        return None
    if name not in PERSONAS:
        return f"persona {name!r}: choose from {', '.join(PERSONAS)} or {HOSTILE_PREFIX}<behaviour>"
    return None


def make_persona(name: str, miner: Miner) -> Persona:
    problem = persona_problem(name)
    if problem is not None:
        raise ConfigError(problem)
    if name.startswith(HOSTILE_PREFIX):
        return Hostile(miner, name[len(HOSTILE_PREFIX) :])
    return PERSONAS[name](miner)


class PersonaMiner(Miner):
    """A real miner whose uploads (and commitment) come from a persona."""

    def __init__(self, settings: Settings, persona: str) -> None:
        super().__init__(settings)
        self.persona = make_persona(persona, self)
        self.commitment = self.persona.commitment(self.commitment)  # a hostile persona's own server

    def produce(self, window: int) -> tuple[bytes | None, object]:
        return self.persona.produce(window)

    def close(self) -> None:
        super().close()
        self.persona.close()


def main(settings: Settings, args: argparse.Namespace) -> int:
    """`bistro persona-miner --persona NAME`: one miner process with a persona (local networks)."""
    log.info("persona %s", args.persona)
    return miner_main(settings, args, make=lambda s: PersonaMiner(s, args.persona))
