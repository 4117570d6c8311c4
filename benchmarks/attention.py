"""Attention patterns against full attention on CPU: forward + backward time and peak
memory at sequence lengths 1k to 16k, and the growth per doubling.

    python -m benchmarks.attention             # the committed run; updates docs/model_options.json "attention"
    python -m benchmarks.attention --quick     # a smoke run (256 and 512 tokens, no JSON)
    python benchmarks/attention.py --rows full sliding_window --seq-lens 1024 2048 --no-json
    python -m benchmarks.attention --flex      # also flex_attention's forward (CPU: no backward)

What runs: ``moe_train.model.attention.attend`` on random q, k, v of one sequence, H heads
of K dims (default 4 x 32, G = H), the attention op alone (no projections), fp32:

  full                       the named peer: PyTorch SDPA, full causal (``is_causal``)
  sliding_window             window W (default 256), blocked SDPA (explicit per-chunk masks)
  local_block                blocks of W, blocked SDPA
  longformer                 window W + 16 global tokens, blocked SDPA
  sliding_window_dense_mask  window W through SDPA with one dense [S, S] boolean mask: the
                             fallback every pattern would pay without the blocked path (up
                             to --dense-max-len, 8k: at 16k one step takes ~30 s)
  with --flex, forward only (no_grad): full_flex_fwd, sliding_window_flex_fwd (compiled
  flex_attention with a block mask) beside full_sdpa_fwd, sliding_window_sdpa_fwd.

How it is measured: each (row, length) in a fresh child process forked from this one
(which has run no tensor code): it builds its inputs, runs one warm-up step (library
start-up, autograd's worker thread; flex's compile), returns the freed memory to the
operating system (glibc ``malloc_trim``), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` 5), runs one step and reports peak_mb = VmHWM - VmRSS before
it: the growth of resident memory over one step (temporaries, saved activations,
gradients, allocator overhead), as the operating system sees it; Linux and glibc only.
Then --reps timed steps (forward, backward on a fixed random output gradient); ms is the
fastest of them: on a shared machine the minimum is the least disturbed measurement. A child that runs out of memory
or time (--max-s per measurement) leaves its entries null, and that row stops growing.
Growth per doubling is ms(2S) / ms(S): ~2 means linear in S, ~4 quadratic.

The JSON (--json PATH, default docs/model_options.json, section "attention"; --no-json to
skip): {ROW: {"seq_len": [...], "ms": [...], "peak_mb": [...], "growth": [...], "measures":
..., "impl": ..., "setup": {the command, shapes, threads, torch, load average}}}.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import update_json_section  # noqa: E402
from moe_train.model.attention import AttentionPattern, attend  # noqa: E402


def rows(window: int, global_tokens: int, flex: bool) -> dict[str, tuple[AttentionPattern, str, bool]]:
    """name -> (pattern, impl, backward?)."""
    full, sliding = AttentionPattern("full"), AttentionPattern("sliding_window", window)
    out = {"full": (full, "sdpa", True),
           "sliding_window": (sliding, "sdpa", True),
           "local_block": (AttentionPattern("local_block", window), "sdpa", True),
           "longformer": (AttentionPattern("longformer", window, global_tokens), "sdpa", True),
           "sliding_window_dense_mask": (sliding, "sdpa_dense", True)}
    if flex:
        out.update({"full_sdpa_fwd": (full, "sdpa", False), "full_flex_fwd": (full, "flex", False),
                    "sliding_window_sdpa_fwd": (sliding, "sdpa", False),
                    "sliding_window_flex_fwd": (sliding, "flex", False)})
    return out


def _status_kb(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _measure(conn, pattern: AttentionPattern, impl: str, backward: bool, seq_len: int, args) -> None:
    """In the forked child: a warm-up step, one step for the memory mark, --reps timed steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    H, G, K = args.heads, args.heads, args.head_dim
    q = torch.randn(1, H, seq_len, K, requires_grad=backward)
    k = torch.randn(1, G, seq_len, K, requires_grad=backward)
    v = torch.randn(1, G, seq_len, K, requires_grad=backward)
    grad = torch.randn(1, H, seq_len, K)

    def step():
        if backward:
            out = attend(q, k, v, pattern, impl)
            torch.autograd.backward(out, grad)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                attend(q, k, v, pattern, impl)

    step()  # warm-up: library start-up, autograd's worker, flex's compile
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed memory back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kb = _status_kb("VmRSS")
    step()
    peak_mb = (_status_kb("VmHWM") - before_kb) / 1024
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    conn.send({"ms": min(times), "peak_mb": peak_mb})
    conn.close()


