"""Presets and runtime settings.

One `Settings` object is built per process (preset, then an optional TOML/JSON file, then flags)
and passed whole: each part takes it, or the sub-dataclass it owns, and reads no flag or
environment variable itself. A bad value fails in `__post_init__` naming the field.

Flags follow Bittensor's dotted convention: every field is reachable as `--section.field`
(`--train.lr 3e-4`, `--mechanism.temperature 1`), and the seed's own flags are aliases
(`--netuid`, `--bucket`, `--device`, `--subtensor.network`, `--s3.endpoint_url`, …).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message names the field."""


def _check(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {why}")


@dataclass
class ModelConfig:
    """Shape of the `LlamaForCausalLM` that every node builds."""

    vocab_size: int = 4096
    """Tokenizer and embedding vocabulary."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention when below num_heads)."""
    intermediate_size: int = 384
    """Width of the MLP."""
    sequence_length: int = 128
    """Tokens per training/evaluation sequence."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    seed: int = 0
    """Seed of the initial master's weights."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be positive")
        _check(self.intermediate_size > 0, "model.intermediate_size", "must be positive")
        _check(self.sequence_length > 1, "model.sequence_length", "must be at least 2")
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            "must be divisible by num_heads",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            "must divide num_heads",
        )


@dataclass
class TrainConfig:
    """How a miner trains within one window."""

    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    batch_size: int = 8
    """Sequences per optimizer step (per process under torchrun)."""
    steps_per_window: int = 20
    """Optimizer steps a miner takes in one window."""
    warmup_steps: int = 20
    """Linear warm-up of the learning rate over the first steps a miner takes."""
    eval_batch_size: int = 32
    """Sequences per forward pass when evaluating."""
    threads: int = 0
    """torch intra-op threads (0 leaves torch's default)."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and AdamW state over the ranks (FSDP2)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(self.batch_size > 0, "train.batch_size", "must be positive")
        _check(self.steps_per_window > 0, "train.steps_per_window", "must be positive")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.eval_batch_size > 0, "train.eval_batch_size", "must be positive")
        _check(self.threads >= 0, "train.threads", "must be >= 0")


CODEC_NAMES = ("topk", "topk2", "lowrank", "mask", "dense")
MERGE_RULES = ("sum", "mean")
MASTER_CODECS = ("same", "sparse")
"""`mechanism.master_codec`: what the publisher sends followers (see `MechanismConfig.master_codec`)."""


@dataclass
class MechanismConfig:
    """The incentive mechanism: windows, pages, codec, scoring and weights."""

    blocks_per_window: int = 10
    """Chain blocks per window; window = block // blocks_per_window."""
    upload_grace_blocks: int = 2
    """Blocks after a window ends during which its uploads are still accepted."""
    rows_per_page: int = 8
    """Documents per data page."""
    pages_per_window: int = 4
    """Local pages a miner trains on in one window."""
    miner_span: int = 64
    """Width, in pages, of each miner's sliding window over the corpus."""
    eval_pages: int = 2
    """Of a miner's local pages, how many the validator checks."""
    global_pages: int = 2
    """Pages from the whole corpus on which every validator also scores each delta."""
    codec: str = "lowrank"
    """Delta codec on the wire: lowrank (the default: a rank-1 int8 factor pair of each matrix, then 32
    of 4096 of the rest at 2 bits), topk2 (64 of 4096 at 2 bits, Elias-Fano indices), topk, mask or
    dense. On `tiny`, 16 windows: lowrank 0.83 / 0.98 of the sequential / data-parallel baselines'
    drop at the read-out window, topk2 0.52 / 0.61 (docs/performance.md)."""
    compression: float = 128.0
    """Kept values of topk, topk2 and lowrank's sparse part (chunk/compression a chunk) and of mask
    (1/compression of each tensor)."""
    topk_chunk: int = 4096
    """Chunk size of the topk codec (indices are local to a chunk)."""
    value_bits: int = 2
    """Bits a value for the topk2 and lowrank codecs (1-4)."""
    rank: int = 1
    """Factors of each 2-D parameter for the lowrank codec (1-8)."""
    ef_decay: float = 0.95
    """Error-feedback decay beta of miners: e <- beta e + delta, top-k of e, e <- e - sent (1: plain)."""
    master_codec: str = "same"
    """How the publisher sends the merged update U_w to followers. `same`: re-compressed with the
    miners' codec (`codec`, `topk_chunk`, `value_bits`) at its own `master_rank` and
    `master_compression`, plus an error-feedback residual the publisher keeps: one delta-sized object
    a window whatever the number of merged uids (lowrank at 7B: 258 MiB), and
    θ_{w+1} = θ_w + decode(wire) on every node, the publisher included. `sparse`: the raw union of the merged deltas (int64 index + fp32 value an
    entry, 12 B; 48-75 GiB a window at 7B with 64 merged uids), kept for comparison."""
    master_rank: int = 8
    """Factors of each 2-D parameter in the publisher's re-compressed update (`master_codec same`,
    lowrank; 1-8; 0: the miners' `rank`). A merge of several rank-1 deltas has rank above 1: at rank
    1 the re-encoded update cost the 48-window `tiny` bench 7 points of `learning_efficiency_ddp_final`
    against the raw union (0.896 vs 0.967), at rank 8 2 points (0.945, both at the miners'
    compression); the factors are a small part of the wire at real sizes (7B: 17 MiB of the 258)."""
    master_compression: float = 32.0
    """Kept values of the sparse part of the publisher's re-compressed update (`master_codec same`;
    chunk/compression a chunk, as `compression` for the miners; 0: the miners'). A merge of several
    deltas holds more large values than one delta: at the miners' 128 the 48-window `tiny` bench
    reached 0.939 of data-parallel training at its read-out (0.945 at the end), at 32 0.962 (0.971),
    at 8 0.965 (0.976), the raw union 0.965 (0.967). 7B: 258 MiB a window instead of 101."""
    master_ef_decay: float = 1.0
    """Decay of the publisher's residual before it is added to the next update (e <- decay e + U;
    1: plain error feedback, nothing the miners were paid for is dropped). `master_codec same` only."""
    merge_peers: int = 0
    """Most deltas merged into U_w a window: the paid, helpful uids ranked by merge weight (the
    chain's incentive, the same on every node), then uid; 0: every paid, helpful uid."""
    merge: str = "mean"
    """How the master merges the helpful deltas: sum (of merge weight x delta) or mean (per index, of the
    peers that sent it, each clipped to the median norm)."""
    stream_deltas: bool = False
    """Validator keeps each verified delta blob and decodes it again at each use, holding at most two
    decoded deltas, not every uid's for the whole window (7B, 256 uids: hundreds of GiB); it costs a
    few more decodes a window and gives the same scores and master bit for bit (a node's own choice)."""
    temperature: float = 1.0
    """Softmax temperature on moving-average scores normalised by their mean magnitude."""
    eligibility: float = 0.3
    """A uid gets weight only if its moving average exceeds this fraction of the mean positive one
    (0.3: under the own-page test a noisy copy's average reached 0.13 of the honest mean on the tiny
    localnet, and drew 7% of the weight at 0.1; an honest newcomer passes 0.3 in its second window)."""
    inactive_windows: int = 2
    """A uid whose last this many *judged* windows (drawn in the sample and fetched) were all its
    fault gets no weight until it delivers a valid delta; windows it was not drawn in, `unfetched`
    and `skip` count neither way (`scoring.drop_inactive`)."""
    fault_penalty: float = 0.5
    """A window whose verdict is the peer's fault (`bistro.verdicts.PEER_FAULTS`: missing, copy,
    timeout, peer_error, a rejected delta ...) scores minus this fraction of the mean positive moving
    average, not 0: a miner that uploads one real window in three stays under the eligibility bar,
    one that delivers every other window keeps about a third of an honest average (docs/mechanism.md)."""
    local_dominance: float = 0.5
    """Weight of the own-pages loss difference in a score (the rest is global pages)."""
    ma_alpha: float = 0.3
    """Moving-average rate of scores: avg <- (1 - alpha) avg + alpha score."""
    weights_every: int = 1
    """Set weights on the chain every this many windows."""
    retention_windows: int = 4
    """A miner deletes its own deltas older than this many windows."""
    max_delta_bytes: int = 64 * 1024 * 1024
    """Largest delta object a validator downloads."""
    max_delta_norm: float = 100.0
    """Largest L2 norm of a decoded delta that a validator accepts."""
    copy_threshold: float = 0.8
    """Cosine similarity at or above which two deltas form a near-copy group (the one with the most
    own-page evidence is the original). Measured on `tiny` (docs/mechanism.md): honest deltas of one
    window 0.08-0.18, a jittered copy 0.97, an exact copy 1.0."""
    low_rank_copy_threshold: float = 0.9
    """Cosine of two deltas' low-rank parts (lowrank codec) at or above which they form a near-copy
    group too: measured on `tiny` (4 SimMiners, windows 0-4, 5 and 10 steps) honest pairs 0.24-0.76,
    a copy of one's low-rank part under its own top-k values 1.0. `copy_threshold` compares the
    sparse values, which such a copy makes its own."""
    close_control_cosine: float = 0.3
    """A scored uid's own-page test also uses as control pages the eval pages of the other scored uids
    whose deltas' sketched cosine (`similarity`, the copy screen's sketch) to its delta is at least
    this, the `close_controls` nearest: its score is the least of its test against its random
    control pages and against each such uid's pages (a copy helps its source's pages more than its
    own). Honest deltas of one window sit at 0.01-0.18 (tiny, lowrank and topk2) and are never
    compared so; a shaped copy at 0.5-0.7 to its source is (docs/mechanism.md "Shaped copies").
    1 turns it off."""
    close_controls: int = 2
    """At most this many close uids' pages per scored uid (`close_control_cosine`): each costs one
    more leave-one-out pass over `eval_pages` pages for that uid."""
    slice_fraction: float = 1 / 32
    """Of every upload outside the window's scored sample, the part a validator reads (a run of
    parameters drawn from the seed block's hash, about this share of the wire: `bistro.delta.slices`),
    so that a sampled copy of an unsampled uid's delta meets its source's pages as close controls
    (`close_control_cosine`; or `low_rank_copy_threshold` on the low-rank parts). At least one
    parameter; 0 reads none. At 7B with 256 uids and a sample of 32: 224 × 4.3 MiB a window."""
    consistent_windows: int = 2
    """A uid is eligible for weight only if each of its last this many scored deltas (`ok` verdicts:
    faults already cost it through `fault_penalty`) scored above 0: a copy whose own-page test comes
    out positive by luck in one window is not paid for it. An honest newcomer is paid from its
    second scored window (docs/mechanism.md "Shaped copies"); 1: the moving average alone."""
    checkpoint_every: int = 5
    """The master publishes a full checkpoint every this many windows."""
    max_uids_per_window: int = 256
    """Uids a validator scores a window: above it, the scored sample (`bistro.sample.scored_sample`:
    seeded by the seed-block hash, the same on every validator, every uid within 10 windows)."""
    fetch_seconds: float = 30.0
    """Node-local. Seconds a validator gives all peer I/O of one window together (at most a quarter
    of the window: `Validator.fetch_budget`). Reads run in the window's seeded order,
    `fetch_concurrency` at a time; what our link could not fetch by then is `unfetched` (no
    penalty), what the peer was slow with is `timeout` (`bistro.storage.fetch`)."""
    fetch_concurrency: int = 8
    """Node-local. Peer reads a validator runs at once (in the window's seeded order)."""
    host_threads: int = 0
    """Node-local. Threads for a validator's host work on each delta (decode, sketch, share and
    term) and the mean merge's per-parameter sums (0: one a CPU core); the same results at any count."""
    link_bytes_per_second: float = 0.0
    """Node-local. One rate limit shared by all of a validator's peer reads, in bytes/s (0: none):
    keeps the fetch off the bandwidth other work needs, and lets a local network emulate a slow link."""
    fetch_stall_seconds: float = 10.0
    """Node-local. A peer read that receives nothing for this long (connect, first byte, body) is the
    peer's `timeout`; a read is also judged slow only once watched this long."""
    fetch_slow_fraction: float = 0.1
    """Node-local. A peer read whose rate is under this fraction of the median rate of the window's
    completed reads (or under `storage.fetch.SLOW_FLOOR`) is the peer's `timeout`."""

    def __post_init__(self) -> None:
        for name in (
            "blocks_per_window",
            "rows_per_page",
            "pages_per_window",
            "miner_span",
            "eval_pages",
            "weights_every",
            "retention_windows",
            "max_delta_bytes",
            "checkpoint_every",
            "max_uids_per_window",
            "fetch_concurrency",
            "topk_chunk",
            "inactive_windows",
            "consistent_windows",
        ):
            _check(getattr(self, name) > 0, f"mechanism.{name}", "must be positive")
        _check(self.fault_penalty >= 0, "mechanism.fault_penalty", "must be >= 0")
        _check(self.upload_grace_blocks >= 0, "mechanism.upload_grace_blocks", "must be >= 0")
        _check(self.global_pages >= 0, "mechanism.global_pages", "must be >= 0")
        _check(
            self.eval_pages <= self.pages_per_window,
            "mechanism.eval_pages",
            "cannot exceed pages_per_window",
        )
        _check(
            self.pages_per_window <= self.miner_span,
            "mechanism.pages_per_window",
            "cannot exceed miner_span",
        )
        _check(self.codec in CODEC_NAMES, "mechanism.codec", f"must be one of {CODEC_NAMES}")
        _check(self.compression >= 1, "mechanism.compression", "must be >= 1")
        _check(self.value_bits in (1, 2, 3, 4), "mechanism.value_bits", "must be 1, 2, 3 or 4")
        _check(1 <= self.rank <= 8, "mechanism.rank", "must be in [1, 8]")
        _check(0 < self.ef_decay <= 1, "mechanism.ef_decay", "must be in (0, 1]")
        _check(
            self.master_codec in MASTER_CODECS, "mechanism.master_codec", f"must be one of {MASTER_CODECS}"
        )
        _check(0 <= self.master_rank <= 8, "mechanism.master_rank", "must be in [0, 8]")
        _check(
            self.master_compression == 0 or self.master_compression >= 1,
            "mechanism.master_compression", "must be 0 (the miners') or >= 1",
        )  # fmt: skip
        _check(0 < self.master_ef_decay <= 1, "mechanism.master_ef_decay", "must be in (0, 1]")
        _check(self.merge_peers >= 0, "mechanism.merge_peers", "must be >= 0")
        _check(self.merge in MERGE_RULES, "mechanism.merge", f"must be one of {MERGE_RULES}")
        _check(self.temperature > 0, "mechanism.temperature", "must be positive")
        _check(0 <= self.local_dominance <= 1, "mechanism.local_dominance", "must be in [0, 1]")
        _check(0 <= self.eligibility < 1, "mechanism.eligibility", "must be in [0, 1)")
        _check(0 < self.ma_alpha <= 1, "mechanism.ma_alpha", "must be in (0, 1]")
        _check(self.max_delta_norm > 0, "mechanism.max_delta_norm", "must be positive")
        _check(0 < self.copy_threshold <= 1, "mechanism.copy_threshold", "must be in (0, 1]")
        _check(
            0 < self.low_rank_copy_threshold <= 1, "mechanism.low_rank_copy_threshold", "must be in (0, 1]"
        )
        _check(self.fetch_seconds > 0, "mechanism.fetch_seconds", "must be positive")
        _check(self.link_bytes_per_second >= 0, "mechanism.link_bytes_per_second", "must be >= 0")
        _check(self.host_threads >= 0, "mechanism.host_threads", "must be >= 0")
        _check(self.fetch_stall_seconds > 0, "mechanism.fetch_stall_seconds", "must be positive")
        _check(0 <= self.fetch_slow_fraction < 1, "mechanism.fetch_slow_fraction", "must be in [0, 1)")
        _check(0 < self.close_control_cosine <= 1, "mechanism.close_control_cosine", "must be in (0, 1]")
        _check(self.close_controls >= 0, "mechanism.close_controls", "must be >= 0")
        _check(0 <= self.slice_fraction <= 1, "mechanism.slice_fraction", "must be in [0, 1]")


