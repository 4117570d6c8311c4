"""Synthetic data: shard sets for tests and benchmarks (no tokenizer needed), and the
demo's offline text corpus (``write_demo_corpus``).

Sample with global id g holds tokens [g % 65536, g // 65536, then (g * 7 + t) % (V - 1) + 1]:
the first two input ids identify the sample, so tests can check exactly which samples a
rank saw. Written with the real ShardWriter and manifest, so the loader cannot tell.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from moe_train.data.shards import (FORMAT, FORMAT_VERSION, ShardWriter, token_dtype,
                                   write_manifest)


def sample_id(input_ids_S) -> int:
    """Global id of a synthetic sample from its input ids (tensor or array)."""
    return int(input_ids_S[0]) + (int(input_ids_S[1]) << 16)


def write_synthetic_dataset(out_dir: str, counts: list[int], seq_len: int,
                            vocab_size: int = 1000, val_counts: tuple = (5,)) -> dict:
    """Write shards with `counts[i]` samples each (train) and `val_counts` (validation).

    Returns:
        The manifest (also written to out_dir/manifest.json).
    """
    dtype = token_dtype(vocab_size)
    t = np.arange(seq_len + 1, dtype=np.int64)
    splits, first_id = {}, 0
    for split, split_counts in (("train", counts), ("validation", val_counts)):
        shards = []
        for count in split_counts:
            writer = ShardWriter(out_dir, split, count)
            writer.shards = [None] * len(shards)   # continue the shard numbering
            for g in range(first_id, first_id + count):
                sample = (g * 7 + t) % (vocab_size - 1) + 1
                sample[0], sample[1] = g % 65536, g // 65536
                writer.add(sample.astype(dtype), seq_len + 1)
            shards.extend(writer.close()[len(shards):])
            first_id += count
        splits[split] = {"shards": shards, "samples": sum(counts_ for counts_ in split_counts),
                         "tokens": sum(s["tokens"] for s in shards), "documents": 0,
                         "pad_tokens": 0}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len,
                "sample_tokens": seq_len + 1, "dtype": dtype, "vocab_size": vocab_size,
                "pad_id": 0, "bos_id": 2, "eos_id": 3, "add_bos": False,
                "tokenizer": {"model": "", "sha256": ""}, "inputs": [], "val_fraction": 0,
                "command": "synthetic", "skipped_input_lines": 0, "splits": splits}
    write_manifest(out_dir, manifest)
    return manifest


_WORDS = ("the expert router sends each token to a small network that learns one kind of "
          "pattern while a shared attention layer mixes context across the whole sequence "
          "capacity limits how many tokens an expert may take and the balancing loss keeps "
          "the load even so that no expert sits idle during training on many machines").split()


def write_demo_corpus(path: str, num_docs: int = 4000, seed: int = 0) -> int:
    """Writes a synthetic JSONL corpus ({"text": ...} per line) with learnable structure:
    sentences drawn from a small Markov chain over ``_WORDS``. Returns the doc count.
    ``data_tools/prepare_corpus.py synthetic`` (the demo's offline corpus) calls it."""
    rng = random.Random(seed)
    successors = {w: rng.sample(_WORDS, 4) for w in _WORDS}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                word = rng.choice(_WORDS)
                words = [word]
                for _ in range(rng.randint(5, 14)):
                    word = rng.choice(successors[word])
                    words.append(word)
                sentences.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return num_docs
