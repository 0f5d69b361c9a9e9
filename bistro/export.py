"""`bistro export`: the master as a Hugging Face `transformers` model directory.

    bistro export --out DIR                      θ of the newest window, from the publisher's bucket
    bistro export --out DIR --window W           θ_W (its checkpoint, then updates, as a node catches up)
    bistro export --out DIR --checkpoint FILE    θ in a local safetensors file (a validator's state)
    bistro export --out DIR --push-to-hub REPO   then upload DIR to the Hugging Face Hub

From a bucket the master is followed like any node follows it (`master.Follower`): the publisher
is the chain's top-stake validator, every object must carry its signature, and the result must
hash to what LATEST.json and the updates sign. DIR then holds what `save_pretrained` writes (the
config, `model.safetensors`, the generation config), the tokenizer wrapped as a
`PreTrainedTokenizerFast` (`tokenizer.json`, its config), and `bistro.json` naming the window,
the hash and the corpus it was trained on; `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Settings
from .data.tokenizer import EOS, Tok
from .master import Follower, MasterError, Position, load_params
from .model import build_model, model_hash, state_tensors

log = logging.getLogger("bistro.export")

SAMPLE_PROMPT = "ROMEO:\n"
"""What the localnet's sample generation starts from (the embedded corpus is Shakespeare)."""


class ExportError(Exception):
    """No master to export: none published, a bad signature or hash, or an unreadable checkpoint."""


@dataclass(frozen=True)
class Exported:
    """What was written where."""

    dir: Path
    window: int | None
    hash: str


def hf_tokenizer(tok: Tok, max_length: int):
    """Our `tokenizers` BPE as a `PreTrainedTokenizerFast` (EOS doubles as padding: no pad token)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok.tokenizer,
        model_max_length=max_length,
        eos_token=tok.tokenizer.id_to_token(tok.eos_id) or EOS,
        pad_token=tok.tokenizer.id_to_token(tok.eos_id) or EOS,
        clean_up_tokenization_spaces=False,
    )


def save_model(
    settings: Settings, params: dict[str, torch.Tensor], tok: Tok, out: Path, info: dict
) -> Exported:
    """Write θ (`params`, by `state_tensors` name) and the tokenizer to `out` with `save_pretrained`."""
    _quiet()
    model = build_model(settings.model, seed=settings.model.seed)
    load_params(state_tensors(model), {k: v.detach().cpu().float() for k, v in params.items()})
    digest = model_hash(model)
    model.config.use_cache = True  # we built it for training; generation wants the KV cache
    model.generation_config.eos_token_id = tok.eos_id
    model.generation_config.pad_token_id = tok.eos_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(tok, settings.model.sequence_length).save_pretrained(out)
    meta = {"format": "bistro-export/1", "preset": settings.preset, "hash": digest, **info}
    (out / "bistro.json").write_text(json.dumps(meta, indent=2))
    log.info("exported θ %s to %s", digest[:12], out)
    return Exported(out, info.get("window"), digest)


def _quiet() -> None:
    """No progress bars from transformers (a localnet's summary and a CLI line are what we print)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def sample(out: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 48, seed: int = 0) -> str:
    """Load an exported directory the way its users will (`Auto*.from_pretrained`) and generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=40)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


# --- where θ comes from ------------------------------------------------------------------------------


def from_checkpoint(settings: Settings, path: Path) -> dict[str, torch.Tensor]:
    """θ from a local safetensors file (tensors only: nothing is unpickled); names and shapes must
    be the model's."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: not a safetensors checkpoint ({e})") from None
    params = {k: v.detach().clone() for k, v in state_tensors(build_model(settings.model)).items()}
    try:
        load_params(params, tensors)
    except MasterError as e:
        raise ExportError(f"{path}: {e}") from None
    return params


def from_bucket(settings: Settings, window: int | None = None) -> tuple[dict[str, torch.Tensor], Position]:
    """θ_window (default: the newest) from the top validator's bucket, signatures and hashes checked."""
    from .chain import open_chain
    from .storage import open_store

    chain = open_chain(settings)
    mg = chain.metagraph()
    top = mg.top_validator()
    commitment = chain.commitments().get(mg.uid_of(top)) if top else None
    if top is None or commitment is None:
        raise ExportError("the chain has no top validator with a committed bucket")
    store = open_store(commitment, settings.storage, root=settings.storage.root or str(settings.home))
    params = {k: v.detach().clone() for k, v in state_tensors(build_model(settings.model)).items()}
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    follower = Follower(
        settings.chain.netuid, shapes, sum(v.numel() * v.element_size() for v in params.values())
    )
    try:
        position = follower.sync(store, top, params, None, window)
    except MasterError as e:
        raise ExportError(f"master from {commitment}: {e}") from None
    if window is not None and position.window != window:
        raise ExportError(f"θ_{window} is not published yet (newest: θ_{position.window})")
    return params, position


def localnet_model(
    settings: Settings, params: dict[str, torch.Tensor], position: Position | None, dataset, out: Path
) -> dict | None:
    """The localnet's last step: the final master (as its observer followed it) exported to `out`,
    with a short sample generation; None when no master was ever published."""
    if position is None:
        return None
    info = {"window": position.window, "source": "localnet", "corpus": dataset.manifest.to_dict()}
    done = save_model(settings, params, dataset.tokenizer, out, info)
    if done.hash != position.hash:
        raise ExportError(f"exported θ_{position.window} hashes to {done.hash}, not {position.hash}")
    return {"dir": str(out), "window": position.window, "hash": done.hash, "sample": sample(out)}


def push_to_hub(out: Path, repo: str) -> str:
    """Upload an exported directory to a Hub model repo (created if needed); needs a login/token."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model")
    return f"https://huggingface.co/{repo}"


def export(
    settings: Settings, out: Path, *, checkpoint: Path | None = None, window: int | None = None
) -> Exported:
    """θ from `checkpoint` or from the publisher's bucket, written to `out` with its tokenizer."""
    from .data import Dataset

    if checkpoint is not None:
        params, info = from_checkpoint(settings, checkpoint), {"window": None, "source": str(checkpoint)}
    else:
        params, pos = from_bucket(settings, window)
        info = {"window": pos.window, "source": "bucket", "netuid": settings.chain.netuid}
    dataset = Dataset.open(settings)
    info["corpus"] = dataset.manifest.to_dict()
    return save_model(settings, params, dataset.tokenizer, out, info)


def main(settings: Settings, args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    try:
        done = export(
            settings, out, checkpoint=Path(args.checkpoint) if args.checkpoint else None, window=args.window
        )
    except ExportError as e:
        log.error("%s", e)
        return 1
    where = f"θ_{done.window}" if done.window is not None else "the checkpoint"
    print(f"exported {where} ({done.hash[:12]}) to {done.dir}")
    if args.sample:
        print(sample(done.dir))
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(done.dir, args.push_to_hub)}")
    return 0
