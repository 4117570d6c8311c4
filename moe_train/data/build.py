"""Tokenize documents into packed-sequence shards (the library side of make_shards.py).

Deterministic: documents are read in a fixed order (sorted inputs, file order), tokenized
in parallel with an order-preserving map, and split into train/validation by a hash of
the document text, so the same input gives byte-identical shards for any process count.

The workers do all the per-document work (encode, split by hash, add BOS/EOS) and hand
back one token array per split and chunk of documents, so the main process only reads
documents and packs arrays. Everything is written into ``<out>/.make_shards.tmp`` and
moved into place at the end: a run that fails (a bad row, a truncated file) leaves the
output directory as it was.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import shutil
from collections import deque
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from moe_train.data.shards import (FORMAT, FORMAT_VERSION, Packer, ShardWriter,
                                   samples_per_shard_for, token_dtype, write_manifest)
from moe_train.data.tokenizer import (TextStats, Tokenizer, expand_inputs, iter_documents,
                                      parquet_text_column)

SPLITS = ("train", "validation")
STAGING = ".make_shards.tmp"
_SHARD_FILE = re.compile(r"shard-\d{6}\.tar(\.tmp)?")
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, named: tuple, val_fraction: float, add_bos: bool,
                 dtype: str, single_thread: bool = False) -> None:
    if single_thread:
        # One thread per process: the pool is the parallelism. The `tokenizers` library's
        # own thread pool in every process would put procs x cores busy-waiting threads
        # on the cores (measured: --procs 2 at 0.6x of one process's batch encoding).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=Tokenizer(tokenizer_path, *named), val_fraction=val_fraction,
                   add_bos=add_bos, dtype=dtype)


def _encode_chunk(docs: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """{split: (token stream of the chunk's documents of that split, their number)};
    each document is [BOS] + ids + [EOS]."""
    tok, frac = _WORKER["tok"], _WORKER["val_fraction"]
    prefix = [tok.bos_id] if _WORKER["add_bos"] else []
    flat: dict[str, list[int]] = {s: [] for s in SPLITS}
    count = dict.fromkeys(SPLITS, 0)
    for text, ids in zip(docs, tok.encode_batch(docs)):
        split = "validation" if is_validation(text, frac) else "train"
        out = flat[split]
        out.extend(prefix)
        out.extend(ids)
        out.append(tok.eos_id)
        count[split] += 1
    return {s: (np.array(flat[s], dtype=_WORKER["dtype"]), count[s]) for s in SPLITS}


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


def _check_output(out_dir: str) -> None:
    """The split folders may hold only shards of an earlier run (they are replaced)."""
    for split in SPLITS:
        path = os.path.join(out_dir, split)
        if os.path.isdir(path):
            other = [n for n in sorted(os.listdir(path)) if not _SHARD_FILE.fullmatch(n)]
            if other:
                raise ValueError(f"--output {out_dir}: {path} holds {other[0]!r}, which is not a shard; "
                                 f"give a new or empty output directory")


def _publish(staging: str, out_dir: str, manifest: dict) -> None:
    """Moves the finished splits into place, then writes the manifest (last, by rename)."""
    old = os.path.join(out_dir, "manifest.json")
    if os.path.exists(old):
        os.remove(old)  # never a manifest that names shards of another run
    for split in SPLITS:
        dest = os.path.join(out_dir, split)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(staging, split), dest)
    write_manifest(out_dir, manifest)
    shutil.rmtree(staging)


def make_shards(inputs: list[str], tokenizer_path: str, out_dir: str, seq_len: int,
                val_fraction: float = 0.01, shard_bytes: int = 256 << 20,
                samples_per_shard: int = 0, num_procs: int = 1, text_field: str = "text",
                add_bos: bool = False, on_error: str = "raise", command: str = "",
                progress=None, text_unit: str = "block", bos_token=None, eos_token=None,
                pad_token=None, chunk_docs: int = 256) -> dict:
    """Tokenize text/JSONL/parquet inputs into train/validation shards and write manifest.json.

    Args:
        inputs: files, globs or directories (see tokenizer.expand_inputs).
        tokenizer_path: SentencePiece .model or `tokenizers` tokenizer.json.
        out_dir: output directory (gets manifest.json, train/, validation/).
        seq_len: tokens per training sequence; samples hold seq_len + 1 tokens.
        val_fraction: fraction of documents (by content hash) for validation.
        shard_bytes: target shard size in bytes (used when samples_per_shard is 0).
        samples_per_shard: exact samples per shard, overriding shard_bytes.
        num_procs: tokenizer processes.
        text_field: JSONL field / parquet column with the text.
        add_bos: put BOS before each document (EOS always follows it).
        on_error: "raise" or "skip" for bad input lines and rows (non-UTF-8, bad JSON,
            null or non-string text).
        command: the command line, recorded in the manifest.
        progress: optional object with update(num_documents) (e.g. a tqdm bar).
        text_unit: how plain-text files are cut into documents: "block" (blank-line-
            separated, line breaks kept), "file" or "line" (see tokenizer.iter_documents);
            the train/validation split is by document.
        bos_token, eos_token, pad_token: special tokens (text or id) overriding the
            tokenizer's own (``Tokenizer``).
        chunk_docs: documents per task of a tokenizer process.

    Returns:
        The manifest dict (also written to out_dir/manifest.json).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs)
    for path in files:  # footer and text column of every parquet file, before any work
        if path.endswith(".parquet"):
            parquet_text_column(path, text_field)
    named = (bos_token, eos_token, pad_token)
    tok = Tokenizer(tokenizer_path, *named)
    if add_bos and tok.bos_id is None:
        raise ValueError(f"--add-bos: tokenizer {tokenizer_path} has no BOS token; name one with --bos-token")
    _check_output(out_dir)
    dtype = token_dtype(tok.vocab_size)
    per_shard = samples_per_shard or samples_per_shard_for(shard_bytes, seq_len, dtype)
    staging = os.path.join(out_dir, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    try:
        splits, stats = _write_splits(files, tok, staging, seq_len, per_shard, dtype, num_procs,
                                      (val_fraction, add_bos, text_field, on_error, text_unit),
                                      progress, chunk_docs)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len,
            "sample_tokens": seq_len + 1, "dtype": dtype, "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": add_bos,
            "tokenizer": tok.describe(), "inputs": files, "text_unit": text_unit,
            "text_field": text_field, "val_fraction": val_fraction, "command": command,
            "skipped_input_lines": stats.skipped_lines, "splits": splits}
        _publish(staging, out_dir, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_splits(files: list[str], tok: Tokenizer, staging: str, seq_len: int, per_shard: int,
                  dtype: str, num_procs: int, options: tuple, progress, chunk_docs: int
                  ) -> tuple[dict, TextStats]:
    """Reads, tokenizes and packs every document into ``staging``; returns the
    manifest's "splits" and the reading counters."""
    val_fraction, add_bos, text_field, on_error, text_unit = options
    writers = {s: ShardWriter(staging, s, per_shard) for s in SPLITS}
    packers = {s: Packer(seq_len, dtype, tok.pad_id, writers[s].add) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    stats = TextStats()
    docs = iter_documents(files, text_field, on_error, stats, text_unit)
    init = (tok.path, tok.named, val_fraction, add_bos, dtype)
    pool = mp.Pool(num_procs, _init_worker, init + (True,)) if num_procs > 1 else None
    try:
        if pool is None:
            _init_worker(*init)
        for num_docs, parts in _encode_in_order(_chunks(docs, chunk_docs), pool, num_procs):
            for s, (tokens, count) in parts.items():
                packers[s].add(tokens)
                documents[s] += count
            if progress is not None:
                progress.update(num_docs)
    finally:
        if pool is not None:
            pool.terminate()
    splits = {}
    for s in SPLITS:
        pad_tokens = packers[s].finish()
        shards = writers[s].close()
        splits[s] = {"shards": shards, "samples": sum(x["samples"] for x in shards),
                     "tokens": sum(x["tokens"] for x in shards), "documents": documents[s],
                     "pad_tokens": pad_tokens}
    return splits, stats


def _encode_in_order(chunks: Iterator[list[str]], pool, num_procs: int
                     ) -> Iterator[tuple[int, dict]]:
    """Yield (documents, ``_encode_chunk`` result) per chunk in input order, at most 4
    chunks per process in flight (so memory stays bounded on a large corpus)."""
    if pool is None:
        for chunk in chunks:
            yield len(chunk), _encode_chunk(chunk)
        return
    window: deque = deque()
    for chunk in chunks:
        window.append((len(chunk), pool.apply_async(_encode_chunk, (chunk,))))
        if len(window) >= 4 * num_procs:
            n, result = window.popleft()
            yield n, result.get()
    while window:
        n, result = window.popleft()
        yield n, result.get()