LOCAL_MECHANISM = frozenset(
    {
        "stream_deltas",
        "fetch_seconds",
        "fetch_concurrency",
        "host_threads",
        "link_bytes_per_second",
        "retention_windows",
    }
)
"""Mechanism settings each node chooses for itself (memory, its own link, its own bucket): every
other mechanism setting, the model's shape and the subnet are protocol (`protocol_settings`)."""


@dataclass(frozen=True)
class ProtocolSettings:
    """What every node of a subnet must agree on, frozen: the model's shape and seed, the netuid and
    every mechanism setting but `LOCAL_MECHANISM` (windows, pages, codec, merge, scoring, sample
    sizes, thresholds). The publisher signs its `digest` and `values` into LATEST.json; a node whose
    own differ refuses to run and names the fields (`differences`)."""

    values: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of `values`."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """`name: ours != theirs` for each field that differs (a field only one side has included)."""
        ours = self.as_dict()
        return [
            f"{k}: {ours.get(k, '(none)')!r} != {other.get(k, '(none)')!r}"
            for k in sorted(ours.keys() | other.keys())
            if ours.get(k) != other.get(k)
        ]


def protocol_settings(settings: Settings) -> ProtocolSettings:
    """The protocol part of `settings` (see `ProtocolSettings`)."""
    values = {f"model.{k}": v for k, v in dataclasses.asdict(settings.model).items()}
    values |= {
        f"mechanism.{k}": v
        for k, v in dataclasses.asdict(settings.mechanism).items()
        if k not in LOCAL_MECHANISM
    }
    values["chain.netuid"] = settings.chain.netuid
    return ProtocolSettings(tuple(sorted(values.items())))


CHAIN_NETWORKS = ("embedded", "finney", "test", "local", "archive")


@dataclass
class ChainConfig:
    """Which chain to talk to, and the parameters of the embedded one."""

    network: str = "embedded"
    """`embedded` (the SQLite chain), or a Bittensor network: finney, test, local, ws://…"""
    chain_endpoint: str = ""
    """Bittensor websocket endpoint (overrides network), or the SQLite file of the embedded chain
    (default: <dir>/chain.sqlite)."""
    netuid: int = 212
    """Subnet id."""
    block_time: float = 12.0
    """Seconds per block on the embedded chain."""
    tempo: int = 10
    """Blocks between Yuma epochs on the embedded chain."""
    weights_rate_limit: int = 5
    """Blocks a validator must wait between two set_weights on the embedded chain."""
    max_uids: int = 256
    """Uid slots on the embedded chain."""
    immunity_period: int = 100
    """Blocks after registration during which a uid cannot be replaced."""
    max_validators: int = 64
    """Top-stake hotkeys that get a validator permit."""
    activity_cutoff: int = 5000
    """Blocks after its last weights (or registration) that a validator's stake still counts in
    the embedded chain's Yuma (subtensor's `activity_cutoff`)."""
    version_key: int = -1
    """Weights version key sent with set_weights on a real network; -1 reads the subnet's
    `weights_version` from the chain."""
    call_timeout: float = 60.0
    """Seconds any one call to a real network may take before it counts as a transient failure."""
    finality_timeout: float = 120.0
    """Seconds to wait for a block to be finalized before its hash is used as a seed."""

    @property
    def embedded(self) -> bool:
        """The SQLite chain; a ws:// `chain_endpoint` means a Bittensor node whatever `network` says."""
        return self.network == "embedded" and not self.chain_endpoint.startswith(("ws://", "wss://"))

    def __post_init__(self) -> None:
        _check(
            self.network in CHAIN_NETWORKS or self.network.startswith(("ws://", "wss://")),
            "chain.network",
            f"must be one of {CHAIN_NETWORKS} or a ws:// endpoint",
        )
        _check(0 <= self.netuid < 65536, "chain.netuid", "must fit in u16")
        _check(self.block_time > 0, "chain.block_time", "must be positive")
        _check(self.tempo > 0, "chain.tempo", "must be positive")
        _check(self.weights_rate_limit >= 0, "chain.weights_rate_limit", "must be >= 0")
        _check(0 < self.max_uids <= 4096, "chain.max_uids", "must be in 1..4096")
        _check(self.immunity_period >= 0, "chain.immunity_period", "must be >= 0")
        _check(self.max_validators > 0, "chain.max_validators", "must be positive")
        _check(self.activity_cutoff > 0, "chain.activity_cutoff", "must be positive")
        _check(-1 <= self.version_key < 2**64, "chain.version_key", "must be -1 (read it) or a u64")
        _check(self.call_timeout > 0, "chain.call_timeout", "must be positive")
        _check(self.finality_timeout > 0, "chain.finality_timeout", "must be positive")


