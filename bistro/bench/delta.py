"""`bistro bench delta`: what a delta costs on the wire and in the validator, per codec and model size.

For the `tiny`, `small` and `150M` shapes (150M skipped with --quick), per codec (`topk` at the
settings' compression, `mask` at 300x, `dense`), through the production code paths:
- encode: `compress` (with error feedback for topk) + `encode_delta` (hash, sign, serialise);
  baseline: safetensors.save of the dense fp32 delta, the plainest way to ship it;
- decode: `decode_delta` (every check, then decode); baseline: safetensors.load of that dense blob;
- apply: `apply_(-m)` + `restore_` (the validator's remove and put back for one uid); baseline: one
  forward pass of the same model on one training batch, the thing a validator does per uid anyway.
Bytes on the wire are the real blob lengths (header and signature included); `ratio` is dense fp32
bytes over them. Target: applying a mask 300x delta costs far below a forward pass (< 5%).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import bittensor_core
import safetensors.torch
import torch
import transformers

from ..config import Settings, build_settings
from ..delta import (
    CODECS,
    CodecContext,
    ErrorFeedback,
    Expectation,
    apply_,
    compress,
    decode_delta,
    encode_delta,
    restore_,
)
from ..model import llama_config

MASTER = "00" * 32
APPLY_TARGET = 0.05


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(name: str, value: float, unit: str, baseline: float | None = None, target: str | None = None,
         ok: bool | None = None) -> dict[str, Any]:  # fmt: skip
    ratio = None if baseline in (None, 0) else value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            "ok": ok}  # fmt: skip


def _forward_s(model: torch.nn.Module, preset: Settings, repeats: int) -> float:
    tokens = torch.randint(preset.model.vocab_size, (preset.train.batch_size, preset.model.sequence_length))
    with torch.no_grad():
        return _median_s(lambda: model(input_ids=tokens), repeats)


def _codec_ctx(name: str, settings: Settings) -> CodecContext:
    compression = 300.0 if name == "mask" else settings.mechanism.compression
    return CodecContext(settings.chain.netuid, 1, compression, settings.mechanism.topk_chunk)


def _one_codec(name: str, params: dict, delta: dict, settings: Settings, repeats: int) -> dict[str, float]:
    codec, ctx = CODECS[name], _codec_ctx(name, settings)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    keypair = bittensor_core.Keypair.create_from_uri("//Alice")

    def encode() -> bytes:
        wire = compress(delta, codec, ctx, ErrorFeedback() if name == "topk" else None)
        return encode_delta(wire, keypair=keypair, netuid=ctx.netuid, uid=0, window=ctx.window, codec=name,
                            codec_params=codec.params(ctx), master_window=0, master_hash=MASTER)  # fmt: skip

    blob = encode()
    exp = Expectation(ctx.netuid, ctx.window, keypair.ss58_address, MASTER, name, ctx, shapes,
                      max_bytes=len(blob), max_norm=float("inf"))  # fmt: skip
    decoded = decode_delta(blob, exp).delta

    def remove_and_restore() -> None:
        restore_(params, apply_(params, decoded, -0.25))

    return {
        "encode_s": _median_s(encode, repeats),
        "decode_s": _median_s(lambda: decode_delta(blob, exp), repeats),
        "apply_s": _median_s(remove_and_restore, repeats),
        "wire_bytes": len(blob),
        "ratio": 4 * sum(p.numel() for p in params.values()) / len(blob),
        "promised_ratio": codec.ratio(shapes, ctx),
    }


def _one_shape(preset_name: str, settings: Settings, repeats: int) -> dict[str, Any]:
    preset = build_settings(preset_name)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(preset.model)).eval()
    params = {n: p for n, p in model.named_parameters()}
    delta = {n: torch.randn_like(p) * 1e-3 for n, p in params.items()}
    dense_blob = safetensors.torch.save(delta)
    out: dict[str, Any] = {
        "parameters": sum(p.numel() for p in params.values()),
        "dense_save_s": _median_s(lambda: safetensors.torch.save(delta), repeats),
        "dense_load_s": _median_s(lambda: safetensors.torch.load(dense_blob), repeats),
        "forward_s": _forward_s(model, preset, max(1, repeats - 1)),
    }
    for name in CODECS:
        out[name] = _one_codec(name, params, delta, settings, repeats)
    return out


def _rows(shape: str, fig: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in CODECS:
        c = fig[name]
        label = f"{shape} {name}" + (" 300x" if name == "mask" else "")
        rows += [
            _row(f"{label} encode", c["encode_s"] * 1e3, "ms", fig["dense_save_s"] * 1e3),
            _row(f"{label} decode+validate", c["decode_s"] * 1e3, "ms", fig["dense_load_s"] * 1e3),
            _row(f"{label} remove+restore", c["apply_s"] * 1e3, "ms", fig["forward_s"] * 1e3),
            _row(f"{label} wire", c["wire_bytes"] / 2**20, "MiB"),
            _row(
                f"{label} ratio",
                c["ratio"],
                "x",
                target="~160" if name == "topk" else None,
                ok=(140 <= c["ratio"] <= 170) if name == "topk" else None,
            ),  # fmt: skip
        ]
    share = fig["mask"]["apply_s"] / fig["forward_s"]
    rows.append(_row(f"{shape} mask 300x apply / forward", share, "x", target=f"< {APPLY_TARGET}",
                     ok=share < APPLY_TARGET))  # fmt: skip
    return rows


def run(settings: Settings, *, quick: bool) -> dict:
    shapes = ("tiny", "small") if quick else ("tiny", "small", "150M")
    repeats = 3 if quick else 5
    figures = {shape: _one_shape(shape, settings, repeats) for shape in shapes}
    rows = [row for shape, fig in figures.items() for row in _rows(shape, fig)]
    biggest = figures[shapes[-1]]
    return {
        "rows": rows,
        "headline": {
            "delta_topk_ratio": biggest["topk"]["ratio"],
            "delta_mask_apply_over_forward": biggest["mask"]["apply_s"] / biggest["forward_s"],
        },
        "figures": figures,
        "repeats": repeats,
    }
