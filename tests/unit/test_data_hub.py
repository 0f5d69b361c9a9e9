"""`hf:NAME@REVISION[:SPLIT]` on a local directory laid out like the hub, through fsspec: the code path
the Hugging Face Hub takes, offline. Parquet files with several row groups are written here."""

from __future__ import annotations

from pathlib import Path

import bittensor_core
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bistro.config import DataConfig, build_settings
from bistro.data import Dataset
from bistro.data.hub import (
    HubError,
    HubSpec,
    check_index,
    fetch_index,
    filesystem,
    open_hub_corpus,
    publish_index,
)
from bistro.storage.local import LocalStore

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")
BOB = bittensor_core.Keypair.create_from_uri("//Bob")
NAME = "acme/webtext"


def write_dataset(root: Path, revision: str, files: int = 3, rows: int = 40, group: int = 12) -> list[str]:
    """`root/datasets/acme/webtext@REV/data/train-0000i.parquet`, each with several row groups; the
    documents in corpus order."""
    docs = []
    base = root / "datasets" / f"{NAME}@{revision}" / "data"
    base.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        texts = [f"{revision} file {f} row {r}: " + "words " * (5 + r % 7) for r in range(rows)]
        pq.write_table(pa.table({"text": texts, "id": list(range(rows))}), base / f"train-{f:05d}.parquet",
                       row_group_size=group)  # fmt: skip
        docs += texts
    (base / "README.md").write_text("not parquet")
    return docs


class NoWalk:
    """A filesystem that reads files but refuses to list them: proves the index came from elsewhere."""

    def __init__(self, fs) -> None:
        self.fs = fs

    def glob(self, *a, **k):
        raise AssertionError("the dataset was walked again")

    def open(self, *a, **k):
        return self.fs.open(*a, **k)


def cfg(tmp: Path, corpus: str, cache: str = "cache") -> DataConfig:
    return DataConfig(corpus=corpus, cache_dir=str(tmp / cache), hub_root=str(tmp / "hub"))


def test_pages_are_rows_in_file_and_row_group_order(tmp_path: Path) -> None:
    docs = write_dataset(tmp_path / "hub", "v1")
    corpus = open_hub_corpus(cfg(tmp_path, f"hf:{NAME}@v1:train"), rows_per_page=5)
    assert corpus.num_pages == len(docs) // 5
    for page in (0, 2, 7, corpus.num_pages - 1):  # page 2 spans row groups 0 and 1 of file 0
        assert corpus.page(page) == docs[page * 5 : (page + 1) * 5]
    assert len(corpus.hub_index) == 3 * 4  # 40 rows in groups of 12: 4 row groups per file
    assert corpus.documents.reads <= 12


def test_index_is_cached_and_pinned_revisions_never_shift(tmp_path: Path) -> None:
    docs = write_dataset(tmp_path / "hub", "v1")
    c = cfg(tmp_path, f"hf:{NAME}@v1")
    first = open_hub_corpus(c, 4)
    again = open_hub_corpus(c, 4, fs=NoWalk(filesystem(c)))  # from the cache: no walk
    assert again.manifest == first.manifest and again.page(3) == docs[12:16]
    # The dataset grows in a new revision: v1's pages and hash stay; v2's differ.
    write_dataset(tmp_path / "hub", "v2", files=4)
    assert open_hub_corpus(cfg(tmp_path, f"hf:{NAME}@v1", "fresh"), 4).manifest == first.manifest
    v2 = open_hub_corpus(cfg(tmp_path, f"hf:{NAME}@v2"), 4)
    assert v2.manifest.content_hash != first.manifest.content_hash and v2.num_pages == 40


def test_publisher_serves_the_index_signed(tmp_path: Path) -> None:
    write_dataset(tmp_path / "hub", "v1")
    corpus = f"hf:{NAME}@v1"
    built = open_hub_corpus(cfg(tmp_path, corpus, "publisher"), 4)
    store = LocalStore(tmp_path, "publisher-bucket")
    assert publish_index(store, ALICE, 212, built)
    c = cfg(tmp_path, corpus, "joiner")
    joined = open_hub_corpus(
        c, 4, fetch_index(store, ALICE.ss58_address, 212, corpus), fs=NoWalk(filesystem(c))
    )
    assert joined.manifest == built.manifest and joined.page(5) == built.page(5)
    # Signed by someone else: ignored, and the node walks the dataset itself.
    c = cfg(tmp_path, corpus, "wary")
    wary = open_hub_corpus(c, 4, fetch_index(store, BOB.ss58_address, 212, corpus))
    assert wary.manifest == built.manifest


def test_bad_indexes_and_names_are_refused(tmp_path: Path) -> None:
    spec = HubSpec.parse(f"hf:{NAME}@v1:train")
    assert (spec.name, spec.revision, spec.split) == (NAME, "v1", "train")
    for bad in ([], [["datasets/other@v1/x.parquet", 0, 3]], [[f"{spec.root}/../x.parquet", 0, 3]],
                [[f"{spec.root}/x.parquet", -1, 3]], [[f"{spec.root}/x.parquet", 0]]):  # fmt: skip
        with pytest.raises(HubError):
            check_index(bad, spec)
    with pytest.raises(HubError):
        HubSpec.parse("hf:../../etc@v1")
    with pytest.raises(HubError, match="no parquet"):
        open_hub_corpus(cfg(tmp_path, f"hf:{NAME}@missing"), 4)


def test_dataset_packs_hub_pages(tmp_path: Path) -> None:
    write_dataset(tmp_path / "hub", "v1")
    settings = build_settings("tiny", overrides={"data.corpus": f"hf:{NAME}@v1", "data.cache_dir": str(tmp_path / "c"),
                                                 "data.hub_root": str(tmp_path / "hub")})  # fmt: skip
    data = Dataset.open(settings)
    seqs = data.sequences([0, 3])
    assert seqs.shape[1] == settings.model.sequence_length and len(seqs) >= 2
