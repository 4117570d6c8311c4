"""Loader throughput: moe_train.data vs a plain webdataset pipeline vs training consumption.

    python -m benchmarks.data_loader [--samples 4096] [--rounds 3] [--json out.json]

Writes a synthetic shard set (seq_len 2048, uint16) to a temp dir, then measures tokens/s
of one epoch (best of --rounds, interleaved) with 0, 1 and 2 DataLoader workers for (a) our loader (shuffle buffer,
masks, labels) and (b) a plain webdataset pipeline decoding the same shards into the
same input_ids/labels tensors. Training consumption: tokens/s of one MoE layer's
forward + backward (T=8192, D=512, F=2048, E=8, k=1) from benchmarks/moe_layer.py.
Targets: ours >= 20x training consumption and >= 0.8x the plain pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from moe_train.data import DataConfig, build_train_loader  # noqa: E402
from moe_train.data.synthetic import write_synthetic_dataset  # noqa: E402
from moe_train.parallel.init import keep_freed_memory  # noqa: E402

SEQ_LEN, BATCH = 2048, 8


def time_ours(manifest: str, num_workers: int) -> tuple[float, int]:
    cfg = DataConfig(manifest=manifest, seq_len=SEQ_LEN, micro_batch_size=BATCH,
                     num_workers=num_workers, shuffle_buffer=256, seed=0)
    loader = build_train_loader(cfg, 0, 1)
    start, tokens = time.perf_counter(), 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start), tokens


def _to_batch(sample):
    (tokens_BT,) = sample
    tokens_BT = torch.from_numpy(tokens_BT.astype("int64"))
    return {"input_ids": tokens_BT[:, :-1].contiguous(), "labels": tokens_BT[:, 1:].clone()}


def time_plain(urls: list[str], num_workers: int) -> tuple[float, int]:
    pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
                .to_tuple("tokens.npy").batched(BATCH, partial=False).map(_to_batch))
    source = pipeline if num_workers == 0 else DataLoader(
        pipeline, batch_size=None, num_workers=num_workers, prefetch_factor=2)
    start, tokens = time.perf_counter(), 0
    for batch in source:
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start), tokens


def training_tokens_per_s() -> float | None:
    try:
        from benchmarks.moe_layer import time_ours_ms
    except Exception as exc:  # the MoE benchmark is another module; keep going without it
        print(f"training-consumption column unavailable: cannot import "
              f"benchmarks.moe_layer.time_ours_ms ({type(exc).__name__}: {exc})")
        return None
    tokens = 8192
    ms = time_ours_ms(tokens, 512, 2048, 8, reps=5)
    return tokens / (ms / 1000.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="samples of 2049 tokens")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per contender (best kept)")
    p.add_argument("--json", default="", help="write results to this path")
    args = p.parse_args()
    keep_freed_memory()  # as moe_train's CPU training does; both loaders and the layer share it
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = args.samples // args.shards
        write_synthetic_dataset(tmp, [per_shard] * args.shards, SEQ_LEN, vocab_size=32000)
        urls = [os.path.join(tmp, "train", f"shard-{i:06d}.tar") for i in range(args.shards)]
        manifest = os.path.join(tmp, "manifest.json")
        print(f"shard set: {args.shards} shards x {per_shard} samples x {SEQ_LEN + 1} tokens "
              f"= {args.shards * per_shard * (SEQ_LEN + 1) / 1e6:.1f}M tokens, batch {BATCH}")
        rows = []
        for k in args.workers:
            time_ours(manifest, k)                       # warm the page cache
            ours = plain = 0.0
            for _ in range(args.rounds):  # interleaved, best of rounds: a noisy VM hits both
                ours = max(ours, time_ours(manifest, k)[0])
                plain = max(plain, time_plain(urls, k)[0])
            rows.append({"num_workers": k, "ours_tokens_per_s": ours,
                         "plain_webdataset_tokens_per_s": plain})
    train = training_tokens_per_s()
    print(f"\ntraining consumption (MoE layer fwd+bwd, T=8192 D=512 F=2048 E=8 k=1): "
          + (f"{train / 1e3:.1f}k tokens/s" if train else "unavailable"))
    print(f"{'workers':>7} {'ours tok/s':>14} {'plain wds tok/s':>16} {'ours/plain':>10} "
          f"{'ours/training':>13}")
    for r in rows:
        vs_train = f"{r['ours_tokens_per_s'] / train:>12.1f}x" if train else f"{'n/a':>13}"
        print(f"{r['num_workers']:>7} {r['ours_tokens_per_s'] / 1e6:>12.2f}M "
              f"{r['plain_webdataset_tokens_per_s'] / 1e6:>14.2f}M "
              f"{r['ours_tokens_per_s'] / r['plain_webdataset_tokens_per_s']:>9.2f}x "
              f"{vs_train}")
    print("targets: ours/training >= 20x, ours/plain >= 0.8x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"training_tokens_per_s": train, "workers": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
