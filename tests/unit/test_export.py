"""`bistro export`: the master from the publisher's bucket (signatures and hashes checked) or a local
checkpoint, as a directory that `transformers` loads and generates from, with our model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bistro.cli import main as cli
from bistro.data import Dataset
from bistro.export import ExportError, from_bucket
from bistro.master import Publisher, apply_update
from bistro.model import build_model, model_hash, state_tensors
from tests.support.reliability_kit import initial_params, make_world

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?"


def perturbed(params: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in params.items()}


def flags(world) -> list[str]:
    s = world.settings
    return [
        "--subtensor.network", "embedded", "--subtensor.chain_endpoint", s.chain.chain_endpoint,
        "--storage.root", s.storage.root, "--dir", str(world.dir / "exporter"),
    ]  # fmt: skip


def our_logits(settings, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = build_model(settings.model)
    with torch.no_grad():
        for k, p in state_tensors(model).items():
            p.copy_(params[k])
    model.eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def publish_two_windows(world, signer: str = "top") -> dict[str, torch.Tensor]:
    """θ_1 (a checkpoint that is not the init) and update-1 (dense, changes every weight): θ_2."""
    theta = initial_params(world.settings)
    theta = {
        k: v + d for k, v, d in zip(theta, theta.values(), perturbed(theta, 1, 0.02).values(), strict=True)
    }
    pub = Publisher(world.store("top"), world.members[signer].keypair, world.settings.chain.netuid)
    first = model_hash(theta)
    pub.checkpoint(1, theta, first)
    update = perturbed(theta, 2, 0.01)
    apply_update(theta, update)
    pub.update(1, update, first, model_hash(theta))
    pub.latest(2, model_hash(theta), [1])
    return theta


def check_loads_and_matches(out, settings, theta: dict[str, torch.Tensor]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    ours = Dataset.open(settings).tokenizer
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.encode_batch([TEXT])[0]  # the same tokens as every node uses
    assert tokenizer.eos_token_id == ours.eos_id == 0
    assert tokenizer.decode(ids[0]) == TEXT
    with torch.inference_mode():
        theirs = model(input_ids=ids).logits
    assert torch.allclose(theirs, our_logits(settings, theta, ids), atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generated.shape == (1, ids.shape[1] + 12)
    assert generated[0, : ids.shape[1]].tolist() == ids[0].tolist()
    assert isinstance(tokenizer.decode(generated[0, ids.shape[1] :]), str)


def test_export_from_the_publishers_bucket(tmp_path, capsys):
    world = make_world(tmp_path, [], publish=False)
    theta = publish_two_windows(world)
    out = tmp_path / "model"
    assert cli(["export", "--out", str(out), *flags(world)]) == 0
    assert "exported θ_2" in capsys.readouterr().out
    info = json.loads((out / "bistro.json").read_text())
    assert info["window"] == 2 and info["hash"] == model_hash(theta) and info["source"] == "bucket"
    assert info["corpus"]["name"] == "shakespeare"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    check_loads_and_matches(out, world.settings, theta)


def test_export_of_an_older_window_replays_nothing_past_it(tmp_path):
    world = make_world(tmp_path, [], publish=False)
    publish_two_windows(world)
    out = tmp_path / "model"
    assert cli(["export", "--out", str(out), "--window", "1", *flags(world)]) == 0
    assert json.loads((out / "bistro.json").read_text())["window"] == 1
    assert cli(["export", "--out", str(tmp_path / "m9"), "--window", "9", *flags(world)]) == 1


def test_export_refuses_a_master_the_top_validator_did_not_sign(tmp_path):
    world = make_world(tmp_path, [], publish=False)
    publish_two_windows(world, signer="val")  # in top's bucket, but signed by another hotkey
    out = tmp_path / "model"
    assert cli(["export", "--out", str(out), *flags(world)]) == 1
    assert not out.exists()
    with pytest.raises(ExportError, match="not signed by the top validator"):
        from_bucket(world.settings)


def test_export_refuses_a_master_whose_hash_does_not_check(tmp_path):
    world = make_world(tmp_path, [], publish=False)
    theta = initial_params(world.settings)
    pub = Publisher(world.store("top"), world.members["top"].keypair, world.settings.chain.netuid)
    pub.checkpoint(1, theta, "0" * 64)  # signed, but the hash is not θ's
    pub.latest(1, "0" * 64, [1])
    with pytest.raises(ExportError, match="hash mismatch"):
        from_bucket(world.settings)


def test_export_from_a_local_checkpoint(tmp_path):
    world = make_world(tmp_path, [], publish=False)
    theta = initial_params(world.settings)
    theta = {
        k: v + d for k, v, d in zip(theta, theta.values(), perturbed(theta, 3, 0.02).values(), strict=True)
    }
    save_file(theta, tmp_path / "master-7.safetensors")
    out = tmp_path / "model"
    assert (
        cli(
            [
                "export",
                "--out",
                str(out),
                "--checkpoint",
                str(tmp_path / "master-7.safetensors"),
                *flags(world),
            ]
        )
        == 0
    )
    check_loads_and_matches(out, world.settings, theta)
    # a file that is not this model's is refused by name, not loaded half-way
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")
    assert (
        cli(
            [
                "export",
                "--out",
                str(tmp_path / "m2"),
                "--checkpoint",
                str(tmp_path / "other.safetensors"),
                *flags(world),
            ]
        )
        == 1
    )
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04 not safetensors")
    assert (
        cli(
            [
                "export",
                "--out",
                str(tmp_path / "m3"),
                "--checkpoint",
                str(tmp_path / "junk.safetensors"),
                *flags(world),
            ]
        )
        == 1
    )