@dataclass
class WalletConfig:
    """A standard Bittensor wallet (`<path>/<name>/hotkeys/<hotkey>`)."""

    name: str = "default"
    """Wallet (coldkey) name."""
    hotkey: str = "default"
    """Hotkey name."""
    path: str = "~/.bittensor/wallets"
    """Directory holding the wallets."""

    def __post_init__(self) -> None:
        for name in ("name", "hotkey"):
            value = getattr(self, name)
            _check(bool(value) and "/" not in value, f"wallet.{name}", "must be a plain name")


@dataclass
class StorageConfig:
    """Where this node's bucket lives and how buckets are reached."""

    backend: str = "local"
    """`local` (a directory per bucket under root) or `s3` (any S3 API)."""
    bucket: str = ""
    """This node's own bucket (a name, s3://name or https://endpoint/name)."""
    root: str = ""
    """Local backend: the directory that holds buckets/<bucket>/ (default: <dir>)."""
    endpoint_url: str = ""
    """S3 endpoint for R2, MinIO or a loopback server (empty: AWS)."""
    region: str = ""
    """S3 region (empty: from the environment, or us-east-1)."""
    path_style: bool = False
    """Use path-style S3 addressing (MinIO, loopback servers)."""
    timeout: float = 30.0
    """Seconds for a connect or read on one S3 call."""
    retries: int = 4
    """Retries of a transient storage failure, with exponential backoff and jitter."""
    multipart_threshold: int = 16 * 1024 * 1024
    """Objects above this size are uploaded in parts and downloaded in ranges."""
    max_workers: int = 16
    """Parallel transfers (connection pool size) for gathers and multipart."""
    allow_private_endpoints: bool = False
    """Let peer reads go to loopback/private/link-local hosts (tests, private deployments); the
    embedded chain implies it. Off on a real network: such commitments are `bad_commitment`."""
    public_url: str = ""
    """A public base URL validators GET this node's objects from (`{public_url}/{key}`): an R2
    r2.dev subdomain or custom domain. Committed (as https+get://…) instead of the bucket."""
    read_key_id: str = ""
    """Access key id (32 hex) of a READ-ONLY R2 API token for this bucket, published on chain in
    an r2:// commitment so validators can sign their reads (R2 refuses unsigned S3 reads)."""
    read_secret: str = ""
    """Secret (64 hex) of that read-only token: it is published too, so never a write key."""
    r2_account: str = ""
    """R2 account id (32 hex) for an r2:// commitment (empty: from endpoint_url's host)."""
    r2_endpoint: str = "https://{account}.r2.cloudflarestorage.com"
    """Where r2:// commitments are read (`{account}` is filled in); tests point it at loopback."""

    def __post_init__(self) -> None:
        _check(self.backend in ("local", "s3"), "storage.backend", "must be local or s3")
        _check(
            bool(self.read_key_id) == bool(self.read_secret),
            "storage.read_key_id",
            "set read_key_id and read_secret together",
        )
        _check(self.timeout > 0, "storage.timeout", "must be positive")
        _check(self.retries >= 0, "storage.retries", "must be >= 0")
        _check(self.multipart_threshold >= 5 * 1024 * 1024, "storage.multipart_threshold", ">= 5 MiB")
        _check(self.max_workers > 0, "storage.max_workers", "must be positive")


