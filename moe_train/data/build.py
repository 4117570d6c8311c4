"""Tokenize documents into packed-sequence shards (the library side of make_shards.py).

Deterministic: documents are read in a fixed order (sorted inputs, file order), tokenized
in parallel with an order-preserving map, and split into train/validation by a hash of
the document text, so the same input gives byte-identical shards for any process count.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections import deque
from itertools import islice
from typing import Iterable, Iterator, Optional

from moe_train.data.shards import (FORMAT, FORMAT_VERSION, Packer, ShardWriter,
                                   samples_per_shard_for, token_dtype, write_manifest)
from moe_train.data.tokenizer import TextStats, Tokenizer, expand_inputs, iter_documents

_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _encode_chunk(docs: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER.encode_batch(docs)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic split by content: stable when the corpus grows or is reordered."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < val_fraction * 2.0 ** 64


def make_shards(inputs: list[str], tokenizer_path: str, out_dir: str, seq_len: int,
                val_fraction: float = 0.01, shard_bytes: int = 256 << 20,
                samples_per_shard: int = 0, num_procs: int = 1, text_field: str = "text",
                add_bos: bool = False, on_error: str = "raise", command: str = "",
                progress=None, text_unit: str = "block") -> dict:
    """Tokenize text/JSONL inputs into train/validation shards and write manifest.json.

    Args:
        inputs: files, globs or directories (see tokenizer.expand_inputs).
        tokenizer_path: sentencepiece .model file.
        out_dir: output directory (gets manifest.json, train/, validation/).
        seq_len: tokens per training sequence; samples hold seq_len + 1 tokens.
        val_fraction: fraction of documents (by content hash) for validation.
        shard_bytes: target shard size in bytes (used when samples_per_shard is 0).
        samples_per_shard: exact samples per shard, overriding shard_bytes.
        num_procs: tokenizer processes.
        text_field: JSONL field with the text.
        add_bos: put BOS before each document (EOS always follows it).
        on_error: "raise" or "skip" for bad input lines (non-UTF-8, bad JSON).
        command: the command line, recorded in the manifest.
        progress: optional object with update(num_documents) (e.g. a tqdm bar).
        text_unit: how plain-text files are cut into documents: "block" (blank-line-
            separated, line breaks kept), "file" or "line" (see tokenizer.iter_documents);
            the train/validation split is by document.

    Returns:
        The manifest dict (also written to out_dir/manifest.json).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    per_shard = samples_per_shard or samples_per_shard_for(shard_bytes, seq_len, dtype)
    writers = {s: ShardWriter(out_dir, s, per_shard) for s in ("train", "validation")}
    packers = {s: Packer(seq_len, dtype, tok.pad_id, writers[s].add) for s in writers}
    documents = {s: 0 for s in writers}
    stats = TextStats()
    docs = iter_documents(files, text_field, on_error, stats, text_unit)
    pool = mp.Pool(num_procs, _init_worker, (tokenizer_path,)) if num_procs > 1 else None
    try:
        for texts, ids in _encode_in_order(_chunks(docs, 256), tokenizer_path, pool, num_procs):
            for text, doc_ids in zip(texts, ids):
                split = "validation" if is_validation(text, val_fraction) else "train"
                prefix = [tok.bos_id] if add_bos else []
                packers[split].add(prefix + doc_ids + [tok.eos_id])
                documents[split] += 1
            if progress is not None:
                progress.update(len(texts))
    finally:
        if pool is not None:
            pool.terminate()
    splits = {}
    for s in writers:
        pad_tokens = packers[s].finish()
        shards = writers[s].close()
        splits[s] = {"shards": shards, "samples": sum(x["samples"] for x in shards),
                     "tokens": sum(x["tokens"] for x in shards), "documents": documents[s],
                     "pad_tokens": pad_tokens}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len,
        "sample_tokens": seq_len + 1, "dtype": dtype, "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": add_bos,
        "tokenizer": {"model": os.path.abspath(tokenizer_path), "sha256": tok.sha256},
        "inputs": files, "text_unit": text_unit, "val_fraction": val_fraction, "command": command,
        "skipped_input_lines": stats.skipped_lines, "splits": splits}
    write_manifest(out_dir, manifest)
    return manifest


def _encode_in_order(chunks: Iterator[list[str]], tokenizer_path: str, pool, num_procs: int
                     ) -> Iterator[tuple[list[str], list[list[int]]]]:
    """Yield (texts, token_ids) per chunk in input order, at most 4 chunks per process
    in flight (so memory stays bounded on a large corpus)."""
    if pool is None:
        _init_worker(tokenizer_path)
        for chunk in chunks:
            yield chunk, _encode_chunk(chunk)
        return
    window: deque = deque()
    for chunk in chunks:
        window.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
        if len(window) >= 4 * num_procs:
            texts, result = window.popleft()
            yield texts, result.get()
    while window:
        texts, result = window.popleft()
        yield texts, result.get()
