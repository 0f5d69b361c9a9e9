"""Scoring one window's deltas against a master, and the master step (docs/design.md "Mechanism" 3-5, 8).

The validator wraps this with the chain and the buckets; the benchmarks and tests call it directly,
so everyone measures the same code. Nothing here reads a clock, a chain or a store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch

from . import scoring
from .config import Settings
from .data import Dataset
from .data.pages import eval_pages, global_pages, local_pages, other_pages
from .delta import (
    MERGES,
    Delta,
    Merge,
    add_,
    delta_norm,
    low_rank_cosines,
    low_rank_part,
    scaled,
    similarity,
    sketch,
)
from .delta.apply import applied_per_module
from .delta.wire import DecodedDelta, DeltaRejected, Expectation, redecode
from .manifest import delta_sha256
from .master import apply_update
from .model import Params, sequence_losses, state_tensors
from .protocol import EVIDENCE_PAGES, seed
from .threads import host_threads, map_threads
from .verdicts import V

log = logging.getLogger("bistro.evaluator")

T = TypeVar("T")

STEPS = (1.0, 0.5)
"""The master step tries θ + U, then θ + U/2, and keeps the first that lowers the global loss. A
merge of a few barely overlapping top-k deltas overshoots on 2 global pages now and then: the demo
refused three honest updates in a row (windows 5-7) and the master stood still."""

SCREEN = 0.1
"""Pairs whose sketched cosine is this far below the copy threshold are not compared exactly. The
sketch's error is about 0.006 for spread-out vectors, but on real top-k deltas of `tiny` it reached
0.038 (the hash is linear and the supports are structured): 0.05 left too little room."""


class DeltaHandle:
    """A uid's accepted delta as the validator keeps it for the window: held decoded, or, streaming
    (`mechanism.stream_deltas`), as its verified blob decoded anew at each read (`wire.redecode`), so
    that a streaming validator holds the window's blobs, not 256 decoded deltas."""

    __slots__ = ("held", "source")

    def __init__(self, held: Delta | None = None, source: Callable[[], Delta] | None = None) -> None:
        if (held is None) == (source is None):
            raise ValueError("a delta handle holds a delta or a source, one of the two")
        self.held, self.source = held, source

    @classmethod
    def blob(cls, blob: bytes, exp: Expectation) -> DeltaHandle:
        """The blob `decode_delta` accepted against `exp`, decoded again at each read."""
        return cls(source=partial(redecode, blob, exp))

    @property
    def streamed(self) -> bool:
        return self.source is not None

    def read(self, uid: int) -> Delta:
        """The decoded delta: the one held, or a fresh decode (`DeltaLost` if it fails now)."""
        if self.held is not None:
            return self.held
        assert self.source is not None
        try:
            return self.source()
        except DeltaRejected as e:  # its blob passed decode_delta: should not happen
            raise DeltaLost(uid, e) from e


