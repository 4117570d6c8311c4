"""Shared data-test fixtures: a tiny synthetic corpus, one tokenizer, one shard set, and
a larger synthetic shard set for the default shuffle buffer.

Built once per test session (cached in this module) and reused by the test_data_* files.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import random
import tempfile
from types import SimpleNamespace

import pytest

from moe_train.data.build import make_shards
from moe_train.data.synthetic import write_synthetic_dataset
from moe_train.data.tokenizer import iter_documents, train_tokenizer

WORDS = ("the a of model expert router token layer batch gradient loss data shard "
         "naïve café straße über façade jalapeño smörgåsbord ёлка мир 日本 語 δέλτα "
         "λόγος 😀 ✓ 12345 don't e-mail").split()

SYNTHETIC_COUNTS = [13, 7, 20, 3, 11, 9, 16]      # 7 uneven shards, 79 samples
SYNTHETIC_VAL_COUNTS = (6, 5)
SYNTHETIC_SEQ_LEN = 16
# 10 uneven shards, 8,500 samples: with the default 1024-sample shuffle block, a worker
# piece spans several blocks at 4, 3 or 2 ranks, so a re-split lands inside blocks.
LARGE_COUNTS = [1100, 700, 1500, 300, 900, 1200, 600, 800, 1000, 400]

_CACHE: dict = {}


def make_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Deterministic documents of 3..60 words with non-ASCII characters."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        docs.append(" ".join(words) + rng.choice([".", "!", "?", ""]))
    return docs


def write_corpus(directory: str, docs: list[str]) -> list[str]:
    """First half as a .txt (documents separated by blank lines), second half as .jsonl."""
    os.makedirs(directory, exist_ok=True)
    half = len(docs) // 2
    txt, jsonl = os.path.join(directory, "a.txt"), os.path.join(directory, "b.jsonl")
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n".join(d + "\n" for d in docs[:half]))
    with open(jsonl, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[half:])))
    return [txt, jsonl]


def _root() -> str:
    if "root" not in _CACHE:
        _CACHE["root"] = tempfile.mkdtemp(prefix="moe_train_data_tests_")
        atexit.register(shutil.rmtree, _CACHE["root"], True)
    return _CACHE["root"]


@pytest.fixture(scope="session")
def tokenized() -> SimpleNamespace:
    """Corpus -> tokenizer (BPE, vocab <= 600) -> shards (seq_len 32, 8 samples/shard)."""
    if "tokenized" not in _CACHE:
        root = os.path.join(_root(), "tokenized")
        docs = make_documents(400, seed=1)
        files = write_corpus(os.path.join(root, "corpus"), docs)
        prefix = os.path.join(root, "tok", "sp")
        train_tokenizer(iter_documents(files), prefix, vocab_size=600, num_threads=2)
        out = os.path.join(root, "shards")
        manifest = make_shards(files, prefix + ".model", out, seq_len=32, val_fraction=0.1,
                               samples_per_shard=8, num_procs=1)
        _CACHE["tokenized"] = SimpleNamespace(docs=docs, files=files, model=prefix + ".model",
                                              out=out, manifest=manifest,
                                              manifest_path=os.path.join(out, "manifest.json"))
    return _CACHE["tokenized"]


@pytest.fixture(scope="session")
def synthetic() -> SimpleNamespace:
    """7 uneven train shards (79 samples) + 2 validation shards (11), ids in the tokens."""
    if "synthetic" not in _CACHE:
        out = os.path.join(_root(), "synthetic")
        manifest = write_synthetic_dataset(out, SYNTHETIC_COUNTS, SYNTHETIC_SEQ_LEN,
                                           val_counts=SYNTHETIC_VAL_COUNTS)
        _CACHE["synthetic"] = SimpleNamespace(out=out, manifest=manifest,
                                              manifest_path=os.path.join(out, "manifest.json"),
                                              num_train=sum(SYNTHETIC_COUNTS),
                                              num_val=sum(SYNTHETIC_VAL_COUNTS))
    return _CACHE["synthetic"]


@pytest.fixture(scope="session")
def large_synthetic() -> SimpleNamespace:
    """LARGE_COUNTS train shards (8,500 samples, ids in the tokens) for runs with the
    default shuffle buffer."""
    if "large_synthetic" not in _CACHE:
        out = os.path.join(_root(), "large_synthetic")
        manifest = write_synthetic_dataset(out, LARGE_COUNTS, SYNTHETIC_SEQ_LEN)
        _CACHE["large_synthetic"] = SimpleNamespace(
            out=out, manifest=manifest, manifest_path=os.path.join(out, "manifest.json"),
            seq_len=SYNTHETIC_SEQ_LEN, num_train=sum(LARGE_COUNTS))
    return _CACHE["large_synthetic"]