@dataclass
class DataConfig:
    """The corpus and tokenizer every node uses."""

    corpus: str = "shakespeare"
    """`shakespeare` (embedded), a path or glob of .txt/.jsonl/.parquet, or a hub dataset
    (`hf:NAME@REVISION[:SPLIT]`, e.g. `hf:HuggingFaceFW/fineweb-edu@<commit>:train`)."""
    tokenizer: str = "bpe"
    """`bpe` (byte-level BPE trained on the corpus) or a Hugging Face tokenizer name/path."""
    cache_dir: str = "~/.cache/bistro"
    """Where corpora, tokenizers and tokenized pages are cached."""
    page_cache_bytes: int = 4 << 30
    """Bytes of tokenized pages kept on disk; past it the least recently used go."""
    hub_root: str = ""
    """`hf:` corpora: a directory laid out like the hub (`datasets/NAME@REVISION/...`) to read
    instead of the Hugging Face Hub (empty: the hub)."""

    def __post_init__(self) -> None:
        _check(bool(self.corpus), "data.corpus", "must not be empty")
        _check(bool(self.tokenizer), "data.tokenizer", "must not be empty")
        _check(self.page_cache_bytes > 0, "data.page_cache_bytes", "must be positive")


@dataclass
class MetricsConfig:
    """What a node exports for dashboards: a Prometheus endpoint and, optionally, Weights & Biases."""

    port: int = 0
    """Port of the Prometheus endpoint (`/metrics`); 0: no endpoint."""
    host: str = "127.0.0.1"
    """Address the endpoint listens on (0.0.0.0 for a scraper on another machine)."""
    wandb_project: str = ""
    """Weights & Biases project to log each window to (empty: no W&B)."""
    wandb_entity: str = ""
    """W&B entity (team or user; empty: the account's default)."""
    wandb_mode: str = "online"
    """`online`, `offline` (writes the run under wandb_dir, no account needed) or `disabled`."""
    wandb_dir: str = ""
    """Where W&B writes its run files (empty: <dir>/wandb)."""

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "metrics.port", "must be 0 (off) or a TCP port")
        _check(bool(self.host), "metrics.host", "must not be empty")
        _check(self.wandb_mode in ("online", "offline", "disabled"), "metrics.wandb_mode",
               "must be online, offline or disabled")  # fmt: skip


