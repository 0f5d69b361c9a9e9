"""`bistro plan --preset NAME [--nproc N] [--json]`: what a miner and a validator of a preset need.

Every figure counts tensors' own bytes (what torch allocates for them), line by line from the
tensors the code holds, named where they live; process overhead (Python, CUDA context, allocator
slack) is not in it. Shapes come from the real model built on the `meta` device (no memory), the
delta size from the codec's own `wire_spec`, so a plan cannot drift from the code it describes.

Miner, one process (`Miner` + `Trainer`), per parameter: the model (4 B), its gradients (4, during
training), AdamW's two moments (8), θ_w kept apart in `Node.master` (4), the error-feedback residual
(4); while compressing, the delta (4) and its target Δ + residual (4) replace the gradients. Under
FSDP2 (`train.fsdp`) every one of those is sharded over the N ranks except rank 0's full master,
which it needs to follow the publisher; the layers being computed are gathered whole.

Validator: θ_eval in the model (4), θ_w (4), and per uid its downloaded blob and its decoded delta
(int64 index + fp32 value per kept entry; with `mechanism.stream_deltas` two decoded at a time, not
every uid's), plus the merge's sums (dense fp32 per parameter while a pass runs) and the update.

Activations were fitted on CPU fp32 to `measure_peak` of a training step over model shapes
(`tests/unit/test_plan.py` checks whole-plan peaks of `tiny` and `small` against measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig, Settings, replace
from .delta.codec import CODECS, TopK, codec_context
from .delta.slices import header_bytes
from .protocol import EVIDENCE_PAGES

Shapes = dict[str, tuple[int, ...]]

GiB = 1024**3
UIDS = 256
"""A subnet's full metagraph: the number of uids a validator downloads from at most."""
WINDOWS = 1000


@dataclass(frozen=True)
class Item:
    """One group of tensors a node holds, in bytes."""

    name: str
    bytes: int
    where: str


def model_shapes(cfg: ModelConfig) -> Shapes:
    """Names and shapes of the trainable tensors, from the real model built without memory."""
    from transformers import LlamaForCausalLM

    from .model import llama_config

    config = llama_config(cfg)
    config.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def activation_bytes(
    cfg: ModelConfig, batch: int, *, checkpointing: bool, cuda: bool, train: bool = True
) -> int:
    """Peak activations of one step (training: forward + backward; else one forward).

    Floats per token, fitted on CPU fp32: each layer keeps ~9 h + 3.25 i (norms, q/k/v, rotary, MLP
    halves) and the head ~2.5 V (logits, log-softmax, its gradient). Checkpointing keeps ~2 h per
    layer plus one layer recomputed; a forward alone holds one layer and ~1.5 V (logits and loss). Under
    bf16 autocast (CUDA) layer activations halve; logits stay fp32.
    """
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    layer = 9 * h + 3.25 * i
    layer_bytes = 2 if cuda else 4
    if not train:
        layers, head = layer, 1.5 * v
    elif checkpointing:
        layers, head = n * 2 * h + layer, 2.5 * v
    else:
        layers, head = n * layer, 2.5 * v
    tokens = batch * cfg.sequence_length
    return int(tokens * (layers * layer_bytes + head * 4 + cfg.sequence_length * 4))