def measure(pattern: AttentionPattern, impl: str, backward: bool, seq_len: int, args) -> dict | None:
    """One (row, length) in a forked child; None if it died (memory) or ran past --max-s."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(child, pattern, impl, backward, seq_len, args))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(args.max_s) else None
    if result is None:
        proc.kill()
    proc.join()
    return result


def run(args) -> dict:
    table = {}
    for name, (pattern, impl, backward) in rows(args.window, args.global_tokens, args.flex).items():
        if args.rows and name not in args.rows:
            continue
        entry = {"seq_len": [], "ms": [], "peak_mb": [], "impl": impl,
                 "measures": "forward+backward" if backward else "forward only (no_grad)"}
        failed = False
        for S in args.seq_lens:
            if impl == "sdpa_dense" and S > args.dense_max_len:
                why, result = f"skipped (--dense-max-len {args.dense_max_len})", None
            else:
                result = None if failed else measure(pattern, impl, backward, S, args)
                failed, why = result is None, "skipped (out of memory or time)"
            entry["seq_len"].append(S)
            entry["ms"].append(None if result is None else round(result["ms"], 2))
            entry["peak_mb"].append(None if result is None else round(result["peak_mb"], 1))
            print(f"  {name:28s} S={S:6d}  " + (why if result is None else
                  f"{result['ms']:10.1f} ms  {result['peak_mb']:8.1f} MB"), flush=True)
        entry["growth"] = [round(b / a, 2) if a and b else None for a, b in zip(entry["ms"], entry["ms"][1:])]
        table[name] = entry
    return table


def print_table(table: dict) -> None:
    lens = next(iter(table.values()))["seq_len"]
    def fmt(x, spec: str) -> str:  # "-" for a missing value, as wide as the spec
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("-", f">{width}") if x is None else format(x, spec)

    print("\nms (fastest of the timed steps), forward + backward unless marked; growth = ms(2S) / ms(S)")
    print(f"{'pattern':28s}" + "".join(f"{S:>10d}" for S in lens) + "   growth per doubling")
    for name, e in table.items():
        print(f"{name:28s}" + "".join(f"{fmt(m, '10.1f')}" for m in e["ms"]) + "   " +
              " ".join(fmt(g, ".2f") for g in e["growth"]))
    print("\npeak MB (resident-memory growth over one step)")
    for name, e in table.items():
        print(f"{name:28s}" + "".join(f"{fmt(m, '10.1f')}" for m in e["peak_mb"]))
    full = table.get("full")
    if full:
        print("\nspeed-up against full attention (ms_full / ms)")
        for name, e in table.items():
            if name != "full" and e["measures"] == full["measures"]:
                print(f"{name:28s}" + "".join(fmt(f / m if f and m else None, "10.2f")
                                              for f, m in zip(full["ms"], e["ms"])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", help="default 1024 ... 16384 (--quick: 256 512)")
    p.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--global-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2, help="timed steps after the warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    p.add_argument("--max-s", type=float, default=300.0, help="seconds one measurement may take")
    p.add_argument("--dense-max-len", type=int, default=8192,
                   help="longest sequence of the dense-mask row (16k: ~30 s a step, 2.5 GB)")
    p.add_argument("--flex", action="store_true", help="also time flex_attention's forward (compiles: minutes)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256 and 512 tokens, window 64, one timed step, no JSON unless --json")
    p.add_argument("--json", help="results file (default docs/model_options.json, section 'attention')")
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.window, args.reps = args.seq_lens or [256, 512], 64, 1
        args.no_json = args.no_json or args.json is None
    args.seq_lens = args.seq_lens or [1024, 2048, 4096, 8192, 16384]
    args.json = args.json or str(REPO / "docs" / "model_options.json")
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("benchmarks/attention.py measures peak memory through /proc/self/clear_refs: Linux only")
    print(f"attention benchmark: B 1, H {args.heads}, K {args.head_dim}, window {args.window}, "
          f"global tokens {args.global_tokens}, fp32, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    start = time.time()
    table = run(args)
    print_table(table)
    print(f"\n{time.time() - start:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if not args.no_json:
        setup = {"command": " ".join(["python -m benchmarks.attention"] + (argv if argv is not None else sys.argv[1:])),
                           "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "window": args.window,
                           "global_tokens": args.global_tokens, "threads": args.threads, "reps": args.reps,
                           "torch": torch.__version__, "load_average_end": round(os.getloadavg()[0], 2)}
        for entry in table.values():
            entry["setup"] = setup
        update_json_section(args.json, "attention", table)
        print(f"wrote section 'attention' of {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