@dataclass
class Settings:
    """Everything one process needs, built once and passed whole."""

    preset: str = "tiny"
    """Name of the preset these settings started from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mechanism: MechanismConfig = field(default_factory=MechanismConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:N, mps."""
    dir: str = "~/.bistro"
    """Working directory of this node: state, logs, the embedded chain and local buckets."""
    debug: bool = False
    """Log at debug level."""
    log_json: bool = False
    """Log one JSON object a line (time, level, node, window, uid, verdict, message) for log
    shippers such as Loki or Vector (`--logging.json`)."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}")
        _check(
            self.device == "cpu" or self.device.startswith(("cuda", "mps")),
            "device",
            "must be cpu, cuda, cuda:N or mps",
        )

    @property
    def home(self) -> Path:
        """The node's working directory, expanded."""
        return Path(self.dir).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "mechanism": MechanismConfig,
    "chain": ChainConfig,
    "wallet": WalletConfig,
    "storage": StorageConfig,
    "data": DataConfig,
    "metrics": MetricsConfig,
}

# Presets: a table of named sizes (tests build `tiny`). Each entry overrides the defaults above.


def _model(vocab: int, hidden: int, layers: int, heads: int, kv: int, mlp: int, seq: int) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                intermediate_size=mlp, sequence_length=seq)  # fmt: skip


