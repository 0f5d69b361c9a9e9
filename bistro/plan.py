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
(`tests/test_plan.py` checks whole-plan peaks of `tiny` and `small` against measurement).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig, Settings
from .delta.codec import CODECS, TopK, codec_context

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
    """Whether a decoded delta holds this parameter dense (dense; lowrank's 2-D parts)."""
    codec = settings.mechanism.codec
    return codec == "dense" or (codec == "lowrank" and len(shape) == 2)


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
    """Bytes of one decoded delta: 4 an entry of a dense part, 12 (int64 index, fp32 value) a sparse one."""
    return sum((4 if _dense(settings, s) else 12) * kept_entries(settings, {n: s}) for n, s in shapes.items())


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
        Item("downloaded blobs", uids * wire_bytes(settings, shapes), "gather() results (stream_deltas: Verdict.source)"),
        Item("sketches", uids * 8 * (1 << 16), "drop_copies"),
    ]  # fmt: skip
    update = Item("merged update", union * 12 + dense * 4, "union of positions and values; dense parts")
    if m.merge != "mean":  # `merge`: one fp32 sum and a held-position flag per parameter
        sums = Item("merge inputs", 5 * n, "merge: Σ w Δ and positions held, dense per parameter")
        return {"score": [*state, Item("activations", act, "one eval_batch_size forward (inference mode)")],
                "merge": [*state, sums, update]}  # fmt: skip
    # `mean_sums`, one pass delta by delta: a Mixed part's parameter (lowrank's matrices) keeps
    # three fp32 sums (dense parts, sparse values, their weights), a sparse one two and a bool.
    accumulators = 12 * dense + 9 * (n - dense)
    mean_merge = Item("mean-merge sums", 16 * dense + 20 * union,
                      "MeanMerge: TwoMeans' three sums and the update; Σ w c v, Σ w, the update at the union")  # fmt: skip
    score = [*state, mean_merge, Item("activations", act, "one eval_batch_size forward (inference mode)")]
    build = [
        *state,
        Item("mean-merge accumulators", accumulators, "mean_sums while MeanMerge reads the deltas"),
    ]
    merge = [
        *state,
        Item("merge inputs", accumulators, "mean_sums of merge_mean: dense fp32 per parameter"),
        update,
    ]
    return {"score": score, "theta_eval": build, "merge": merge}


def _peak(phases: dict[str, list[Item]]) -> tuple[int, str]:
    phase = max(phases, key=lambda p: sum(i.bytes for i in phases[p]))
    return sum(i.bytes for i in phases[phase]), phase


def make_plan(settings: Settings, nproc: int = 1, uids: int = UIDS) -> dict[str, Any]:
    """The whole plan as JSON-able data (`bistro plan --json` prints exactly this)."""
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


def main(settings: Settings, args: argparse.Namespace) -> int:
    plan = make_plan(settings, nproc=args.nproc, uids=args.uids)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan)
    return 0
