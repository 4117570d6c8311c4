"""`data:` section of the training config.

Only plain types (str, int, float, bool) so YAML can store it and `--set data.x=y`
overrides work. `validate()` raises ValueError naming `data.<field>` and the value.
"""
from __future__ import annotations

from dataclasses import dataclass

TAIL_POLICIES = ("carry", "drop")
ERROR_POLICIES = ("raise", "skip")


@dataclass
class DataConfig:
    """Options of the streaming loader (see moe_train/data/loader.py for semantics).

    Attributes:
        manifest: path or http(s) URL of the manifest.json written by
            data_tools/make_shards.py. Required to build a loader: its per-shard sample
            counts let every rank compute the same number of steps without a collective.
        train_split / val_split: split names inside the manifest.
        train_shards / val_shards: optional shard locations overriding the manifest's
            (relative to the manifest) ones: brace pattern or comma list of paths/URLs,
            e.g. "https://host/d/train/shard-{000000..000009}.tar". Every basename must
            be a shard of that split in the manifest; a subset selects those shards.
        seq_len: tokens per training sequence; must equal the manifest's seq_len.
        micro_batch_size: sequences per rank per step (train).
        val_micro_batch_size: sequences per rank per step (validation); 0 = same.
        num_workers: DataLoader worker processes per rank (0 = in the main process).
        prefetch_factor: batches prefetched per worker.
        pin_memory: pin batches (useful with CUDA).
        seed: seed of the per-epoch shard permutation and sample shuffle.
        shuffle_shards: permute the shard order each epoch.
        shuffle_buffer: samples shuffled together (rounded up to a multiple of
            micro_batch_size); 0 = no sample shuffle.
        tail_policy: "carry" (samples that do not fill a last global batch open the
            next epoch) or "drop" (they are skipped this epoch and counted).
        on_error: "raise" (stop with an error naming shard and member) or "skip"
            (the sample's slot is masked out, counted and warned about).
        allow_pipe: allow "pipe:" shard URLs, which run a shell command.
        read_timeout_s: socket timeout for http(s) reads.
        worker_timeout_s: seconds to wait for a worker batch before failing; 0 = none.
        tokenizer_model: sentencepiece .model or tokenizer.json (for decoding/inspection).
    """

    manifest: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    train_shards: str = ""
    val_shards: str = ""
    seq_len: int = 2048
    micro_batch_size: int = 8
    val_micro_batch_size: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False
    seed: int = 1234
    shuffle_shards: bool = True
    shuffle_buffer: int = 1024
    tail_policy: str = "carry"
    on_error: str = "raise"
    allow_pipe: bool = False
    read_timeout_s: float = 120.0
    worker_timeout_s: float = 0.0
    tokenizer_model: str = ""

    def validate(self) -> None:
        """Check every field; raise ValueError naming `data.<field>` and its value."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"data.{name}={getattr(self, name)!r}: {why}")

        positive = ("seq_len", "micro_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        non_negative = ("val_micro_batch_size", "num_workers", "shuffle_buffer", "seed")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be an integer >= 0")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise bad("prefetch_factor", "must be an integer >= 1")
        if self.tail_policy not in TAIL_POLICIES:
            raise bad("tail_policy", f"must be one of {TAIL_POLICIES}")
        if self.on_error not in ERROR_POLICIES:
            raise bad("on_error", f"must be one of {ERROR_POLICIES}")
        for name in ("read_timeout_s", "worker_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be a number >= 0")
        if self.read_timeout_s == 0:
            raise bad("read_timeout_s", "must be > 0 (a dead server would hang forever)")
        for name in ("manifest", "train_split", "val_split", "train_shards",
                     "val_shards", "tokenizer_model"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        for name in ("pin_memory", "shuffle_shards", "allow_pipe"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if not self.allow_pipe:
            for name in ("manifest", "train_shards", "val_shards"):
                if "pipe:" in getattr(self, name):
                    raise bad(name, "uses a 'pipe:' URL, which runs a shell command; "
                                    "set data.allow_pipe=true to allow it")