def _mechanism(bpw: int, rows: int, pages: int, global_: int, alpha: float, max_mib: int, max_norm: float,
               checkpoint: int, retention: int = 4) -> dict[str, Any]:  # fmt: skip
    """A preset's mechanism; what every size shares (temperature 1, two eval pages, even local/global
    mix, weights every window) is written here once. Codec, compression, error feedback and merge
    are `MechanismConfig`'s defaults (part of the protocol: one place)."""
    return dict(blocks_per_window=bpw, rows_per_page=rows, pages_per_window=pages, eval_pages=2,
                global_pages=global_, temperature=1.0, local_dominance=0.5,
                ma_alpha=alpha, weights_every=1, retention_windows=retention, max_delta_bytes=max_mib * 2**20,
                max_delta_norm=max_norm, checkpoint_every=checkpoint)  # fmt: skip


# fmt: off
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # ~1.9M parameters: thousands of tokens/s on 2 CPU cores; sized so a 10-miner localnet keeps up.
    "tiny": {"model": _model(4096, 128, 4, 4, 4, 384, 128),
             "train": dict(lr=3e-3, batch_size=8, steps_per_window=10, warmup_steps=20),
             "mechanism": {**_mechanism(10, 2, 8, 2, 0.3, 16, 50.0, 5), "upload_grace_blocks": 1}},
    # ~10M parameters.
    "small": {"model": _model(8192, 256, 7, 8, 8, 768, 256),
              "train": dict(lr=2e-3, batch_size=8, steps_per_window=30, warmup_steps=30),
              "mechanism": _mechanism(10, 8, 6, 3, 0.3, 32, 100.0, 5)},
    # ~148M parameters. Steps and pages: see REAL_SIZE_TRAINING.
    "150M": {"model": _model(32000, 768, 12, 12, 12, 2560, 1024),
             "train": dict(lr=6e-4, batch_size=8, steps_per_window=13000, warmup_steps=100),
             "mechanism": {**_mechanism(25, 8, 13000, 4, 0.2, 128, 500.0, 10), "miner_span": 26000}},
    # TinyLlama's shape: ~1.1B parameters.
    "1B": {"model": _model(32000, 2048, 22, 32, 4, 5632, 2048),
           "train": dict(lr=4e-4, batch_size=4, steps_per_window=3000, warmup_steps=200),
           "mechanism": {**_mechanism(50, 8, 24000, 4, 0.2, 512, 2000.0, 20), "miner_span": 48000}},
    # The seed era's shape (Llama-2 7B): hidden 4096, 32 layers, 32 heads, MLP 11008.
    "7B": {"model": _model(32000, 4096, 32, 32, 32, 11008, 2048),
           "train": dict(lr=3e-4, batch_size=2, steps_per_window=1900, warmup_steps=200),
           "mechanism": {**_mechanism(100, 8, 7600, 4, 0.2, 2048, 5000.0, 20, retention=3),
                         "miner_span": 15200}},
}
# fmt: on

