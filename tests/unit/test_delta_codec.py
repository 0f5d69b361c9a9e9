"""Codecs: round trips, ratios, the shared mask, 12-bit packing, error feedback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from bistro.config import build_settings
from bistro.delta import CODECS, BadTensors, CodecContext, ErrorFeedback, Sparse, compress, to_dense
from bistro.delta.codec import mask_positions, pack12, unpack12
from bistro.model import llama_config

CTX = CodecContext(netuid=212, window=7, compression=100.0)


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    model = transformers.LlamaForCausalLM(llama_config(build_settings("tiny").model))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def random_delta(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in shapes.items()}


SMALL = {"w": (300, 50), "b": (7,), "c": (3 * 4096 + 5,)}


def test_dense_round_trip_is_bf16() -> None:
    delta = random_delta(SMALL)
    decoded = CODECS["dense"].decode(CODECS["dense"].encode(delta, CTX), CTX, SMALL)
    for name, t in delta.items():
        assert decoded[name].dtype == torch.float32
        assert torch.equal(decoded[name], t.bfloat16().float())


def test_mask_round_trip_keeps_exact_values_at_shared_positions() -> None:
    ctx = CodecContext(212, 7, 300.0)
    delta = random_delta(SMALL)
    decoded = CODECS["mask"].decode(CODECS["mask"].encode(delta, ctx), ctx, SMALL)
    for name, t in delta.items():
        part = decoded[name]
        assert isinstance(part, Sparse)
        n = t.numel()
        assert part.indices.numel() == max(1, round(n / 300))
        assert torch.equal(part.indices, part.indices.unique())  # sorted and unique
        assert torch.equal(part.values, t.reshape(-1)[part.indices])


@pytest.mark.slow
def test_mask_is_the_same_in_another_process_and_changes_with_the_window() -> None:
    here = mask_positions(212, 7, "w", 15000, 50).tolist()
    code = "from bistro.delta.codec import mask_positions; print(mask_positions(212, 7, 'w', 15000, 50).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(there) == here  # noqa: S307 - a list of ints printed by our own subprocess
    assert mask_positions(212, 8, "w", 15000, 50).tolist() != here
    assert mask_positions(212, 7, "v", 15000, 50).tolist() != here


def test_topk_keeps_the_largest_per_chunk_within_quantisation() -> None:
    delta = random_delta(SMALL, seed=1)
    codec, k = CODECS["topk"], 41  # round(4096 / 100)
    decoded = codec.decode(codec.encode(delta, CTX), CTX, SMALL)
    for name, t in delta.items():
        part, flat = decoded[name], t.reshape(-1)
        assert isinstance(part, Sparse)
        assert torch.equal(part.indices, part.indices.unique())
        assert int(part.indices.max()) < flat.numel()
        for start in range(0, flat.numel(), 4096):
            chunk = flat[start : start + 4096]
            want = chunk.abs().topk(min(k, chunk.numel())).indices.sort().values + start
            got = part.indices[(part.indices >= start) & (part.indices < start + 4096)]
            assert torch.equal(got, want)
            scale = chunk.abs().max() / 127
            err = (part.values - flat[part.indices]).abs()[
                (part.indices >= start) & (part.indices < start + 4096)
            ]
            assert float(err.max()) <= float(scale) * 0.5 + 1e-12


def test_topk_large_chunks_use_int32_indices() -> None:
    ctx = CodecContext(212, 7, 100.0, chunk=8192)
    delta = random_delta(SMALL, seed=2)
    wire = CODECS["topk"].encode(delta, ctx)
    assert wire["w.idx"].dtype == torch.int32
    decoded = CODECS["topk"].decode(wire, ctx, SMALL)
    assert decoded["w"].indices.numel() == 82 * 2  # two chunks of 8192, k = 82 each (15000 entries)


def test_pack12_round_trip() -> None:
    values = torch.arange(4096)
    assert torch.equal(unpack12(pack12(values), 4096), values)
    odd = torch.tensor([4095, 0, 17])
    packed = pack12(odd)
    assert packed.dtype == torch.uint8 and packed.numel() == 6
    assert torch.equal(unpack12(packed, 3), odd)
    packed[-1] = 1  # the pad nibble of the fourth (missing) index
    with pytest.raises(BadTensors):
        unpack12(packed, 3)


def test_topk_decode_refuses_non_canonical_indices() -> None:
    wire = CODECS["topk"].encode(random_delta(SMALL), CTX)
    local = unpack12(wire["w.idx"], 4 * 41).view(4, 41)
    local[0, 1] = local[0, 0]  # a duplicate position
    wire["w.idx"] = pack12(local)
    with pytest.raises(BadTensors, match="strictly increasing"):
        CODECS["topk"].decode(wire, CTX, SMALL)


def test_decode_refuses_wrong_names_shapes_and_dtypes() -> None:
    for codec in CODECS.values():
        wire = codec.encode(random_delta(SMALL), CTX)
        name = sorted(wire)[0]
        for bad in (
            {**wire, name: wire[name].double() if wire[name].is_floating_point() else wire[name].int()},
            {**wire, name: wire[name][:-1]},
            {k: v for k, v in wire.items() if k != name},
            {**wire, "extra": torch.zeros(1)},
        ):
            with pytest.raises(BadTensors):
                codec.decode(bad, CTX, SMALL)


def test_ratios_at_the_defaults(shapes: dict[str, tuple[int, ...]]) -> None:
    topk = CODECS["topk"].ratio(shapes, CodecContext(212, 7, 100.0))
    mask = CODECS["mask"].ratio(shapes, CodecContext(212, 7, 300.0))
    dense = CODECS["dense"].ratio(shapes, CTX)
    assert 140 <= topk <= 170, topk  # DESIGN: about 160x at 1%
    assert 297 <= mask <= 301, mask
    assert dense == 2.0
    # the promise matches what encode really produces
    for name, codec in CODECS.items():
        ctx = CodecContext(212, 7, 300.0 if name == "mask" else 100.0)
        wire = codec.encode(random_delta(shapes), ctx)
        spec = codec.wire_spec(shapes, ctx)
        assert {n: (tuple(t.shape), t.dtype) for n, t in wire.items()} == spec


def test_error_feedback_sends_everything_eventually() -> None:
    shapes = SMALL
    for name in ("topk", "mask"):
        codec, ef = CODECS[name], ErrorFeedback()
        total_true = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        total_sent = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        for window in range(5):
            ctx = CodecContext(212, window, 100.0)
            delta = random_delta(shapes, seed=window)
            wire = compress(delta, codec, ctx, ef)
            sent = to_dense(codec.decode(wire, ctx, shapes), shapes)
            for n in shapes:
                total_true[n] += delta[n].double()
                total_sent[n] += sent[n].double()
        for n in shapes:
            assert torch.allclose(total_sent[n] + ef.residual[n].double(), total_true[n], atol=1e-6), n
        assert any(float(r.abs().max()) > 0 for r in ef.residual.values())  # something was held back


def test_error_feedback_persists_through_safetensors(tmp_path) -> None:
    ef = ErrorFeedback()
    compress(random_delta(SMALL), CODECS["topk"], CTX, ef)
    path = tmp_path / "ef.safetensors"
    safetensors.torch.save_file(ef.to_tensors(), path)
    back = ErrorFeedback.from_tensors(safetensors.torch.load_file(path))
    assert set(back.residual) == set(SMALL)
    assert all(torch.equal(back.residual[n], ef.residual[n]) for n in SMALL)
    with pytest.raises(ValueError):
        ErrorFeedback.from_tensors({"w": torch.zeros(1)})
