"""`bistro data prepare`: materialise and cache the corpus and tokenizer, print the manifest."""

from __future__ import annotations

import argparse
import json
import logging
import time

from ..config import Settings
from . import CorpusError, Dataset, TokenizerError

log = logging.getLogger("bistro.data")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.action != "prepare":
        log.error("unknown data action %r", args.action)
        return 2
    start = time.perf_counter()
    try:
        data = Dataset.open(settings)
    except (CorpusError, TokenizerError) as e:
        log.error("%s", e)
        return 1
    first = data.sequences([0])
    doc = {
        **data.manifest.to_dict(),
        "tokenizer": settings.data.tokenizer,
        "tokenizer_hash": data.tokenizer.hash,
        "vocab_size": data.tokenizer.vocab_size,
        "sequence_length": data.sequence_length,
        "sequences_in_page_0": int(first.shape[0]),
        "cache_dir": settings.data.cache_dir,
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(doc, indent=2))
    return 0