REAL_SIZE_TRAINING = {"150M": "1xH100", "1B": "8xH100", "7B": "8xH100"}
"""Each real-size preset's reference miner, on which `train.steps_per_window` fills about 90% of the
room the window leaves after the validator's critical path and the miner's own sync and upload
(`bistro plan --preset P --uids 256 --hardware H --plan.set steps_per_window=-1`: 150M 13,123, 1B
3,016, 7B 1,915 steps; `miner.train_fraction` 0.87, 0.87 and 0.80 at the rounded counts), and
`mechanism.pages_per_window` holds those steps' tokens on it (steps × batch × sequence length × its
GPUs over a page's ~8,192 tokens), so a miner trains on fresh pages, not the same eight again and
again; `miner_span` is twice that. A miner on slower hardware takes the steps that fit before the
deadline (`Miner.steps_that_fit`)."""

SCORED_PER_WINDOW = {"tiny": 256, "small": 64, "150M": 32, "1B": 32, "7B": 32}
"""`mechanism.max_uids_per_window` of each preset (protocol). 32 of a subnet's 256 uids is what the
validator's window fits at 150M-7B on each preset's reference hardware (`bistro plan --preset P
--uids 256 --hardware 8xH100 --design new`), and the sample still reaches every uid within 10
windows (`sample.MAX_GAP`; 32 a window covers 256 uids in 8 on average). `tiny` and `small` are
run on one machine with a few dozen uids: every uid every window there unless a run sets less."""
for _preset, _size in SCORED_PER_WINDOW.items():
    PRESETS[_preset]["mechanism"]["max_uids_per_window"] = _size