def _n(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def wire_bytes(settings: Settings, shapes: Shapes) -> int:
    """Bytes of one delta's tensors on the wire (the safetensors header adds a few KiB)."""
    codec = CODECS[settings.mechanism.codec]
    spec = codec.wire_spec(shapes, codec_context(settings, 0))
    return sum(math.prod(s) * dt.itemsize for s, dt in spec.values())


def _dense(settings: Settings, shape: tuple[int, ...]) -> bool:
    """Whether a decoded delta holds this parameter dense (the `dense` codec; lowrank's matrices are
    factors plus sparse values)."""
    return settings.mechanism.codec == "dense"


def factor_bytes(settings: Settings, shapes: Shapes) -> int:
    """fp32 factors one decoded delta holds: lowrank's P [m, rank] and Q [n, rank] of each matrix."""
    m = settings.mechanism
    if m.codec != "lowrank":
        return 0
    return sum(4 * m.rank * (s[0] + s[1]) for s in shapes.values() if len(s) == 2)


def kept_entries(settings: Settings, shapes: Shapes) -> int:
    """Entries one decoded delta holds (each an int64 index and an fp32 value when sparse)."""
    m = settings.mechanism
    k = TopK().k(codec_context(settings, 0))

    def entries(s: tuple[int, ...]) -> int:
        if _dense(settings, s):
            return math.prod(s)
        if m.codec in ("topk", "topk2", "lowrank"):
            return min(math.prod(s), -(-math.prod(s) // m.topk_chunk) * k)
        return max(1, round(math.prod(s) / m.compression))

    return sum(entries(s) for s in shapes.values())


def decoded_bytes(settings: Settings, shapes: Shapes) -> int:
    """Bytes of one decoded delta: 4 an entry of a dense part, 12 (int64 index, fp32 value) a sparse
    one, and lowrank's fp32 factors."""
    entries = sum(
        (4 if _dense(settings, s) else 12) * kept_entries(settings, {n: s}) for n, s in shapes.items()
    )
    return entries + factor_bytes(settings, shapes)


def miner_items(settings: Settings, shapes: Shapes, nproc: int, rank: int = 0) -> dict[str, list[Item]]:
    """What one miner rank holds while training and while compressing, tensor group by group."""
    n = _n(shapes)
    fsdp = settings.train.fsdp and nproc > 1
    share = nproc if fsdp else 1
    shard = -(-n // share)
    largest = max(math.prod(s) for s in shapes.values())
    cuda = settings.device.startswith("cuda")
    act = activation_bytes(settings.model, settings.train.batch_size, cuda=cuda,
                           checkpointing=settings.train.activation_checkpointing)  # fmt: skip
    master = 4 * n if rank == 0 or not fsdp else 4 * shard
    state = [
        Item("model parameters", 4 * shard, "Trainer.model (FSDP: this rank's shard)"),
        Item("AdamW moments", 8 * shard, "Trainer.optimizer state, kept across windows"),
        Item("master θ_w", master, "Node.master (FSDP ranks > 0: their shard)"),
        Item("error-feedback residual", 4 * shard, "Miner.ef (FSDP: per rank, its shard)"),
    ]
    train = [*state, Item("gradients", 4 * shard, "param.grad during a step"),
             Item("AdamW step temporaries", 4 * shard, "foreach sqrt/denominator in optimizer.step"),
             Item("activations", act, "forward/backward of one batch_size batch")]  # fmt: skip
    if fsdp:
        layer = _largest_layer(shapes)
        train.append(Item("gathered layers", 2 * layer * (2 if cuda else 4), "FSDP all-gather, two layers"))
    compress = [*state, Item("delta", 4 * shard, "trained − θ_w"),
                Item("delta + residual", 4 * shard, "compress target, becomes the residual"),
                Item("encode temporaries", 3 * 4 * largest if not fsdp else 3 * 4 * -(-largest // share),
                     "TopK.encode of the largest tensor: padded copy, |x|, topk")]  # fmt: skip
    if fsdp:
        compress.append(Item("θ_w broadcast", 4 * largest, "one full tensor at a time, loading θ_w"))
    return {"train": train, "compress": compress}


def _largest_layer(shapes: Shapes) -> int:
    """Parameters of the largest FSDP unit: one decoder layer, or the embedding and head."""
    layers: dict[str, int] = {}
    for name, s in shapes.items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts else name
        layers[key] = layers.get(key, 0) + math.prod(s)
    return max(layers.values())


def validator_items(settings: Settings, shapes: Shapes, uids: int) -> dict[str, list[Item]]:
    """What the validator holds while scoring `uids` deltas and while merging them."""
    n = _n(shapes)
    per_uid = decoded_bytes(settings, shapes)
    cuda = settings.device.startswith("cuda")
    act = activation_bytes(settings.model, settings.train.eval_batch_size, cuda=cuda, checkpointing=False,
                           train=False)  # fmt: skip
    sparse = sum(kept_entries(settings, {k: s}) for k, s in shapes.items() if not _dense(settings, s))
    dense = n - sum(math.prod(s) for s in shapes.values() if not _dense(settings, s))
    union = min(n - dense, uids * sparse)
    m = settings.mechanism
    held = 2 if m.stream_deltas else uids  # streaming: the one in use and the next one decoding
    state = [
        Item("θ_eval (the model)", 4 * n, "Evaluator.params"),
        Item("master θ_w", 4 * n, "Node.master"),
        Item("decoded deltas", held * per_uid,
             "Verdict.delta: decoded again at each read (stream_deltas)" if m.stream_deltas
             else "Verdict.delta of every uid, held for the window"),
        Item("downloaded blobs", uids * wire_bytes(settings, shapes), "gather() results (stream_deltas: DeltaHandle.blob)"),
        Item("sketches", uids * 8 * (1 << 16), "drop_copies"),
    ]  # fmt: skip
    # The merges hold sparse parts on the union of positions and lowrank's low-rank parts as the
    # deltas' factors stacked (P̃, Q̃: `uids` deltas' factors), never a parameter-sized sum.
    factors = uids * factor_bytes(settings, shapes)
    update = Item("merged update", union * 12 + dense * 4 + factors,
                  "union of positions and values; stacked factors; dense parts")  # fmt: skip
    # `_Parts`, one pass delta by delta (`delta/merge.py`): per parameter the folded union (int64
    # position, Σ w c v, Σ w) and parts waiting to fold (at most as many, 12 B an entry), or, once
    # they reach half the parameter, dense slots (9 B a position); one parameter's fold at a time
    # (its sort, ~80 B an entry); the factors; a plain dense part (the `dense` codec) dense sums.
    covered = [(math.prod(s), min(math.prod(s), uids * kept_entries(settings, {k: s})))
               for k, s in shapes.items() if not _dense(settings, s)]  # fmt: skip
    sums = sum(9 * size if u >= size / 2 else 28 * u for size, u in covered)
    fold = 80 * max((min(u, size // 2) for size, u in covered), default=0)
    accumulators = 12 * dense + sums + fold + factors
    if m.merge != "mean":
        inputs = Item("merge inputs", accumulators, "merge's _Parts: the union, its fold, stacked factors")
        return {"score": [*state, Item("activations", act, "one eval_batch_size forward (inference mode)")],
                "merge": [*state, inputs, update]}  # fmt: skip
    mean_merge = Item("mean-merge sums", 16 * dense + 16 * union + factors,
                      "MeanMerge: Σ w and the update's means at the union; stacked factors")  # fmt: skip
    largest = 4 * max(math.prod(s) for s in shapes.values())
    score = [*state, mean_merge, Item("activations", act, "one eval_batch_size forward (inference mode)"),
             Item("leave-one-out clone", largest, "applied_per_module: one parameter's values at a time")]  # fmt: skip
    build = [*state, Item("mean-merge accumulators", accumulators, "_Parts while MeanMerge reads the deltas")]
    merge = [
        *state,
        Item("merge inputs", accumulators, "_Parts of merge_mean: the union, its fold, factors"),
        update,
    ]
    return {"score": score, "theta_eval": build, "merge": merge}


def _peak(phases: dict[str, list[Item]]) -> tuple[int, str]:
    phase = max(phases, key=lambda p: sum(i.bytes for i in phases[p]))
    return sum(i.bytes for i in phases[phase]), phase


def make_plan(settings: Settings, nproc: int = 1, uids: int = UIDS, hardware: str | Hardware | None = None,
              link_gbit: float = 1.0, design: Design | None = None, rates: Rates | None = None) -> dict[str, Any]:  # fmt: skip
    """The whole plan as JSON-able data (`bistro plan --json` prints exactly this). With `hardware`,
    the window's time, bandwidth and memory per GPU too (`time_plan`)."""
    plan = _memory_plan(settings, nproc, uids)
    if hardware is None:
        return plan
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    t = time_plan(settings, hw, link_gbit, uids, design, rates)
    vt, mt = t.pop("validator_time"), t.pop("miner_time")
    plan["window_seconds"] = t.pop("window_seconds")
    plan["validator"].update(vt)
    plan["miner"].update(mt)
    plan["miner"].pop(
        "disk_per_1000_windows_bytes", None
    )  # a miner's own uploads: see `upload_per_window_bytes`
    plan["miner"]["disk_per_1000_windows_bytes"] = WINDOWS * mt["upload_per_window_bytes"]
    plan["breakdown"] = {"validator": vt["breakdown_s"], "miner": mt["breakdown_s"]}
    plan.update(t)
    return plan


def _memory_plan(settings: Settings, nproc: int, uids: int) -> dict[str, Any]:
    shapes = model_shapes(settings.model)
    n = _n(shapes)
    m = settings.mechanism
    wire = wire_bytes(settings, shapes)
    codec = CODECS[m.codec]
    ratio = codec.ratio(shapes, codec_context(settings, 0))
    update = min(n, uids * kept_entries(settings, shapes)) * 12
    checkpoint = 4 * n
    miner_phases = miner_items(settings, shapes, nproc)
    miner_peak, miner_phase = _peak(miner_phases)
    val_phases = validator_items(settings, shapes, uids)
    val_peak, val_phase = _peak(val_phases)
    transient = ("activations", "gathered layers", "AdamW step temporaries")
    held = [i for i in miner_phases["train"] if i.name not in transient]
    return {
        "preset": settings.preset,
        "parameters": n,
        "nproc": nproc,
        "fsdp": bool(settings.train.fsdp and nproc > 1),
        "device": settings.device,
        "delta_wire_bytes": wire,
        "delta_ratio": ratio,
        "uids": uids,
        "miner": {
            "parameters": n,
            "bytes_per_param": sum(i.bytes for i in held) / n,
            "peak_bytes_per_rank": miner_peak,
            "peak_phase": miner_phase,
            "delta_wire_bytes": wire,
            "upload_per_window_bytes": wire,
            "disk_per_1000_windows_bytes": WINDOWS * wire,
            "disk_retained_bytes": m.retention_windows * wire + 12 * n,
            "items": {p: [i.__dict__ for i in items] for p, items in miner_phases.items()},
        },
        "validator": {
            "parameters": n,
            "bytes_per_param": 8.0 + (2 if m.stream_deltas else uids) * decoded_bytes(settings, shapes) / n,
            "peak_bytes_per_rank": val_peak,
            "peak_phase": val_phase,
            "delta_wire_bytes": wire,
            "download_per_window_bytes": uids * wire,
            "publish_per_window_bytes": update + checkpoint / m.checkpoint_every,
            "disk_per_1000_windows_bytes": WINDOWS * update + WINDOWS // m.checkpoint_every * checkpoint,
            "disk_retained_bytes": 2 * checkpoint + 2 * m.checkpoint_every * update + checkpoint,
            "items": {p: [i.__dict__ for i in items] for p, items in val_phases.items()},
        },
    }


# --- time, bandwidth and the design knobs ---------------------------------------------------------
#
# `bistro plan --hardware H --link-gbit L` adds a model of time to the memory above: what a
# validator (fetch, score, publish) and a miner (sync, train, upload) spend in one window on the
# stated hardware, and whether each critical path fits `window_seconds` under the schedule. Every
# rate is an input: host rates (`Rates`) are fitted by `bistro bench scale` on `tiny` (its JSON can
# be passed back with `--rates FILE`), device rates come from the vendor's sheet (`HARDWARE`) times
# a stated utilisation. Protocol and design choices that the code does not have yet are `Design`
# fields, so the numbers change when the protocol does.

BLOCK_SECONDS = 12.0
"""Bittensor's block time: a window is `mechanism.blocks_per_window` of them."""


@dataclass(frozen=True)
class Hardware:
    """One machine a node runs on. Per-GPU figures are the vendor's data sheet; utilisation is ours."""

    name: str
    gpus: int
    """GPUs in the node (0: the host CPU does everything, at `Rates`' fitted CPU rates)."""
    peak_flops: float
    """Dense bf16 FLOP/s of one GPU, without structured sparsity (vendor sheet)."""
    gpu_bytes: float
    """Memory of one GPU in bytes (vendor sheet, decimal GB)."""
    hbm_bytes_per_s: float
    """Memory bandwidth of one GPU (vendor sheet): what element-wise device work is bound by."""
    host_bytes: float
    """Host memory of the node."""
    mfu_forward: float
    """Share of `peak_flops` an inference forward reaches (bf16, batches of 2k-token sequences)."""
    mfu_train: float
    """Share of `peak_flops` a training step reaches (FSDP2 over the node's GPUs)."""
    bandwidth_efficiency: float = 0.5
    """Share of `hbm_bytes_per_s` that gathers, scatters and element-wise kernels reach."""
    host_cores: int = 1
    """CPU cores of the node (vendor sheet, or the cloud VM's vCPUs)."""
    interconnect_bytes_per_s: float = 450e9
    """GPU to GPU in one node, one direction (NVLink 4 on H100/H200 SXM: 900 GB/s both ways)."""
    source: str = ""


_H100 = dict(peak_flops=989e12, gpu_bytes=80e9, hbm_bytes_per_s=3.35e12)
"""NVIDIA H100 SXM5 data sheet: 989 TFLOP/s dense BF16 (1,979 with 2:4 sparsity), 80 GB HBM3 at 3.35 TB/s."""
_H200 = dict(peak_flops=989e12, gpu_bytes=141e9, hbm_bytes_per_s=4.8e12)
"""NVIDIA H200 SXM data sheet: the H100's 989 TFLOP/s dense BF16, 141 GB HBM3e at 4.8 TB/s."""
MFU_FORWARD = 0.40
"""Inference forwards of 2k-token sequences in bf16 on Hopper reach 40-50% of peak in practice
(large GEMMs, attention via SDPA/flash); 40% is the conservative end."""
MFU_TRAIN = 0.35
"""Llama-7B FSDP training on 8 H100s is reported at 35-45% MFU (torchtitan, Megatron figures);
35% leaves room for an un-tuned FSDP2 step and activation checkpointing's recompute."""


def _this_host_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


HARDWARE: dict[str, Hardware] = {
    "cpu": Hardware("cpu", 0, 0.0, 0.0, 0.0, _this_host_bytes(), 1.0, 1.0, host_cores=os.cpu_count() or 1,
                    source="this machine, one thread: the fitted CPU rates of `Rates`"),
    "1xH100": Hardware("1xH100", 1, **_H100, host_bytes=225e9, mfu_forward=MFU_FORWARD, mfu_train=MFU_TRAIN,
                       host_cores=26, source="one H100 SXM5; host as a typical 1-GPU cloud VM (~225 GB, 26 vCPUs)"),
    "8xH100": Hardware("8xH100", 8, **_H100, host_bytes=2000e9, mfu_forward=MFU_FORWARD, mfu_train=MFU_TRAIN,
                       host_cores=112,
                       source="DGX H100: 8 H100 SXM5, 2 TB host memory, 2 Xeon Platinum 8480C (112 cores)"),
    "4xH200": Hardware("4xH200", 4, **_H200, host_bytes=1000e9, mfu_forward=MFU_FORWARD, mfu_train=MFU_TRAIN,
                       host_cores=48, source="4 H200 SXM (half an HGX H200), ~1 TB host memory and 48 cores assumed"),
}  # fmt: skip


@dataclass(frozen=True)
class Rates:
    """Host rates, one thread, and the CPU forward model; ns per parameter per uid unless named
    otherwise. Fitted on `tiny` by `bistro bench scale` (`rates` in its JSON; `bistro plan --rates
    FILE` reads them). The defaults are `lowrank` (the default codec, at the 7B preset's compression)
    timed on eight deltas of one 4096 × 4096 matrix, one thread, on the development machine's CPU
    (`bistro bench scale` prints the same figures as `large_matrix` beside its fit): per parameter of
    a large matrix they hold at any model size, where `tiny`'s small tensors add a cost per tensor.
    Hash, the matrix product and element-wise rates and the train factor are rounded from `bench
    scale` fits there; `encode_ns` is an assumption (lowrank on `tiny` fitted 31)."""

    decode_ns: float = 0.6
    """`redecode` of one delta (safetensors load + the codec's decode)."""
    sketch_ns: float = 0.3
    """The copy screen's pass over one delta: `sketch` of its sparse values and its share of the
    exact low-rank cosines from factors (`low_rank_cosines`)."""
    merge_sums_ns: float = 0.8
    """`MeanMerge`'s pass over one delta (its sums)."""
    share_term_ns: float = 4.8
    """One uid's `share` + `term` (the sparse bookkeeping on the host, and `abs_sum_ns`)."""
    abs_sum_ns: float = 2.2
    """Of `share_term_ns`, the parameter-sized part: `share`'s Σ |P Qᵀ|, materialised block by
    block where the model is (on a GPU node: device work, priced by memory bandwidth)."""
    leave_one_out_ns: float = 4.4
    """A uid's term applied and taken back once (`applied_per_module`: a parameter's clone, its
    term added in place, the clone copied back), per parameter and per forward call of its
    leave-one-out pass (one call per `eval_batch_size` sequences)."""
    theta_eval_ns: float = 1.3
    """θ_eval's low-rank part (`add_` of the merge's stacked factors), per matrix parameter and per
    rank of the stack (lowrank: one per scored uid)."""
    merge_mean_ns: float = 0.8
    """`merge_mean`'s pass over one merged delta (the publisher's update)."""
    encode_ns: float = 10.0
    """A miner's `compress` + `encode_delta`, per parameter."""
    apply_update_ns: float = 0.5
    """`apply_update` of a merged update onto θ, per parameter."""
    hash_ns_per_byte: float = 0.7
    """`model_hash` (sha256), per byte of fp32 master."""
    gemm_ns_per_flop: tuple[tuple[int, float], ...] = (
        (32, 0.015),
        (128, 0.0085),
        (256, 0.0085),
        (1024, 0.0075),
    )
    """CPU matrix products: (inner width, ns per FLOP), interpolated in log width."""
    elementwise_ns: float = 1.6
    """CPU forward: ns per activation element (norms, rotary, softmax, the loss), fitted on `tiny`."""
    train_factor: float = 3.1
    """CPU: seconds of one training step over the seconds of a forward over the same tokens."""
    source: str = "defaults (lowrank on a 4096 × 4096 matrix; see the class's note)"


@dataclass(frozen=True)
class Design:
    """What the plan assumes of the protocol and of the node's code, beyond `Settings`.

    The defaults are the code as it is. `NEW_DESIGN` names the settings the "Real sizes" issues ask
    for; other engineers wire them into presets and `MechanismConfig` (`scored_uids` is
    `mechanism.max_uids_per_window`, `merge_peers` `mechanism.merge_peers`). Set any field with
    `bistro plan --plan.set FIELD=VALUE` (repeatable), or all of `NEW_DESIGN` with `--design new`."""

    schedule: str = "serial"
    """`serial`: miners wait for θ_w, published after scoring (today); `pipelined`: miners train
    window w+1 while window w is scored, so the two critical paths overlap."""
    scored_uids: int = 0
    """Uids a validator scores a window (0: `mechanism.max_uids_per_window`, at most `--uids`)."""
    merged_fraction: float = 1.0
    """Of the scored uids, the share whose deltas are merged (paid and helpful; 1: an upper bound)."""
    decode_on_device: bool = False
    """Decode each delta once, on the GPU, and keep it there (today: on the host, 1 decode a window,
    4 with `stream_deltas`, 5 on the publisher)."""
    weight_sum: bool = False
    """θ_eval plus a 16-bit per-position weight sum for the leave-one-out, instead of the mean
    merge's union tensors on the host (16 B + 20 B per union position)."""
    master_on_host: bool = False
    """Keep θ_w (fp32) in host memory, not beside θ_eval on the GPU (validator and miner rank 0)."""
    factored_lowrank: bool = False
    """Each GPU holds its uids' lowrank deltas factored, decoded once, and builds θ_eval's low-rank
    part as one GEMM per matrix of inner dimension rank × uids (the host merge already keeps the
    factors stacked and a uid's term is its own rank-r factors; today it materialises them on the
    host, rank by rank)."""
    follower_update: str = ""
    """What a follower downloads to reach θ_{w+1}: `union` (`mechanism.master_codec sparse`: int64
    index + fp32 value per position of the merged deltas' union), `recompressed`
    (`mechanism.master_codec same`: the publisher re-compresses the merge with the codec and a
    residual of its own: one delta-sized object) or `merge_set` (`merge_peers` deltas, merged by each
    node); empty: from `mechanism.master_codec`."""
    merge_peers: int = 20
    """`merge_set`: deltas merged a window (templar gathers ~20)."""
    fetch_concurrency: int = 0
    """Downloads in flight (0: all at once under one deadline, today; else seeded order, bounded)."""
    checkpoint_every: int = 0
    """Windows between full checkpoints (0: `mechanism.checkpoint_every`)."""
    checkpoint_retention: int = 2
    """Full checkpoints the publisher keeps (and the updates between them)."""
    checkpoint_async: bool = True
    """Upload checkpoints off the critical path (the code: a background thread writes a host copy
    of θ_{w+1} while the next window runs; false: inside the window that writes one)."""
    hash_threads: int = 0
    """Threads that hash the master (`model_hash`: per-tensor digests in parallel; 0: the code's
    default, one a core, counted as at most `USEFUL_HOST_THREADS`)."""
    validator_gpus: int = 0
    """GPUs the validator's forward passes run on (0: all of the node's: the code under `torchrun
    --nproc_per_node N bistro validator`, each rank building θ_eval and running its share of the
    scored uids' passes; 1: one process)."""
    host_threads: int = 0
    """Threads the validator's host work runs on (`mechanism.host_threads`; the fitted rates are one
    thread's). 0: the code's default, one a core, counted as at most `USEFUL_HOST_THREADS`."""
    steps_per_window: int = 0
    """A miner's optimizer steps a window (0: `train.steps_per_window`; -1: as many as fit)."""
    fill_fraction: float = 0.9
    """`steps_per_window -1`: training fills this share of the room the critical path leaves."""
    miner_checkpointing: bool = False
    """Miner recomputes activations (as `train.activation_checkpointing`, or-ed with it)."""
    sequences_per_page: float = 0.0
    """Sequences of `model.sequence_length` a page holds (0: rows_per_page × doc_tokens / length)."""
    doc_tokens: int = 1024
    """Tokens a document holds, on average (the basis of a page's size when not measured)."""
    copy_group_uids: int = 0
    """Uids a window finds in near-copy groups (each costs an own-page evidence pass on 2 × its
    local pages and, today, two decodes per exact pair)."""
    device_bytes_per_param_uid: float = 24.0
    """GPU bytes moved per parameter per uid by on-device decode + θ_eval + leave-one-out (decode
    writes 4, θ_eval's add reads and writes 8, the term's apply and restore 12)."""


USEFUL_HOST_THREADS = 16
"""Host threads the plan counts at most. The validator's host work is sorts, scatters and element-wise
passes bound by memory bandwidth: on this machine two threads ran them 1.6-2.0x faster than one
(decode, the mean merge's per-parameter sums, share and term, `bistro.threads`); one socket's DDR5
(~300 GB/s) is taken to feed about 16 such threads, not a node's hundred cores."""

NEW_DESIGN: dict[str, Any] = {
    "schedule": "pipelined", "scored_uids": 32, "decode_on_device": True, "weight_sum": True,
    "master_on_host": True, "factored_lowrank": True, "follower_update": "recompressed",
    "fetch_concurrency": 8, "checkpoint_every": 50, "checkpoint_async": True, "hash_threads": 8,
    "validator_gpus": 0, "host_threads": 8, "steps_per_window": -1, "miner_checkpointing": True,
}  # fmt: skip
"""The design the "Real sizes" issues describe, as `Design` overrides (`bistro plan --design new`)."""

FOLLOWER_UPDATES = ("union", "recompressed", "merge_set")
SCHEDULES = ("serial", "pipelined")


def design_from(overrides: dict[str, Any], base: Design | None = None) -> Design:
    """A `Design` with fields set from strings or values (`--plan.set FIELD=VALUE`); bad values raise."""
    kinds = {f.name: f.type for f in dataclasses.fields(Design)}
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in kinds:
            raise ValueError(f"plan.{key}: unknown design setting (have: {', '.join(kinds)})")
        kind = kinds[key]
        if isinstance(value, str) and kind != "str":
            if kind == "bool":
                value = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                value = {"int": int, "float": float}[kind](value)
        values[key] = value
    design = dataclasses.replace(base or Design(), **values)
    if design.schedule not in SCHEDULES:
        raise ValueError(f"plan.schedule: must be one of {SCHEDULES}")
    if design.follower_update and design.follower_update not in FOLLOWER_UPDATES:
        raise ValueError(f"plan.follower_update: must be one of {FOLLOWER_UPDATES}")
    return design


def follower_update(settings: Settings, design: Design) -> str:
    """The design's `follower_update`, or the one `mechanism.master_codec` prescribes."""
    if design.follower_update:
        return design.follower_update
    return "recompressed" if settings.mechanism.master_codec == "same" else "union"


def _gemm_ns(rates: Rates, width: int) -> float:
    """ns per FLOP of a CPU matrix product of this inner width, interpolated in log width."""
    pts = sorted(rates.gemm_ns_per_flop)
    if width <= pts[0][0]:
        return pts[0][1]
    for (w0, r0), (w1, r1) in zip(pts, pts[1:], strict=False):
        if width <= w1:
            t = math.log(width / w0) / math.log(w1 / w0)
            return r0 + t * (r1 - r0)
    return pts[-1][1]


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """2 FLOPs per matrix parameter (the input embedding is a lookup) plus causal attention's
    scores and values (2 × 2 × layers × length × hidden, the masked half counted too)."""
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kv = h // cfg.num_heads * cfg.num_kv_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return 2.0 * (n * layer + h * v) + 4.0 * n * cfg.sequence_length * h


def cpu_forward_seconds_per_token(cfg: ModelConfig, rates: Rates) -> float:
    """One thread: each matrix product at its inner width's rate, attention at the head width's,
    plus the element-wise work (~9 h + 3.25 i floats a layer, ~1.5 V for the logits and loss)."""
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kv = h // cfg.num_heads * cfg.num_kv_heads
    ns = n * (2 * (2 * h * h + 2 * h * kv + 2 * h * i) * _gemm_ns(rates, h) + 2 * h * i * _gemm_ns(rates, i))
    ns += 2 * h * v * _gemm_ns(rates, h)
    ns += 4 * n * cfg.sequence_length * h * _gemm_ns(rates, h // cfg.num_heads)
    ns += (n * (9 * h + 3.25 * i) + 1.5 * v) * rates.elementwise_ns
    return ns * 1e-9


def _sequences_per_page(settings: Settings, design: Design) -> float:
    if design.sequences_per_page > 0:
        return design.sequences_per_page
    return max(1.0, settings.mechanism.rows_per_page * design.doc_tokens / settings.model.sequence_length)


def validator_pages(settings: Settings, design: Design, scored: int) -> dict[str, float]:
    """Pages the validator's forwards read in one window, by what they are for (`Evaluator.score`,
    `propose_update`, `own_page_evidence`)."""
    m = settings.mechanism
    per_uid = 3 * 2 * m.eval_pages  # L(θ), L(θ_eval), L(θ_eval − i) on eval + as many control pages
    return {
        "per_scored_uid": per_uid,
        "scored": scored * per_uid,
        "global": 2 * m.global_pages,  # L(θ) and L(θ_eval)
        "master_step": m.global_pages,  # θ + U (θ + U/2 again when refused)
        "copy_evidence": design.copy_group_uids * 2 * 2 * min(m.pages_per_window, EVIDENCE_PAGES),
    }


def _union_entries(settings: Settings, shapes: Shapes, merged: int) -> tuple[int, int]:
    """(sparse union positions, dense positions) of `merged` deltas' update, positions drawn
    independently (overlap only makes it smaller)."""
    sparse_n = sum(math.prod(s) for s in shapes.values() if not _dense(settings, s))
    dense = _n(shapes) - sparse_n
    kept = sum(kept_entries(settings, {k: s}) for k, s in shapes.items() if not _dense(settings, s))
    if merged == 0:
        return 0, 0
    if sparse_n == 0:
        return 0, dense
    frac = 1.0 - (1.0 - kept / sparse_n) ** merged
    return int(sparse_n * frac), dense


def _factored_bytes(settings: Settings, shapes: Shapes) -> int:
    """A lowrank delta held factored: fp32 factors of each matrix, int32 index + fp32 value for the
    sparse rest (other codecs: their decoded size)."""
    m = settings.mechanism
    if m.codec != "lowrank":
        return decoded_bytes(settings, shapes)
    k = TopK().k(codec_context(settings, 0))
    total = 0
    for s in shapes.values():
        if len(s) == 2:
            total += 4 * m.rank * (s[0] + s[1])
        total += 8 * min(math.prod(s), -(-math.prod(s) // m.topk_chunk) * k)
    return total


def master_wire(settings: Settings, shapes: Shapes, wire: int) -> int:
    """Bytes of the publisher's re-compressed update (its own rank and compression,
    `mechanism.master_rank` and `master_compression`), or a miner's `wire` when the master has no
    format of its own (`master_codec sparse`)."""
    from .master import master_format  # master imports the model; the plan is loaded lighter

    fmt = master_format(settings)
    if fmt is None:
        return wire
    miners = dataclasses.replace(
        fmt, rank=settings.mechanism.rank, compression=settings.mechanism.compression
    )
    return wire + fmt.wire_bytes(shapes) - miners.wire_bytes(shapes)


def _split(items: list[Item], on_gpu: Callable[[Item], bool]) -> tuple[int, int]:
    gpu = sum(i.bytes for i in items if on_gpu(i))
    return gpu, sum(i.bytes for i in items) - gpu


def time_plan(settings: Settings, hw: Hardware, link_gbit: float, uids: int = UIDS,
              design: Design | None = None, rates: Rates | None = None) -> dict[str, Any]:  # fmt: skip
    """Seconds, bytes and memory of one window for a validator and a miner on `hw`: the fields
    `make_plan` adds under `--hardware`."""
    design, rates = design or Design(), rates or Rates()
    design = dataclasses.replace(design, follower_update=follower_update(settings, design))
    shapes = model_shapes(settings.model)
    n, m, cfg = _n(shapes), settings.mechanism, settings.model
    link = link_gbit * 1e9 / 8  # bytes a second
    window_s = m.blocks_per_window * BLOCK_SECONDS
    wire = wire_bytes(settings, shapes)
    scored = min(uids, design.scored_uids or m.max_uids_per_window)
    gpus = hw.gpus
    v_gpus = max(1, min(gpus, design.validator_gpus or gpus)) if gpus else 0
    merged = max(0, round(scored * design.merged_fraction))
    if follower_update(settings, design) == "merge_set":
        merged = min(merged, design.merge_peers)
    if m.merge_peers:  # the protocol's merge set
        merged = min(merged, m.merge_peers)
    seq_page = _sequences_per_page(settings, design)
    page_tokens = seq_page * cfg.sequence_length
    threads = design.host_threads or min(max(1, hw.host_cores), USEFUL_HOST_THREADS)
    host_ns = 1e-9 / threads
    hash_s = 4 * n * rates.hash_ns_per_byte * 1e-9 / (design.hash_threads or threads)
    fpt = forward_flops_per_token(cfg)

    def forward_s(tokens: float, n_gpus: int) -> float:
        if not gpus:
            return tokens * cpu_forward_seconds_per_token(cfg, rates)
        return tokens * fpt / (max(1, n_gpus) * hw.peak_flops * hw.mfu_forward)

    def device_bytes_s(nbytes: float, n_gpus: int) -> float:
        return nbytes / (max(1, n_gpus) * hw.hbm_bytes_per_s * hw.bandwidth_efficiency)

    # What reaches followers, and what the publisher writes.
    union_sparse, union_dense = _union_entries(settings, shapes, merged)
    follow = {
        "union": union_sparse * 12 + union_dense * 4,
        "recompressed": master_wire(settings, shapes, wire),
        "merge_set": merged * wire,
    }[follower_update(settings, design)]
    published = follow if follower_update(settings, design) != "merge_set" else 0  # merge_set: a manifest
    checkpoint = 4 * n
    every = design.checkpoint_every or m.checkpoint_every

    # --- validator: fetch, score, publish ---
    pages = validator_pages(settings, design, scored)
    fwd_pages = pages["scored"] + pages["global"] + pages["master_step"] + pages["copy_evidence"]
    fwd_tokens = fwd_pages * page_tokens
    # and a slice of every unsampled upload (`bistro.delta.slices`): its header and slice_fraction
    # of its wire, for the close controls of copies whose source was not drawn
    head = 8 + header_bytes(shapes)
    sliced = max(0, uids - scored) * (head + m.slice_fraction * wire) if m.slice_fraction > 0 else 0.0
    download = scored * wire + sliced
    fetch_io = scored * wire / link
    stream = m.stream_deltas
    v: dict[str, float] = {"fetch": fetch_io, "slices": sliced / link}
    if design.decode_on_device and gpus:
        v["decode_merge"] = device_bytes_s(scored * design.device_bytes_per_param_uid * n, v_gpus)
        if design.factored_lowrank and m.codec == "lowrank":  # θ_eval's low-rank part: one GEMM a matrix
            mat = sum(math.prod(s) for s in shapes.values() if len(s) == 2)
            v["decode_merge"] += 2 * mat * m.rank * scored / (v_gpus * hw.peak_flops * hw.mfu_forward)
        v["merge_update"] = device_bytes_s(merged * 12 * n, v_gpus)
        decodes = 1
    else:  # the code: decode at fetch (+3 re-decodes streaming), the copy screen's sketch, the mean
        # merge's sums and each uid's share and term on the host; the parameter-sized work where the
        # model is: θ_eval's add of the stacked factors, share's Σ |P Qᵀ|, and the leave-one-out's
        # term applied module by module at each forward call (`applied_per_module`)
        decodes = 1 + (3 if stream else 0)
        host_uid = decodes * rates.decode_ns + rates.sketch_ns + rates.merge_sums_ns + rates.share_term_ns
        rank = scored * m.rank if m.codec == "lowrank" else 0
        matrices = sum(math.prod(s) for s in shapes.values() if len(s) == 2)
        calls = math.ceil(2 * m.eval_pages * seq_page / settings.train.eval_batch_size)
        if gpus:  # bytes moved a parameter: leave-one-out per call 32 (clone 8, add 16, copy back 8)
            # on the uid's rank; Σ |P Qᵀ| 16 on rank 0; θ_eval's add 16 a rank of the stack (its block
            # read and written, the product's too) on every rank at once
            host_uid -= rates.abs_sum_ns
            v["device"] = device_bytes_s(scored * 32 * calls * n, v_gpus) + device_bytes_s(
                scored * 16 * n + 16 * rank * matrices, 1
            )
            if v_gpus > 1:  # θ_w, the update and the terms from rank 0 (NCCL over NVLink)
                v["ranks_sync"] = (4 * n + (1 + scored) * wire) / (
                    hw.interconnect_bytes_per_s * hw.bandwidth_efficiency
                )
        else:
            v["device"] = (
                scored * calls * rates.leave_one_out_ns * n + rank * rates.theta_eval_ns * matrices
            ) * 1e-9
        v["decode_merge"] = scored * host_uid * n * host_ns
        v["merge_update"] = merged * n * ((rates.decode_ns if stream else 0) + rates.merge_mean_ns) * host_ns
        v["copy_pairs"] = design.copy_group_uids * n * rates.decode_ns * host_ns if stream else 0.0
    v["forward"] = forward_s(fwd_tokens, v_gpus)
    v["apply_update"] = device_bytes_s(12 * n, 1) if gpus else n * rates.apply_update_ns * 1e-9
    if follower_update(settings, design) == "recompressed":  # the publisher encodes U_w + its residual
        v["recompress"] = device_bytes_s(40 * n, v_gpus) if gpus else n * rates.encode_ns * 1e-9
    v["hash"] = hash_s
    v["publish_update"] = published / link
    ckpt_upload = checkpoint / link
    v["publish_checkpoint"] = 0.0 if design.checkpoint_async else ckpt_upload
    val_s = sum(v.values())

    # --- miner: sync, train, upload ---
    fsdp = gpus > 1
    ck = design.miner_checkpointing or settings.train.activation_checkpointing
    mset = replace(settings, **{"train.fsdp": fsdp, "train.activation_checkpointing": ck,
                                "device": "cuda" if gpus else "cpu"})  # fmt: skip
    steps = design.steps_per_window or settings.train.steps_per_window
    batch_tokens = settings.train.batch_size * cfg.sequence_length * max(1, gpus)
    if gpus:  # 3 × forward FLOPs (4 × with recompute), over the node's GPUs
        step_s = (4 if ck else 3) * fpt * batch_tokens / (gpus * hw.peak_flops * hw.mfu_train)
    else:
        step_s = rates.train_factor * cpu_forward_seconds_per_token(cfg, rates) * batch_tokens
    mi: dict[str, float] = {"sync_download": follow / link}
    if follower_update(settings, design) == "merge_set":
        mi["sync_merge"] = (device_bytes_s(merged * design.device_bytes_per_param_uid * n, gpus) if gpus
                            else merged * n * (rates.decode_ns + rates.merge_mean_ns) * 1e-9)  # fmt: skip
    mi["sync_apply"] = device_bytes_s(12 * n, 1) if gpus else n * rates.apply_update_ns * 1e-9
    mi["sync_hash"] = hash_s
    mi["compress"] = device_bytes_s(40 * n, max(1, gpus)) if gpus else n * rates.encode_ns * 1e-9
    mi["upload"] = wire / link
    overhead = sum(mi.values())
    pipelined = design.schedule == "pipelined"
    room = window_s - overhead - (0.0 if pipelined else val_s)
    fit_steps = max(0, int(room * (design.fill_fraction if steps < 0 else 1.0) / step_s))
    if steps < 0:
        steps = fit_steps
    mi["train"] = steps * step_s
    miner_s = sum(mi.values())
    critical = max(val_s, miner_s) if pipelined else val_s + miner_s

    # --- memory: GPU and host apart ---
    val_gpu, val_host, val_items = _validator_memory(settings, shapes, design, hw, scored, v_gpus)
    m_phases = miner_items(mset, shapes, max(1, gpus))

    def miner_on_gpu(i: Item) -> bool:
        return bool(gpus) and not (design.master_on_host and i.name == "master θ_w")

    miner_gpu = max(_split(items, miner_on_gpu)[0] for items in m_phases.values())
    miner_host = max(_split(items, miner_on_gpu)[1] for items in m_phases.values())
    return {
        "window_seconds": window_s,
        "hardware": dataclasses.asdict(hw),
        "link_gbit": link_gbit,
        "design": dataclasses.asdict(design),
        "rates": dataclasses.asdict(rates),
        "schedule": design.schedule,
        "fits": {
            "validator": val_s <= window_s,
            "miner": miner_s <= window_s,
            "critical_path_seconds": critical,
            "critical_path": critical <= window_s,
            "validator_gpu_memory": not gpus or val_gpu <= hw.gpu_bytes,
            "miner_gpu_memory": not gpus or miner_gpu <= hw.gpu_bytes,
            "validator_host_memory": val_host <= hw.host_bytes,
            "fetch_deadline": design.fetch_concurrency > 0 or fetch_io <= m.fetch_seconds,
        },
        "validator_time": {
            "seconds_per_window": val_s,
            "breakdown_s": v,
            "decodes_per_delta": decodes,
            "scored_uids_per_window": scored,
            "merged_uids": merged,
            "rotation_windows": -(-uids // max(1, scored)),
            "gpus": v_gpus,
            "peak_bytes_per_gpu": val_gpu,
            "peak_host_bytes": val_host,
            "memory": val_items,
            "download_per_window_bytes": download,
            "slice_download_per_window_bytes": sliced,
            "forward": {
                "pages": pages,
                "sequences_per_page": seq_page,
                "tokens_per_page": page_tokens,
                "tokens": fwd_tokens,
                "flops_per_token": fpt,
                "flops": fwd_tokens * fpt,
            },  # fmt: skip
        },
        "miner_time": {
            "seconds_per_window": miner_s,
            "breakdown_s": mi,
            "steps_per_window": steps,
            "steps_that_fit": fit_steps,
            "step_seconds": step_s,
            "tokens_per_step": batch_tokens,
            "train_fraction": mi["train"] / window_s,
            "peak_bytes_per_gpu": miner_gpu,
            "peak_host_bytes": miner_host,
            "fsdp_ranks": max(1, gpus),
            "activation_checkpointing": ck,
            "download_per_window_bytes": follow,
            "upload_per_window_bytes": wire,
        },
        "publisher": {
            "upload_per_window_bytes": published + checkpoint / every,
            "update_bytes": published,
            "checkpoint_bytes": checkpoint,
            "checkpoint_every": every,
            "checkpoint_upload_seconds": ckpt_upload,
            "disk_per_1000_windows_bytes": WINDOWS * published + WINDOWS // every * checkpoint,
            "disk_retained_bytes": design.checkpoint_retention * (checkpoint + every * published),
            "hash_seconds": hash_s,
        },
    }


def _validator_memory(settings: Settings, shapes: Shapes, design: Design, hw: Hardware, scored: int,
                      v_gpus: int) -> tuple[int, int, dict[str, Any]]:  # fmt: skip
    """(peak GPU bytes per GPU, peak host bytes, items by where they live) of the validator."""
    n = _n(shapes)
    m = settings.mechanism
    if not (design.decode_on_device or design.weight_sum or design.factored_lowrank):
        phases = validator_items(replace(settings, device="cuda" if hw.gpus else "cpu"), shapes, scored)
        on_gpu_names = ("θ_eval (the model)", "master θ_w", "activations", "leave-one-out clone")

        def on_gpu(i: Item) -> bool:
            if not hw.gpus or (design.master_on_host and i.name == "master θ_w"):
                return False
            return i.name in on_gpu_names

        if design.checkpoint_async:  # the publisher's checkpoint, uploading while the window runs
            copy = Item("checkpoint copy", 4 * n, "CheckpointUpload: θ_{w+1} on the host (publisher)")
            phases = {p: [*items, copy] for p, items in phases.items()}
        gpu = max(_split(items, on_gpu)[0] for items in phases.values())
        host = max(_split(items, on_gpu)[1] for items in phases.values())
        where = {p: [{**i.__dict__, "gpu": on_gpu(i)} for i in items] for p, items in phases.items()}
        return gpu, host, where
    act = activation_bytes(settings.model, settings.train.eval_batch_size, cuda=bool(hw.gpus),
                           checkpointing=False, train=False)  # fmt: skip
    per_gpu = -(-scored // max(1, v_gpus))
    factored = design.factored_lowrank
    held = per_gpu * _factored_bytes(settings, shapes) if factored else 2 * decoded_bytes(settings, shapes)
    gpu_items = [Item("θ_eval (the model)", 4 * n, "each scoring GPU"),
                 Item("activations", act, "one eval_batch_size forward")]  # fmt: skip
    host_items = [Item("downloaded blobs", scored * wire_bytes(settings, shapes), "fetched this window")]
    if design.weight_sum:
        gpu_items.append(Item("weight sum", 2 * n, "16-bit Σ w per position, for the leave-one-out"))
    else:
        union_sparse, union_dense = _union_entries(settings, shapes, scored)
        host_items.append(
            Item("mean-merge sums", 16 * union_dense + 20 * union_sparse, "MeanMerge's union tensors")
        )
    decoded = Item("decoded deltas", held, "this GPU's uids, decoded once" if factored
                   else "two at a time, decoded again at each use")  # fmt: skip
    (gpu_items if design.decode_on_device else host_items).append(decoded)
    if factored and m.codec == "lowrank":
        largest = max((s[0] + s[1] for s in shapes.values() if len(s) == 2), default=0)
        gpu_items.append(
            Item("factor workspace", 4 * largest * m.rank * scored, "P̃, Q̃ of the largest matrix")
        )
    (host_items if design.master_on_host else gpu_items).append(Item("master θ_w", 4 * n, "Node.master"))
    host_items.append(Item("merged update", 4 * n, "the merge before re-compression, dense fp32"))
    if not hw.gpus:
        host_items, gpu_items = host_items + gpu_items, []
    gpu = sum(i.bytes for i in gpu_items)
    host = sum(i.bytes for i in host_items)
    return gpu, host, {"gpu": [i.__dict__ for i in gpu_items], "host": [i.__dict__ for i in host_items]}


# --- measuring ------------------------------------------------------------------------------------


def measure_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes, result) of the CPU tensor allocations `fn` makes, counted by torch's profiler.

    Every allocation and free of torch's CPU allocator is an event; their running sum in time order
    is the live tensor memory, its maximum the peak. Tensors that exist before `fn` runs are not
    counted (build what you measure inside `fn`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak, result


# --- printing -------------------------------------------------------------------------------------


def _size(b: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def print_plan(plan: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"bistro plan: {plan['preset']}, {plan['parameters'] / 1e6:,.1f}M parameters, miner on "
             f"{plan['nproc']} rank(s){' (FSDP2)' if plan['fsdp'] else ''}, {plan['device']}")  # fmt: skip
    table = Table(title=title)
    for col in ("", "miner", "validator"):
        table.add_column(col, justify="left" if not col else "right")
    mi, va = plan["miner"], plan["validator"]
    rows = [
        ("parameters", f"{mi['parameters']:,}", f"{va['parameters']:,}"),
        ("bytes per parameter held", f"{mi['bytes_per_param']:.1f}", f"{va['bytes_per_param']:.2f}"),
        ("peak memory per rank", f"{_size(mi['peak_bytes_per_rank'])} ({mi['peak_phase']})",
         f"{_size(va['peak_bytes_per_rank'])} ({va['peak_phase']})"),
        ("delta on the wire", f"{_size(plan['delta_wire_bytes'])} ({plan['delta_ratio']:.0f}x)", ""),
        (f"per window at {plan['uids']} uids", f"up {_size(mi['upload_per_window_bytes'])}",
         f"down {_size(va['download_per_window_bytes'])}"),
        ("written per 1,000 windows", _size(mi["disk_per_1000_windows_bytes"]),
         _size(va["disk_per_1000_windows_bytes"])),
        ("disk held at once", _size(mi["disk_retained_bytes"]), _size(va["disk_retained_bytes"])),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for role in ("miner", "validator"):
        phase = plan[role]["peak_phase"]
        items = plan[role]["items"][phase]
        console.print(
            f"{role} at its peak ({phase}): " + ", ".join(f"{i['name']} {_size(i['bytes'])}" for i in items)
        )


def load_rates(path: str) -> Rates:
    """`Rates` from a `bistro bench scale --json` file (its `rates`, at top level or under the suite)."""
    doc = json.loads(open(path).read())
    found = doc.get("rates") or doc.get("suites", {}).get("scale", {}).get("rates")
    if not isinstance(found, dict):
        raise ValueError(f"{path}: no `rates` object (write one with `bistro bench scale --json FILE`)")
    kinds = {f.name for f in dataclasses.fields(Rates)}
    found = {k: v for k, v in found.items() if k in kinds}
    if "gemm_ns_per_flop" in found:
        found["gemm_ns_per_flop"] = tuple(tuple(x) for x in found["gemm_ns_per_flop"])
    return Rates(**found)


def design_args(args: argparse.Namespace) -> Design:
    """The `Design` of `--design current|new`, `--schedule` and `--plan.set FIELD=VALUE` flags."""
    base = design_from(NEW_DESIGN) if getattr(args, "design", "current") == "new" else Design()
    overrides = dict(getattr(args, "plan_set", None) or {})
    if getattr(args, "schedule", None):
        overrides["schedule"] = args.schedule
    return design_from(overrides, base)


def print_time(plan: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    va, mi, pu, fits = plan["validator"], plan["miner"], plan["publisher"], plan["fits"]
    hw = plan["hardware"]
    console.print(f"{hw['name']} ({hw['source']}), link {plan['link_gbit']:g} Gbit/s, window "
                  f"{plan['window_seconds']:.0f} s, schedule {plan['schedule']}")  # fmt: skip
    table = Table(title="one window")
    for col in ("", "validator", "miner"):
        table.add_column(col, justify="left" if not col else "right")
    yes = lambda ok: "fits" if ok else "DOES NOT FIT"  # noqa: E731
    rows = [
        ("seconds per window", f"{va['seconds_per_window']:,.1f} ({yes(fits['validator'])})",
         f"{mi['seconds_per_window']:,.1f} ({yes(fits['miner'])})"),
        ("critical path", f"{fits['critical_path_seconds']:,.1f} s ({yes(fits['critical_path'])})", ""),
        ("peak memory per GPU", _size(va["peak_bytes_per_gpu"]), _size(mi["peak_bytes_per_gpu"])),
        ("peak host memory", _size(va["peak_host_bytes"]), _size(mi["peak_host_bytes"])),
        ("download per window", _size(va["download_per_window_bytes"]), _size(mi["download_per_window_bytes"])),
        ("scored uids / rotation", f"{va['scored_uids_per_window']} / {va['rotation_windows']} windows", ""),
        ("train fraction / steps", "", f"{mi['train_fraction']:.2f} / {mi['steps_per_window']} "
                                       f"(fit {mi['steps_that_fit']})"),
        ("publisher up per window", _size(pu["upload_per_window_bytes"]), ""),
        ("publisher disk per 1,000 windows", _size(pu["disk_per_1000_windows_bytes"]), ""),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for role in ("validator", "miner"):
        parts = ", ".join(f"{k} {v:,.1f}s" for k, v in plan["breakdown"][role].items())
        console.print(f"{role}: {parts}")
    fwd = va["forward"]
    console.print(f"forward: {sum(fwd['pages'].values()) - fwd['pages']['per_scored_uid']:,.0f} pages "
                  f"({fwd['pages']['per_scored_uid']} a scored uid) of {fwd['tokens_per_page']:,.0f} tokens, "
                  f"{fwd['flops'] / 1e12:,.1f} TFLOP")  # fmt: skip


def main(settings: Settings, args: argparse.Namespace) -> int:
    hardware = getattr(args, "hardware", None)
    rates = load_rates(args.rates) if getattr(args, "rates", None) else None
    try:
        design = design_args(args)
    except ValueError as e:
        print(f"bistro plan: {e}")
        return 2
    plan = make_plan(settings, nproc=args.nproc, uids=args.uids, hardware=hardware,
                     link_gbit=getattr(args, "link_gbit", 1.0), design=design, rates=rates)  # fmt: skip
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        print_plan(plan)
        if hardware:
            print_time(plan)
    return 0
