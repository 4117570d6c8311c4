"""Compression experiment (issue "Model options", section "Shrinking a trained model"):
bytes on disk and held-out loss of the README's tiny Switch model before and after
pruning half of its experts, after int8, and both; writes the "compression" section of
docs/model_options.json and prints a Markdown table.

    python docs/compression_experiment.py                     # train 300 steps, then compress
    python docs/compression_experiment.py --checkpoint demo_out/shakespeare/checkpoints

Model: configs/tiny_switch.yaml (4 blocks, d 128, 8 experts in blocks 1 and 3, top-1,
eval capacity factor 2.0), trained as launchers/demo.sh trains it (2 ranks, ep 2,
ZeRO-2, Project Gutenberg Shakespeare, sentencepiece 2048, 128-token samples, 2% held
out) for ``--steps`` steps (``train.eval_every 0``: this script measures), unless
``--checkpoint`` names a trained one. Rows (every one through the library functions of
``moe-train prune`` / ``moe-train quantize``, whose command line is printed and stored):

  original                       the trained checkpoint
  pruned_50pct_experts           moe-train prune --keep-experts E/2
  pruned_50pct_experts_dense50   ... --dense-sparsity 0.5 (dense block weights, per tensor)
  int8                           moe-train quantize (weight-only, per output channel)
  int8_dynamic                   moe-train quantize --dynamic (dense linears as int8 GEMMs)
  pruned+int8                    moe-train quantize of pruned_50pct_experts

bytes: the model files of the checkpoint (optimizer/RNG files of the training checkpoint
left out, moe_train/compress/report.py); val_loss: the whole validation split (or the
first ``--eval-batches``), moe_train.inference.heldout_loss, same batches for every row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import prepare_demo_data, run_command as run  # noqa: E402


def train(manifest: Path, out: Path, steps: int, launcher: str, nproc: int) -> tuple[Path, str]:
    """Trains the demo model; returns its checkpoint.dir and the command."""
    args = ["--config", "configs/tiny_switch.yaml", "--resume", "none"]
    for s in (f"data.manifest={manifest}", f"train.max_steps={steps}", "train.eval_every=0",
              f"checkpoint.dir={out / 'ckpt'}", "checkpoint.every_steps=0", f"logging.dir={out / 'tb'}"):
        args += ["--set", s]
    cmd = ["python", "-m", "moe_train", "launch", "--launcher", launcher, "--nproc", str(nproc), "--", *args]
    run([sys.executable, *cmd[1:]])
    return out / "ckpt", " ".join(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a trained tiny_switch checkpoint (else: train one)")
    parser.add_argument("--data", default=str(REPO / "demo_out" / "shakespeare"),
                        help="corpus/tok/shards folder, as launchers/demo.sh makes it (made if missing)")
    parser.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "synthetic"])
    parser.add_argument("--work", default="/tmp/moe_compression", help="training run and compressed checkpoints")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--launcher", default="torchrun")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=0, help="0: the whole validation split")
    parser.add_argument("--json", default=str(REPO / "docs" / "model_options.json"))
    args = parser.parse_args(argv)

    import shutil

    from benchmarks.results import update_json_section
    from moe_train.inference import load_for_inference
    from moe_train.transform import prune_checkpoint, quantize_checkpoint
    from moe_train.transform.report import snapshot, with_data

    work = Path(args.work)
    manifest = prepare_demo_data(Path(args.data), args.corpus)[0]
    if args.checkpoint:
        source, trained = Path(args.checkpoint), f"(given: --checkpoint {args.checkpoint})"
    else:
        source, trained = train(manifest, work / "train", args.steps, args.launcher, args.nproc)
    for name in ("pruned", "pruned_dense", "int8", "int8_dynamic", "pruned_int8"):
        shutil.rmtree(work / name, ignore_errors=True)
    data, k = str(manifest), args.eval_batches
    original = with_data(load_for_inference(source), data)
    half = original.cfg.moe.num_experts // 2
    base = ["python", "-m", "moe_train"]
    rows = {"original": (snapshot(original, original.path, k), trained)}
    common = ["--eval-batches", str(k), "--data", data]
    steps = [
        ("pruned_50pct_experts", lambda: prune_checkpoint(source, work / "pruned", keep=half, eval_batches=k, data=data),
         ["prune", "--checkpoint", str(source), "--out", str(work / "pruned"), "--keep-experts", str(half)]),
        ("pruned_50pct_experts_dense50",
         lambda: prune_checkpoint(source, work / "pruned_dense", keep=half, dense_sparsity=0.5, eval_batches=k, data=data),
         ["prune", "--checkpoint", str(source), "--out", str(work / "pruned_dense"), "--keep-experts", str(half),
          "--dense-sparsity", "0.5"]),
        ("int8", lambda: quantize_checkpoint(source, work / "int8", eval_batches=k, data=data),
         ["quantize", "--checkpoint", str(source), "--out", str(work / "int8")]),
        ("int8_dynamic", lambda: quantize_checkpoint(source, work / "int8_dynamic", dynamic=True, eval_batches=k, data=data),
         ["quantize", "--checkpoint", str(source), "--out", str(work / "int8_dynamic"), "--dynamic"]),
        ("pruned+int8", lambda: quantize_checkpoint(work / "pruned", work / "pruned_int8", eval_batches=k, data=data),
         ["quantize", "--checkpoint", str(work / "pruned"), "--out", str(work / "pruned_int8")]),
    ]
    for name, fn, cli in steps:
        command = " ".join(base + cli + common)
        print(f"\n=== {name}: {command}", flush=True)
        rows[name] = (fn()["after"], command)

    ref = rows["original"][0]
    result = {name: {"bytes": s.bytes, "val_loss": round(s.val_loss, 5), "params": s.weights,
                     "nonzero": s.nonzero, "command": command} for name, (s, command) in rows.items()}
    update_json_section(args.json, "compression", result)
    print(f"\n# compression of {original.path} (step {original.meta['step']}); validation: {ref.tokens:,} tokens "
          f"of {data}\n")
    print("| model | weights | nonzero | bytes on disk | vs original | val loss | change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (s, _) in rows.items():
        print(f"| {name} | {s.weights:,} | {s.nonzero:,} | {s.bytes:,} | x{s.bytes / ref.bytes:.3f} | "
              f"{s.val_loss:.4f} | {s.val_loss - ref.val_loss:+.5f} |")
    print(f"\nwrote section 'compression' of {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