# The seed's flags, and other short names, mapped onto dotted setting paths.
ALIASES: dict[str, str] = {
    "netuid": "chain.netuid",
    "subtensor.network": "chain.network",
    "subtensor.chain_endpoint": "chain.chain_endpoint",
    "subtensor.version_key": "chain.version_key",
    "bucket": "storage.bucket",
    "storage": "storage.backend",
    "s3.endpoint_url": "storage.endpoint_url",
    "s3.region": "storage.region",
    "s3.path_style": "storage.path_style",
    "logging.debug": "debug",
    "logging.json": "log_json",
    "corpus": "data.corpus",
    "wandb.project": "metrics.wandb_project",
    "wandb.entity": "metrics.wandb_entity",
    "wandb.mode": "metrics.wandb_mode",
    "wandb.dir": "metrics.wandb_dir",
}


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Turn a flag or file value into the field's type."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__}") from None


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f.type for f in fields(cls)}


def setting_paths() -> dict[str, Any]:
    """Every dotted setting path (`train.lr`, `device`, …) and its type."""
    paths: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name in SECTIONS:
            for sub, kind in _field_types(SECTIONS[f.name]).items():
                paths[f"{f.name}.{sub}"] = kind
        else:
            paths[f.name] = f.type
    return paths


def _apply(raw: dict[str, dict[str, Any]], overrides: dict[str, Any], source: str) -> None:
    """Merge dotted or nested overrides into `raw` (section -> field -> value)."""
    paths = setting_paths()
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in SECTIONS:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[ALIASES.get(key, key)] = value
    for path, value in flat.items():
        path = ALIASES.get(path, path)
        if path not in paths:
            raise ConfigError(f"{path}: unknown setting (from {source})")
        section, _, name = path.rpartition(".")
        raw.setdefault(section, {})[name] = _coerce(value, paths[path], path)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON settings file (nested sections or dotted keys)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config: no such file {p}")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config: cannot parse {p}: {e}") from None


def build_settings(
    preset: str = "tiny",
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Preset, then file, then overrides (flags): the later wins, field by field."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: must be one of {sorted(PRESETS)}, not {preset!r}")
    raw: dict[str, dict[str, Any]] = {"": {"preset": preset}}
    _apply(raw, PRESETS[preset], f"preset {preset}")
    if file is not None:
        _apply(raw, load_file(file), str(file))
    if overrides:
        _apply(raw, overrides, "flags")
    top = raw.pop("", {})
    sections = {name: SECTIONS[name](**raw.get(name, {})) for name in SECTIONS}
    return Settings(**sections, **top)


def replace(settings: Settings, **dotted: Any) -> Settings:
    """A copy of `settings` with dotted paths changed: `replace(s, **{"train.lr": 1e-3})`."""
    raw = {name: dataclasses.asdict(getattr(settings, name)) for name in SECTIONS}
    top = {f.name: getattr(settings, f.name) for f in fields(Settings) if f.name not in SECTIONS}
    merged: dict[str, dict[str, Any]] = {"": top, **raw}
    _apply(merged, dotted, "replace")
    top = merged.pop("")
    return Settings(**{n: SECTIONS[n](**merged[n]) for n in SECTIONS}, **top)


def param_count(model: ModelConfig) -> int:
    """Parameters of the Llama model a ModelConfig describes (embeddings counted: they train)."""
    h, i, v, L = model.hidden_size, model.intermediate_size, model.vocab_size, model.num_layers
    kv = h // model.num_heads * model.num_kv_heads
    attn = 2 * h * h + 2 * h * kv
    per_layer = attn + 3 * h * i + 2 * h
    head = 0 if model.tie_embeddings else v * h
    return v * h + head + L * per_layer + h
