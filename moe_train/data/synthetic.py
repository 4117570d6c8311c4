"""Synthetic shard sets for tests and benchmarks (no tokenizer needed).

Sample with global id g holds tokens [g % 65536, g // 65536, then (g * 7 + t) % (V - 1) + 1]:
the first two input ids identify the sample, so tests can check exactly which samples a
rank saw. Written with the real ShardWriter and manifest, so the loader cannot tell.
"""
from __future__ import annotations

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