@dataclass(eq=False)  # eq would compare (and so decode) the deltas
class Verdict:
    """What happened to one uid's delta this window."""

    uid: int
    verdict: V = V.missing
    """What happened (bistro/verdicts.py): every value but ok and skip scores zero."""
    merge_weight: float = 0.0
    with_local: float | None = None
    without_local: float | None = None
    with_global: float | None = None
    without_global: float | None = None
    with_other: float | None = None
    """Loss with the delta on the uid's control pages (pages it was not assigned)."""
    without_other: float | None = None
    base_local: float | None = None
    """Loss of θ alone (no delta) on the eval pages: with `with_local`, the pooled help."""
    base_other: float | None = None
    score: float = 0.0
    control_score: float | None = None
    """The own-page test against the random control pages alone (`score` is the least of it and
    the test against each close uid's pages, `close_to`)."""
    close_to: list[int] = field(default_factory=list)
    """The scored uids whose deltas are closest to this one (`mechanism.close_control_cosine`): their
    eval pages were control pages of this uid's own-page test too."""
    uploaded: float = float("inf")
    """Upload order for copies (the validator no longer reads it from a miner's server: inf)."""
    copy_of: int | None = None
    handle: DeltaHandle | None = field(default=None, repr=False)
    """The delta, held or as its blob (None: none, or dropped as a copy); read it as `delta`."""
    norm: float | None = None
    """`delta_norm` of the delta, from `decode_delta` (None: computed when needed)."""

    @classmethod
    def holding(cls, uid: int, delta: Delta, **fields: Any) -> Verdict:
        """An `ok` verdict that holds `delta` decoded (benches and tests)."""
        return cls(uid, V.ok, handle=DeltaHandle(held=delta), **fields)

    @property
    def delta(self) -> Delta | None:
        """The decoded delta (None: none, or dropped as a copy): held, or decoded anew at each read."""
        return None if self.handle is None else self.handle.read(self.uid)

    @delta.setter
    def delta(self, delta: Delta | None) -> None:
        """Hold `delta` decoded (None drops it: a copy, a skipped window)."""
        self.handle = None if delta is None else DeltaHandle(held=delta)

    def accept(self, decoded: DecodedDelta, blob: bytes, exp: Expectation, stream: bool) -> None:
        """`ok` with the delta `decode_delta` accepted: held, or with `stream` dropped now and
        decoded again from `blob` at each read."""
        self.verdict, self.norm = V.ok, decoded.norm
        self.handle = DeltaHandle.blob(blob, exp) if stream else DeltaHandle(held=decoded.delta)

    def measured_norm(self) -> float:
        """The delta's L2 norm, without decoding it again when `decode_delta` gave it."""
        return self.norm if self.norm is not None else delta_norm(self.delta)


class DeltaLost(Exception):
    """A streamed delta failed to decode again. Its blob passed `decode_delta` at fetch, so this is
    not supposed to happen; if it does, the uid's verdict becomes `bad_tensors` (the peer's
    rejection, as if fetch had refused it) and the step that needed the delta runs again without it:
    it must not stop the window."""

    def __init__(self, uid: int, cause: DeltaRejected) -> None:
        super().__init__(f"uid {uid}: {cause}")
        self.uid, self.cause = uid, cause


@dataclass(frozen=True)
class Passes:
    """A window's forward passes (`Evaluator.passes`): the scored uids, the sliced close uids whose
    eval pages are control pages, and each scored uid's close uids."""

    window: int
    block_hash: str
    valid: list[int]
    extras: list[int]
    close: dict[int, list[int]]


@dataclass
class PassLosses:
    """Per uid, its sequences' losses at θ, at θ_eval and (scored uids) at θ_eval less its term."""

    base: dict[int, torch.Tensor] = field(default_factory=dict)
    with_: dict[int, torch.Tensor] = field(default_factory=dict)
    without: dict[int, torch.Tensor] = field(default_factory=dict)


class Deltas(Sequence[Delta]):
    """The deltas of `verdicts`, read one at a time: a streamed verdict decodes its delta anew at
    each read, so a pass over these holds one decoded delta (two while the next one decodes), and
    the merges (`merge_mean`, `MeanMerge`) read them in this order, every node's."""

    def __init__(self, verdicts: Sequence[Verdict]) -> None:
        self.verdicts = list(verdicts)

    def __len__(self) -> int:
        return len(self.verdicts)

    def __getitem__(self, i: int) -> Delta:  # type: ignore[override]
        delta = self.verdicts[i].delta
        if delta is None:
            raise ValueError(f"uid {self.verdicts[i].uid} has no delta")
        return delta

    def __iter__(self) -> Iterator[Delta]:
        return (self[i] for i in range(len(self)))


