"""Rank 0's pre-resume check against the number of rank files.

    python -m benchmarks.resume_check [--ranks 8 64 512] [--file-kib 1024] [--out PATH]

Before a resume, rank 0 chooses the checkpoint (``find_checkpoint(dir, "auto")``) while
every other rank waits under the collective timeout. It used to read and CRC every file of
every rank (what ``moe-train ckpt verify`` still does, on purpose): time in proportion to
the whole checkpoint, 17 minutes for 1 TB at 1 GB/s. Now (``checksums=False``) it checks
presence and sizes of the shared files only (meta.json, dense, experts), and each rank
checks its own rank file and every tensor it loads. This prints both, side by side, for a
simulated engine checkpoint with N rank files (``rankNNNNN.pt`` of ``--file-kib`` each,
plus the dense and expert files), built once per N; the files are random bytes with a
correct manifest, so neither check has to load one. The files were just written, so the
full read comes from the page cache: a lower bound of what a cold parallel filesystem
costs. The baseline is this project's own previous check (no peer verifies at all:
DeepSpeed loads what it finds).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

from moe_train.checkpoint.resume import find_checkpoint


def write_fake_checkpoint(root: Path, ranks: int, file_bytes: int) -> Path:
    """A complete engine-format step directory with ``ranks`` rank files and a manifest."""
    step = root / "step_00000010"
    step.mkdir(parents=True)
    names = ["model_dense.pt", "experts_ep000.pt"] + [f"rank{r:05d}.pt" for r in range(ranks)]
    files, payload = {}, os.urandom(file_bytes)
    for i, name in enumerate(names):
        data = payload[:-8] + i.to_bytes(8, "little")  # a different CRC per file
        (step / name).write_bytes(data)
        files[name] = {"crc32": zlib.crc32(data), "bytes": len(data), "tensors": {}}
    meta = {"format": 2, "complete": True, "step": 10, "files": {n: e["bytes"] for n, e in files.items()},
            "topology": {"world_size": ranks, "ep_size": 1, "num_experts": 1},
            "manifest": {"format": 1, "files": files}}
    (step / "meta.json").write_text(json.dumps(meta))
    return step


def time_check(step: Path, checksums: bool, repeats: int = 3) -> float:
    """Best of ``repeats`` (seconds) of rank 0's choice; asserts it chose ``step``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chosen = find_checkpoint(step.parent, "auto", checksums=checksums)
        best = min(best, time.perf_counter() - start)
        assert chosen == step, chosen
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--file-kib", type=int, default=1024, help="size of each simulated file")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    print(f"rank 0's resume check, {args.file_kib} KiB per file (best of 3)")
    print(f"{'rank files':>10} | {'checkpoint MiB':>14} | {'full CRC read (before) s':>24} | "
          f"{'shared files, sizes (now) s':>27} | {'before / now':>12}")
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            step = write_fake_checkpoint(Path(tmp), ranks, args.file_kib * 1024)
            full, sizes = time_check(step, True), time_check(step, False)
        mib = (ranks + 2) * args.file_kib / 1024
        rows.append({"rank_files": ranks, "checkpoint_mib": mib, "full_crc_s": full, "sizes_only_s": sizes})
        print(f"{ranks:>10} | {mib:>14.0f} | {full:>24.4f} | {sizes:>27.5f} | {full / sizes:>11.0f}x")
    first, last = rows[0], rows[-1]
    print(f"growth from {first['rank_files']} to {last['rank_files']} rank files: full CRC read "
          f"x{last['full_crc_s'] / first['full_crc_s']:.1f}, shared files x"
          f"{last['sizes_only_s'] / first['sizes_only_s']:.1f} (each rank checks its own file as it loads it, "
          f"in parallel)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
