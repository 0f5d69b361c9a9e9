"""The tokenizer every node uses: a byte-level BPE trained on the corpus, or a Hugging Face one.

`bpe` trains once with `tokenizers` on the corpus and caches the result under
`<cache_dir>/tokenizers/` keyed by (corpus content hash, vocab size); training is deterministic, and
every node checks the same corpus hash, but the page cache is keyed by the tokenizer's own hash, so
even a differing build could never serve wrong tokens. EOS is id 0, as `llama_config` declares.
Anything else is a Hugging Face tokenizer by name or local path, loaded offline when HF_HUB_OFFLINE
is set (tests set it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..atomicfile import write_atomic
from ..config import DataConfig
from ..protocol import digest
from .corpus import Corpus

EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not fit the model."""


class Tok:
    """A `tokenizers.Tokenizer` with the EOS id, the vocab size and a hash of its JSON."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (Rust threads do the batch)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def train_bpe(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with EOS at id 0, trained on the documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tok


def _bpe(cfg: DataConfig, corpus: Corpus, vocab_size: int) -> Tok:
    key = digest("bpe", 1, corpus.manifest.content_hash, vocab_size).hex()[:32]
    path = Path(cfg.cache_dir).expanduser() / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_bpe(corpus.documents, vocab_size)
        write_atomic(path, tok.to_str().encode(), durable=False)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise TokenizerError(f"{path}: no {EOS} token; delete the file to retrain")
    return Tok(tok, eos)


def _hugging_face(name: str) -> Tok:
    path = Path(name).expanduser()
    if path.is_file():
        return _with_eos(Tokenizer.from_file(str(path)), None, name)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except OSError as e:
        raise TokenizerError(f"cannot load tokenizer {name!r}: {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"tokenizer {name!r} has no fast (Rust) backend")
    return _with_eos(backend, hf.eos_token_id, name)


def _with_eos(tok: Tokenizer, eos_id: int | None, name: str) -> Tok:
    if eos_id is None:
        for candidate in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
            eos_id = tok.token_to_id(candidate)
            if eos_id is not None:
                break
    if eos_id is None:
        raise TokenizerError(f"tokenizer {name!r} has no end-of-text token")
    return Tok(tok, eos_id)


def load_tokenizer(cfg: DataConfig, corpus: Corpus, vocab_size: int) -> Tok:
    """The tokenizer `cfg.tokenizer` names; its vocabulary must fit the model's `vocab_size`."""
    tok = _bpe(cfg, corpus, vocab_size) if cfg.tokenizer == "bpe" else _hugging_face(cfg.tokenizer)
    if tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens, more than model.vocab_size {vocab_size}"
        )
    return tok