class Evaluator:
    """One model whose parameters are moved between θ, θ_eval and θ_eval − m_i Δ_i, in place."""

    def __init__(self, settings: Settings, model: torch.nn.Module, dataset: Dataset) -> None:
        self.settings = settings
        self.model = model
        self.dataset = dataset
        self.netuid = settings.chain.netuid
        self.params: Params = state_tensors(model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.sketches: tuple[int, dict[int, torch.Tensor]] = (-1, {})
        """(window, uid → sketch of its delta): the copy screen's, reused by the close controls."""
        self.group: Any = None
        """A `distributed.ScoringGroup` when the scored uids' passes are split over ranks (rank 0)."""
        self.slices: tuple[int, dict[int, Delta]] = (-1, {})
        """(window, uid → its slice, decoded): the parts of the deltas outside the window's sample
        that the validator read (`bistro.delta.slices`), all of the same parameters; their uids
        may be close controls of a sampled uid."""

    def set_params(self, source: Params) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(source[name])

    def losses(self, sequences: torch.Tensor) -> torch.Tensor:
        return sequence_losses(self.model, sequences, self.settings.train.eval_batch_size).double()

    def loss(self, sequences: torch.Tensor) -> float:
        return float(self.losses(sequences).mean())

    def global_sequences(self, window: int, block_hash: str) -> torch.Tensor:
        return self.dataset.sequences(
            global_pages(self.netuid, window, block_hash, self.dataset.page_settings)
        )

    def eval_sequences(self, uid: int, window: int, block_hash: str) -> torch.Tensor:
        return self.dataset.sequences(
            eval_pages(self.netuid, uid, window, block_hash, self.dataset.page_settings)
        )

    def other_sequences(self, uid: int, window: int, block_hash: str) -> torch.Tensor:
        return self.dataset.sequences(
            other_pages(self.netuid, uid, window, block_hash, self.dataset.page_settings)
        )

    def drop_copies(self, verdicts: dict[int, Verdict], window: int, block_hash: str, master: Params) -> None:
        """Of near-identical deltas, keep the one with the most own-page evidence; the others
        become `copy`.

        Sketches screen every pair at once; only pairs within `SCREEN` of the threshold are compared
        exactly, so 255 uids cost one matrix product, not 32k sparse intersections, and exact copies
        none. Low-rank parts are compared exactly for every pair at once from their factors
        (`low_rank_cosines`). Who is the
        original comes from evidence no miner controls (never an upload time, which the miner's own
        server reports): the author's delta helps the author's own pages more than its control
        pages; a copier's pages are not the ones the delta was trained on. A pair is near-identical by
        its sparse values (`copy_threshold`) or, for lowrank deltas, by its low-rank parts
        (`low_rank_copy_threshold`: a copier can keep someone's factors and send top-k values of
        its own).

        Streamed deltas are read one at a time: one pass for the sketches and factors, two for each exact pair,
        one for each uid's own-page evidence."""
        self._without_lost(verdicts, lambda: self._drop_copies(verdicts, window, block_hash, master))

    def _without_lost(self, verdicts: dict[int, Verdict], step: Callable[[], T]) -> T:
        """`step()`, run again without any uid whose streamed delta fails to decode again
        (`DeltaLost`: its verdict becomes `bad_tensors`, the peer's rejection), so that no
        re-decode stops the window. Every step starts from the verdicts and the master, so a
        second run is the run that a validator which had refused the uid at fetch makes."""
        while True:
            try:
                return step()
            except DeltaLost as e:
                v = verdicts[e.uid]
                log.warning(
                    "uid %d: its verified delta failed to decode again (%s): rejected", e.uid, e.cause
                )
                v.verdict, v.delta, v.score, v.merge_weight = V.bad_tensors, None, 0.0, 0.0

    def _drop_copies(
        self, verdicts: dict[int, Verdict], window: int, block_hash: str, master: Params
    ) -> None:
        ok = sorted(uid for uid, v in verdicts.items() if v.verdict == "ok")
        if len(ok) < 2:
            return
        row = {uid: k for k, uid in enumerate(ok)}
        m = self.settings.mechanism

        # One pass: each delta's sketch of its sparse values and, if it has one, its low-rank
        # factors (kept: r (m + n) a matrix), whose cosines are then exact for every pair at once.
        def screened(uid: int) -> tuple[torch.Tensor, Delta]:
            delta = verdicts[uid].delta
            return sketch(delta, self.shapes), low_rank_part(delta)

        sketches, low_parts = (
            list(x) for x in zip(*map_threads(screened, ok, self.threads(verdicts.values())), strict=True)
        )
        self.sketches = (window, dict(zip(ok, sketches, strict=True)))
        has_low = any(low_parts)
        low_cosines = low_rank_cosines(low_parts) if has_low else None
        del low_parts

        def screen(measure: Callable[[Delta, Delta], float], threshold: float, rows: list[torch.Tensor]) -> Callable[[int, int], float]:  # fmt: skip
            """A pair's cosine by `measure`, exact only where the sketches put it near `threshold`."""
            stacked = torch.stack(rows)
            gram, exact = stacked @ stacked.T, {}

            def cosine(a: int, b: int) -> float:
                estimate = float(gram[row[a], row[b]])
                if estimate < threshold - SCREEN or estimate >= threshold + SCREEN:
                    return estimate  # clearly apart or clearly a copy: S sybil copies cost no decode
                pair = (min(a, b), max(a, b))
                if pair not in exact:
                    exact[pair] = measure(verdicts[a].delta, verdicts[b].delta)
                return exact[pair]

            return cosine

        whole = screen(similarity, m.copy_threshold, sketches)

        def similar(a: int, b: int) -> float:
            """≥ 1: a near-copy pair, by its sparse values or by its low-rank parts."""
            score = whole(a, b) / m.copy_threshold
            if low_cosines is None:
                return score
            return max(score, float(low_cosines[row[a], row[b]]) / m.low_rank_copy_threshold)

        grouped = sorted({u for a in ok for b in ok if a < b and similar(a, b) >= 1.0 for u in (a, b)})
        if not grouped:
            return
        evidence = self.own_page_evidence(grouped, window, block_hash, master, verdicts)
        tiebreak = {uid: seed("bistro-copy-tie", self.netuid, window, uid) for uid in grouped}
        order = scoring.copy_order(evidence, tiebreak)
        for uid, source in scoring.find_copies(order, similar, 1.0).items():
            verdicts[uid].verdict, verdicts[uid].copy_of, verdicts[uid].delta = V.copy, source, None
            log.info(
                "uid %d: copy of uid %d (own-page evidence %+.5f vs %+.5f)",
                uid, source, evidence[uid], evidence[source],
            )  # fmt: skip

    def own_page_evidence(
        self, uids: list[int], window: int, block_hash: str, master: Params, verdicts: dict[int, Verdict]
    ) -> dict[int, float]:
        """Each uid's delta alone on θ (as its miner trained it): how much more it lowers the loss on
        all the uid's local pages than on as many control pages, the raw margin
        (L(θ) − L(θ + Δ)) on own pages − the same on control pages. The author trained on exactly
        those pages; a copier's pages are, to the delta, random text.

        Raw, not divided by a reference's help on the same pages: the copiers take the paid work,
        so its authors are often all in copy groups and what is left outside is idle, noise and
        poison. Such a reference helps neither page set (the ratios were 0 for everyone, and a coin
        flip made an honest author the copy) or barely (ratios blown up: an exact copy came within
        0.01 of its author). On all 8 + 8 pages of the tiny demo (14 miners, topk2, windows 17-18)
        each honest delta's margin on its own pages was +0.14 .. +0.21 and on any other uid's pages
        −0.05 .. +0.06: the raw margin separates them with room. (On 2 + 2 pages it did not: the
        wrong uid of an exact copy pair won 2 windows in 7.) Only uids in a near-copy group pay
        this. Cost: one batched pass at θ and one per uid, on 16 pages each: at most
        `EVIDENCE_PAGES` of the uid's local pages (the first of their seeded order) and as many
        control pages, however many pages a miner trains on (thousands at 7B)."""
        self.set_params(master)
        ps = self.dataset.page_settings
        k = min(EVIDENCE_PAGES, ps.pages_per_window)
        pages = {
            uid: (
                self.dataset.sequences(local_pages(self.netuid, uid, window, ps)[:k]),
                self.dataset.sequences(other_pages(self.netuid, uid, window, block_hash, ps, k)),
            )
            for uid in uids
        }  # fmt: skip
        base = self.losses(torch.cat([t for uid in uids for t in pages[uid]]))
        evidence, offset = {}, 0
        for uid in uids:
            own, other = pages[uid]
            n, k = len(own), len(other)
            with applied_per_module(self.model, self.params, verdicts[uid].delta, 1.0):  # θ + Δ_uid
                solo = self.losses(torch.cat([own, other]))
            before = base[offset : offset + n + k]
            offset += n + k
            help_own = float(before[:n].mean()) - float(solo[:n].mean())
            help_other = float(before[n:].mean()) - float(solo[n:].mean())
            evidence[uid] = help_own - help_other
        return evidence

    def merge_rule(
        self, deltas: Sequence[Delta], weights: Sequence[float], verdicts: Sequence[Verdict]
    ) -> Merge:
        """The protocol's merge rule (`mechanism.merge`) over `deltas`, with the norms `decode_delta`
        measured (no pass over the deltas for them)."""
        rule = MERGES[self.settings.mechanism.merge]
        device = next(iter(self.params.values())).device
        norms = [v.measured_norm() for v in verdicts]
        return rule(deltas, weights, self.shapes, norms=norms, device=device, threads=self.threads(verdicts))

    def threads(self, verdicts: Iterable[Verdict]) -> int:
        """Threads for the host work on these verdicts' deltas (`mechanism.host_threads`); one when
        any is streamed, where each thread would hold a decoded delta of its own."""
        if any(v.handle is not None and v.handle.streamed for v in verdicts):
            return 1
        return host_threads(self.settings.mechanism.host_threads)

    def close_controls(
        self,
        valid: list[int],
        window: int,
        verdicts: dict[int, Verdict],
        incentive: dict[int, float] | None = None,
        averages: dict[int, float] | None = None,
    ) -> dict[int, list[int]]:
        """For each scored uid, the uids whose deltas are closest to its own (`scoring.close_uids`):
        their eval pages are control pages of its test. The other scored uids, on the sketched
        cosine (the copy screen's sketches of this window, made here for any uid it did not sketch),
        and the uids outside the sample whose slices the validator read (`outside_cosines`). A
        source neither scored nor sliced (no upload, a slice its server would not serve) leaves its
        copy with the random control pages alone (and `consistent_windows`)."""
        m = self.settings.mechanism
        if m.close_controls == 0 or m.close_control_cosine >= 1.0 or not valid:
            return {uid: [] for uid in valid}
        at, known = self.sketches
        known = known if at == window else {}
        rows = {
            uid: known[uid] if uid in known else sketch(verdicts[uid].delta, self.shapes) for uid in valid
        }
        stacked = torch.stack([rows[uid] for uid in valid])
        gram = stacked @ stacked.T
        outside = self.outside_cosines(valid, window, verdicts)
        return {
            uid: scoring.close_uids(
                uid, {u: float(gram[i, j]) for j, u in enumerate(valid)} | outside.get(uid, {}),
                m.close_control_cosine, m.close_controls, incentive, averages,
            )
            for i, uid in enumerate(valid)
        }  # fmt: skip

    def outside_cosines(self, valid: list[int], window: int, verdicts: dict[int, Verdict]) -> dict[int, dict[int, float]]:  # fmt: skip
        """scored uid → {sliced uid: cosine} of the pairs that are close: the sketched cosine of the
        sent values on the slice's parameters, or, where the low-rank parts reach
        `low_rank_copy_threshold` (a copy that keeps its source's factors and sends values of its
        own), their exact cosine. One sketch per delta and one product, so the cost grows with
        sampled + sliced uids, not with their pairs."""
        at, slices = self.slices
        if at != window or not slices or not valid:
            return {}
        m = self.settings.mechanism
        names = sorted(next(iter(slices.values())))
        shapes = {n: self.shapes[n] for n in names}
        sliced = sorted(slices)
        mine = map_threads(
            lambda uid: _restricted(verdicts[uid].delta, names), valid, self.threads(verdicts.values())
        )
        theirs = [slices[u] for u in sliced]
        a = torch.stack([sketch(d, shapes) for d in mine])
        b = torch.stack([sketch(d, shapes) for d in theirs])
        values = a @ b.T
        low = low_rank_cosines([low_rank_part(d) for d in mine + theirs])[: len(valid), len(valid) :]
        out: dict[int, dict[int, float]] = {}
        for i, uid in enumerate(valid):
            for j, u in enumerate(sliced):
                cos = float(values[i, j])
                if float(low[i, j]) >= m.low_rank_copy_threshold:
                    cos = max(cos, float(low[i, j]))
                if cos >= m.close_control_cosine and u != uid:
                    out.setdefault(uid, {})[u] = cos
        return out

    def score(
        self,
        window: int,
        block_hash: str,
        master: Params,
        verdicts: dict[int, Verdict],
        incentive: dict[int, float],
        averages: dict[int, float] | None = None,
    ) -> tuple[float, torch.Tensor]:
        """Steps 3-5 for the `ok` verdicts, in place; returns the master's global loss and the global
        sequences. The model is left at θ_eval.

        Delta by delta: the norms come from `decode_delta`, θ_eval takes one pass over the deltas
        (the mean merge's sums), and each uid's leave-one-out reads its delta once more, so a
        streaming validator holds at most two decoded deltas at a time."""
        return self._without_lost(
            verdicts, lambda: self._score(window, block_hash, master, verdicts, incentive, averages)
        )

    def _score(
        self,
        window: int,
        block_hash: str,
        master: Params,
        verdicts: dict[int, Verdict],
        incentive: dict[int, float],
        averages: dict[int, float] | None = None,
    ) -> tuple[float, torch.Tensor]:
        valid = [uid for uid, v in sorted(verdicts.items()) if v.verdict == "ok"]
        weights = scoring.merge_weights(incentive, valid)
        global_seqs = self.global_sequences(window, block_hash)
        self.set_params(master)
        base_global = self.loss(global_seqs)
        if not valid:
            return base_global, global_seqs
        close = self.close_controls(valid, window, verdicts, incentive, averages)
        # close uids outside the sample (sliced): their eval pages are control pages too
        extras = sorted({c for cs in close.values() for c in cs} - set(valid))
        for uid in valid:
            verdicts[uid].merge_weight = weights[uid]
        deltas = Deltas([verdicts[uid] for uid in valid])
        # Step 4: θ_eval = θ + the protocol's merge (what the master applies); the rule clips an
        # amplified delta (a poisoner's) to the median norm, so it cannot swamp θ_eval and with it
        # the pooled help every uid's own-page test divides by.
        rule = self.merge_rule(deltas, [weights[uid] for uid in valid], [verdicts[uid] for uid in valid])
        # Each uid's share (what it puts into θ_eval, per unit of which it is scored) and its own
        # term (step 5: θ_eval without it is θ_eval less its term): host work, up front on `threads`
        # threads, or, streaming, one at a time as the passes reach it (each read decodes again).
        shares: dict[int, float] = {}
        threads = self.threads(deltas.verdicts)
        if threads > 1 or self.group is not None:
            held = map_threads(lambda j: (rule.share(j, deltas[j]), rule.term(j, deltas[j])), range(len(valid)), threads)  # fmt: skip
            terms = {uid: term for uid, (_, term) in zip(valid, held, strict=True)}
            shares = {uid: share for uid, (share, _) in zip(valid, held, strict=True)}
            del held

            def term_of(uid: int) -> Delta:
                return terms.pop(uid)
        else:

            def term_of(uid: int) -> Delta:
                j = valid.index(uid)
                delta = deltas[j]  # streamed: decoded again, the only one held now
                shares[uid] = rule.share(j, delta)
                return rule.term(j, delta)

        jobs = Passes(window, block_hash, valid, extras, {uid: close[uid] for uid in valid})
        if self.group is not None:
            out = self.group.passes(self, master, rule.update, jobs, terms)
        else:
            out = self.passes(master, rule.update, jobs, term_of)
        with_global = self.loss(global_seqs)  # the model is at θ_eval
        sizes: dict[int, int] = {}  # sequences of each uid's eval pages (a close uid's, once)

        def eval_size(u: int) -> int:
            if u not in sizes:
                sizes[u] = len(self.eval_sequences(u, window, block_hash))
            return sizes[u]

        for uid in valid:
            v, n = verdicts[uid], eval_size(uid)
            base, with_, without = out.base[uid], out.with_[uid], out.without[uid]
            k = len(base)
            v.with_local, v.with_other = float(with_[:n].mean()), float(with_[n:].mean())
            v.with_global = with_global
            v.base_local, v.base_other = float(base[:n].mean()), float(base[n:].mean())
            # The global pages are not part of the score (they paid copies in full): not measured.
            v.close_to = close[uid]
            v.without_local, v.without_other = float(without[:n].mean()), float(without[n:k].mean())
            share = shares[uid]
            v.control_score = scoring.score(
                v.with_local, v.without_local, v.with_other, v.without_other, share,
                v.base_local, v.base_other,
            )  # fmt: skip
            controls = [(v.without_other - v.with_other, v.base_other - v.with_other)]
            at = k
            for c in v.close_to:  # its close uids' eval pages (the first of a scored uid's test pages)
                size = eval_size(c)
                with_c, base_c = float(out.with_[c][:size].mean()), float(out.base[c][:size].mean())
                controls.append((float(without[at : at + size].mean()) - with_c, base_c - with_c))
                at += size
            v.score = scoring.own_page_test_against(
                v.without_local - v.with_local, v.base_local - v.with_local, controls, share
            )
        return base_global, global_seqs

    def pages_of(self, uid: int, window: int, block_hash: str) -> torch.Tensor:
        """A scored uid's own-page test pages: its eval pages, then as many control pages."""
        return torch.cat(
            [self.eval_sequences(uid, window, block_hash), self.other_sequences(uid, window, block_hash)]
        )

    def passes(
        self,
        master: Params,
        update: Delta,
        jobs: Passes,
        term_of: Callable[[int], Delta],
        mine: Collection[int] | None = None,
    ) -> PassLosses:
        """The forward passes of steps 3-5 for the uids of `jobs` (those in `mine`, when given: one
        rank's share), each uid's pages in calls of their own, so its losses are the same bits
        whichever uids share a rank: L(θ) and L(θ_eval) on its test pages (a sliced close uid's
        eval pages alone), and L(θ_eval − its term) on its test pages and its close uids' eval
        pages. The model is left at θ_eval."""
        own = [u for u in jobs.valid if mine is None or u in mine]
        extra = [c for c in jobs.extras if mine is None or c in mine]
        pages = {uid: self.pages_of(uid, jobs.window, jobs.block_hash) for uid in own}
        pages |= {c: self.eval_sequences(c, jobs.window, jobs.block_hash) for c in extra}
        out = PassLosses()
        self.set_params(master)
        for uid in [*own, *extra]:
            out.base[uid] = self.losses(pages[uid])
        with torch.no_grad():
            add_(self.params, update, 1.0)
        for uid in [*own, *extra]:
            out.with_[uid] = self.losses(pages[uid])
        for uid in own:
            close = [self.eval_sequences(c, jobs.window, jobs.block_hash) for c in jobs.close[uid]]
            term = term_of(uid)
            # θ_eval less the uid's term, applied one parameter at a time as each module runs (no
            # copy of θ_eval; the same bits as removing it in place)
            with applied_per_module(self.model, self.params, term, -1.0):
                out.without[uid] = self.losses(torch.cat([pages[uid], *close]))
            del term
        return out

    def propose_update(
        self,
        master: Params,
        verdicts: dict[int, Verdict],
        base_global: float,
        global_seqs: torch.Tensor,
        paid: Collection[int] | None = None,
        recompress: Callable[[Delta], Delta] | None = None,
    ) -> tuple[Delta | None, dict]:
        """Step 8: U = the merge of the deltas with s_i > 0 (of uids in `paid`, when given: the
        validator passes the uids its weights pay; at most `mechanism.merge_peers` of them, by merge
        weight then uid), kept only if θ + U has a lower global loss. The merge reads the deltas one
        at a time (`Deltas`). `recompress` (the publisher's `MasterCodec.encode`) turns each proposed
        U into what followers will apply, and the test is taken on that."""
        return self._without_lost(
            verdicts,
            lambda: self._propose_update(master, verdicts, base_global, global_seqs, paid, recompress),
        )

    def _propose_update(
        self,
        master: Params,
        verdicts: dict[int, Verdict],
        base_global: float,
        global_seqs: torch.Tensor,
        paid: Collection[int] | None,
        recompress: Callable[[Delta], Delta] | None = None,
    ) -> tuple[Delta | None, dict]:
        helpful = [
            v for u, v in sorted(verdicts.items())
            if v.verdict == "ok" and v.score > 0 and (paid is None or u in paid)
        ]  # fmt: skip
        peers = self.settings.mechanism.merge_peers
        if peers and len(helpful) > peers:  # the merge set: by merge weight (the chain's), then uid
            keep = {v.uid for v in sorted(helpful, key=lambda v: (-v.merge_weight, v.uid))[:peers]}
            helpful = [v for v in helpful if v.uid in keep]
        info: dict = {
            "global_loss_before": base_global, "global_loss_after": base_global, "accepted": False,
            "merged_uids": [v.uid for v in helpful],
            # the manifest's inputs (bistro/manifest.py): every node recomputes U from them
            "merged_weights": [v.merge_weight for v in helpful],
            "merged_norms": [v.measured_norm() for v in helpful],
            "valid_uids": [u for u, v in sorted(verdicts.items()) if v.verdict == "ok"],
            "update_sha256": "",
        }  # fmt: skip
        self.refused: Delta | None = None  # the update refused last (the benchmarks measure refusals)
        if not helpful:
            return None, info
        full = self.merge_rule(Deltas(helpful), [v.merge_weight for v in helpful], helpful).update
        info["update_sha256"] = delta_sha256(full)
        for step in STEPS:
            update = full if step == 1.0 else scaled(full, step)
            if recompress is not None:
                update = recompress(update)
            self.set_params(master)
            apply_update(self.params, update)
            after = self.loss(global_seqs)
            if after < base_global:
                info.update(global_loss_after=after, accepted=True, step=step)
                return update, info
        self.refused = full  # not in `info`: that is a JSON record
        return None, info


def _restricted(delta: Delta | None, names: list[str]) -> Delta:
    """The parts of `delta` at `names` (a slice's parameters)."""
    if delta is None:
        raise ValueError("a scored verdict without its delta")
    return {n: delta[n] for n in names}
