"""Packed-token shards: format, writing, manifest, reading.

Format (plain webdataset tar files, `tar tf` lists them):
    <out>/manifest.json
    <out>/<split>/shard-000000.tar, shard-000001.tar, ...
Each tar holds one member per sample, in order:
    <SSSSSS>_<JJJJJJJ>.tokens.npy     (S = shard index, J = sample index in the shard)
a standard `.npy` array of shape [seq_len + 1] and dtype uint16 (vocab <= 65536) or
uint32. A plain pipeline reads it without moe_train:
    webdataset.WebDataset(urls).decode().to_tuple("tokens.npy")
Samples are windows of one token stream (documents joined with EOS, optionally preceded
by BOS) that overlap by one token: sample i = stream[i*seq_len : i*seq_len + seq_len + 1],
so input_ids = sample[:-1], labels = sample[1:], and every token is a label exactly once.
The last sample of a split is padded with pad_id; the loader masks pad labels.

manifest.json: format version, seq_len, dtype, vocab/special ids, the tokenizer (file,
kind: sentencepiece or tokenizers, sha256, vocab size, BOS/EOS/PAD ids), the command that
made it, and per split its shards (name relative to the manifest,
samples, tokens, sha256). The loader takes per-shard sample counts from it, so every
rank computes the same number of steps without a collective.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import tarfile
import urllib.request
from typing import BinaryIO, Iterator, Optional

import numpy as np

from moe_train.data.errors import ShardError

FORMAT = "moe_train.packed_tokens"
FORMAT_VERSION = 1
MEMBER_EXT = "tokens.npy"


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype holding every token id: 'uint16' or 'uint32'."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def member_name(shard_index: int, sample_index: int) -> str:
    return f"{shard_index:06d}_{sample_index:07d}.{MEMBER_EXT}"


def npy_bytes(sample: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, sample, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes one split's samples into tar shards of at most `samples_per_shard` samples.

    Output is deterministic: member order, zero mtimes/uids, fixed names. Each shard is
    written to `<name>.tmp` and renamed when complete.

    Args:
        out_dir: the dataset directory (holding manifest.json).
        split: split name, also the sub-directory.
        samples_per_shard: shard size in samples.
    """

    def __init__(self, out_dir: str, split: str, samples_per_shard: int):
        self.out_dir, self.split = out_dir, split
        self.samples_per_shard = max(1, samples_per_shard)
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        self.shards: list[dict] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        self._tokens = 0

    def add(self, sample: np.ndarray, real_tokens: int) -> None:
        if self._tar is None:
            name = f"{self.split}/shard-{len(self.shards):06d}.tar"
            self._name = name
            self._tar = tarfile.open(os.path.join(self.out_dir, name + ".tmp"), "w",
                                     format=tarfile.USTAR_FORMAT)
        data = npy_bytes(sample)
        info = tarfile.TarInfo(member_name(len(self.shards), self._count))
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._tokens += real_tokens
        if self._count >= self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._tar.close()
        path = os.path.join(self.out_dir, self._name)
        os.replace(path + ".tmp", path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.shards.append({"name": self._name, "samples": self._count,
                            "tokens": self._tokens, "sha256": digest})
        self._tar, self._count, self._tokens = None, 0, 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


class Packer:
    """Packs token lists into [seq_len + 1] windows overlapping by one token.

    Args:
        seq_len: tokens per training sequence.
        dtype: numpy dtype name of the samples.
        pad_id: id used to pad the last sample.
        sink: called with (sample_array, number_of_new_real_tokens).
    """

    def __init__(self, seq_len: int, dtype: str, pad_id: int, sink):
        self.seq_len, self.dtype, self.pad_id, self.sink = seq_len, dtype, pad_id, sink
        self._pending = np.zeros(0, dtype=dtype)
        self.emitted = 0

    def add(self, tokens: list[int]) -> None:
        self._pending = np.concatenate([self._pending, np.asarray(tokens, dtype=self.dtype)])
        S = self.seq_len
        n = (len(self._pending) - 1) // S
        for i in range(n):
            # The first sample's S+1 tokens are all new; later ones repeat one token.
            self.sink(self._pending[i * S:i * S + S + 1].copy(), S + (self.emitted == 0))
            self.emitted += 1
        self._pending = self._pending[n * S:]

    def finish(self) -> int:
        """Pad and emit the remaining tokens; returns the number of pad tokens."""
        real = len(self._pending) - (1 if self.emitted else 0)
        if real <= 0:
            return 0
        num_pad = self.seq_len + 1 - len(self._pending)
        sample = np.concatenate([self._pending, np.full(num_pad, self.pad_id, self.dtype)])
        self.sink(sample, real)
        self.emitted += 1
        self._pending = np.zeros(0, dtype=self.dtype)
        return num_pad


def samples_per_shard_for(target_bytes: int, seq_len: int, dtype: str) -> int:
    """Samples that fit a shard of about `target_bytes` (tar header + padded .npy each)."""
    npy = 128 + (seq_len + 1) * np.dtype(dtype).itemsize
    per_sample = 512 + (npy + 511) // 512 * 512
    return max(1, target_bytes // per_sample)


def write_manifest(out_dir: str, manifest: dict) -> str:
    path = os.path.join(out_dir, "manifest.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------- reading

def check_url(url: str, allow_pipe: bool, field: str = "data.train_shards") -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"{field}: URL {url!r} runs a shell command; "
                         "set data.allow_pipe=true to allow 'pipe:' sources")


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status becomes an OSError on close."""

    def __init__(self, url: str):
        self.url = url
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.proc.stdout.readinto(b)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.proc.poll() is None:   # stopped early on purpose: not an error
            self.proc.kill()
            self.proc.wait()
            return
        err = self.proc.stderr.read().decode("utf-8", "replace").strip()
        if self.proc.returncode != 0:
            raise OSError(f"command exited with status {self.proc.returncode}: {err[-500:]}")


def open_url(url: str, allow_pipe: bool, timeout_s: float) -> BinaryIO:
    """Open a local path, file:// URL, http(s) URL or (if allowed) pipe: command."""
    check_url(url, allow_pipe)
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout_s)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return open(url, "rb", buffering=1 << 20)


def load_manifest(url: str, allow_pipe: bool = False, timeout_s: float = 120.0) -> dict:
    """Read and check a manifest.json (local path or URL).

    Raises:
        ValueError: the manifest is missing, unreadable or not of this format.
    """
    if not url:
        raise ValueError("data.manifest is empty: set it to the manifest.json written by "
                         "data_tools/make_shards.py")
    try:
        with open_url(url, allow_pipe, timeout_s) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"data.manifest={url!r}: cannot read it: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"data.manifest={url!r}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, "
                         f"version={manifest.get('format_version')!r})")
    return manifest


@functools.lru_cache(maxsize=8)
def _npy_header(tokens: int, dtype: str) -> bytes:
    """The exact .npy header our writer produces for a [tokens] array of ``dtype``."""
    return npy_bytes(np.zeros(tokens, dtype=dtype))[:-tokens * np.dtype(dtype).itemsize]


def _decode_sample(shard: str, name: str, data: bytes, tokens: int, dtype: str) -> np.ndarray:
    # Fast path: a member byte-identical in header and size to what our writer makes needs
    # no header parsing (numpy parses it with ast, a third of the loader's time). Anything
    # else, other writers' headers included, goes through np.load and its checks.
    header = _npy_header(tokens, dtype)
    if len(data) == len(header) + tokens * np.dtype(dtype).itemsize and data.startswith(header):
        return np.frombuffer(data, dtype=dtype, offset=len(header))
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad header
        raise ShardError(shard, name, f"not a valid .npy array ({exc})") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != (tokens,):
        raise ShardError(shard, name, f"sample has dtype {arr.dtype} and shape {arr.shape}, "
                                      f"expected {dtype} and ({tokens},)")
    return arr


def iter_shard(url: str, num_samples: int, start: int, stop: int, tokens: int, dtype: str,
               allow_pipe: bool = False, timeout_s: float = 120.0
               ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample_index, tokens_T) for samples [start, stop) of one shard.

    A sample with a bad payload (wrong dtype/length, not .npy) is yielded as a
    ShardError instead of an array, so the caller can skip it and read on; problems with
    the stream itself (cannot open, corrupt/truncated tar, missing member) raise.

    Args:
        url: shard location.
        num_samples: samples in the shard according to the manifest.
        start, stop: sample range to yield (reading stops after `stop`).
        tokens: expected sample length (seq_len + 1).
        dtype: expected numpy dtype name.

    Raises:
        ShardError: unreadable URL, corrupt/truncated tar, unexpected or missing member.
    """
    member = None
    try:
        stream = open_url(url, allow_pipe, timeout_s)
    except (OSError, ValueError) as exc:
        raise ShardError(url, None, f"cannot open: {exc}") from None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            j = 0
            for info in tar:
                if not info.isfile():
                    continue
                member = info.name
                key, _, ext = os.path.basename(member).partition(".")
                if ext != MEMBER_EXT or not key[-7:].isdigit() or int(key[-7:]) != j:
                    raise ShardError(url, member, f"expected sample {j} as "
                                     f"'<shard>_{j:07d}.{MEMBER_EXT}' (member missing or "
                                     "foreign file in the tar)")
                if j >= start:
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise ShardError(url, member, "truncated member")
                    try:
                        sample = _decode_sample(url, member, data, tokens, dtype)
                    except ShardError as err:   # the stream is fine: the caller may skip
                        sample = err
                    yield j, sample
                j += 1
                if j >= stop:
                    return
            raise ShardError(url, None, f"ended after {j} samples but the manifest says "
                             f"{num_samples} (truncated shard or wrong manifest)")
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        where = f" after member {member!r}" if member else ""
        raise ShardError(url, member, f"corrupt or truncated tar{where}: "
                         f"{type(exc).__name__}: {exc}") from None
