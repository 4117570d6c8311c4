"""Model options experiment (issue 9): parameter count and validation loss of the tiny
model of the README's main command under each model option; writes section "options" of
docs/model_options.json (``{NAME: {"params": .., "val_loss": ..}}``) and prints a table.

    python docs/model_options_experiment.py --data /tmp/model_options --steps 250

Model: configs/tiny_switch.yaml (launchers/demo.sh: 4 blocks, d_model 128, 8 experts in
blocks 1 and 3, top-1, capacity factor 1.25 train / 2.0 eval, 2 ranks, ep 2, ZeRO-2).
Data: Project Gutenberg Shakespeare (``--corpus synthetic`` for the offline corpus),
sentencepiece 2048, 128-token samples, 2% held out, made exactly as demo.sh makes them
(once, under --data). Every run trains the same number of steps with the same seed and
data order through the real train command (``moe-train launch``), with the
LR warm-up at steps/6 (the README run's 100 of 600), and is evaluated at its last step
on the whole held-out split. Runs (only the listed keys differ from the config):

  baseline             full attention, no sharing, embed_dim = d_model
  factorised_e32       model.embed_dim 32 (d_model / 4; V x 32 table, 32 -> 128 -> 32)
  share_mlp            model.share_layers mlp (blocks 1 and 3 use one MoE layer, blocks
                       0 and 2 one dense MLP)
  share_all            model.share_layers all (+ one attention for all four blocks)
  sliding_window_32    model.attention sliding_window, model.window 32 (of 128)

The section lists every run finished for this --steps (runs_<steps>/ under --data),
including those of an earlier call (--runs NAME trains one run and adds it).

params: the unique parameters of the model the run builds (``MoETransformer``, every
expert; a shared module once), checked against ``sizing.param_counts``.
val_loss: ``eval/loss`` of the run's TensorBoard events at its last step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import prepare_demo_data, run_command as run  # noqa: E402
CONFIG = "configs/tiny_switch.yaml"
RUNS = {
    "baseline": [],
    "factorised_e32": ["model.embed_dim=32"],
    "share_mlp": ["model.share_layers=mlp"],
    "share_all": ["model.share_layers=all"],
    "sliding_window_32": ["model.attention=sliding_window", "model.window=32"],
}


def overrides(name: str, manifest: Path, runs: Path, steps: int) -> list[str]:
    return RUNS[name] + [
        f"data.manifest={manifest}", f"train.max_steps={steps}", f"train.eval_every={steps}",
        "train.eval_steps=0", f"optim.warmup_steps={max(steps // 6, 1)}", "logging.every_steps=10",
        f"checkpoint.dir={runs / name / 'ckpt'}", "checkpoint.every_steps=0", f"logging.dir={runs / name / 'tb'}"]


def train(name: str, manifest: Path, runs: Path, steps: int, launcher: str) -> None:
    args = ["--config", CONFIG, "--resume", "none"]
    for s in overrides(name, manifest, runs, steps):
        args += ["--set", s]
    run([sys.executable, "-m", "moe_train", "launch", "--launcher", launcher, "--nproc", "2", "--", *args])


def count_params(name: str, manifest: Path, runs: Path, steps: int) -> int:
    """Unique parameters of the run's model, built as the run builds it (ep 1: every
    expert); must equal sizing.param_counts."""
    import torch

    from moe_train.config import load_config
    from moe_train.model.sizing import param_counts
    from moe_train.model.transformer import MoETransformer

    cfg = load_config(REPO / CONFIG, overrides(name, manifest, runs, steps))
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model, cfg.moe)
    params = sum(p.numel() for p in model.parameters())
    assert params == param_counts(cfg.model, cfg.moe).total, (name, params)
    return params


def final_val_loss(logdir: Path, steps: int) -> float | None:
    """``eval/loss`` at step ``steps`` in the run's events; None if the run is absent or
    did not get there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moe_train.train.metrics.writer import event_dir

    try:
        acc = EventAccumulator(event_dir(logdir), size_guidance={"scalars": 0})
    except (FileNotFoundError, ValueError):  # no folder, or no run in it
        return None
    acc.Reload()
    if "eval/loss" not in acc.Tags()["scalars"]:
        return None
    return {e.step: e.value for e in acc.Scalars("eval/loss")}.get(steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="work folder: corpus, shards, runs")
    parser.add_argument("--corpus", choices=("shakespeare", "synthetic"), default="shakespeare")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--launcher", default="torchrun")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing; the section lists every run finished under --data")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "model_options.json")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    manifest = prepare_demo_data(Path(args.data), args.corpus)[0]
    runs = args.data / f"runs_{args.steps}"
    if not args.summarise_only:
        for name in names:
            train(name, manifest, runs, args.steps, args.launcher)
    result = {}  # every run finished under runs_<steps>/, this call's or an earlier one's
    for name in RUNS:
        loss = final_val_loss(runs / name / "tb", args.steps)
        if loss is None:
            print(f"{name}: not run (no eval/loss at step {args.steps} under {runs / name})")
            continue
        result[name] = {"params": count_params(name, manifest, runs, args.steps), "val_loss": round(loss, 4)}
    from benchmarks.results import update_json_section

    update_json_section(args.json, "options", result)
    command = " ".join(["python", "docs/model_options_experiment.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n{CONFIG}, {args.corpus}, {args.steps} steps, 2 ranks ep 2 ZeRO-2; {command}")
    print(f"| run | overrides | params | val loss ({args.steps} steps) |\n|---|---|---:|---:|")
    for name, r in result.items():
        print(f"| {name} | {' '.join(RUNS[name]) or '-'} | {r['params']:,} | {r['val_loss']:.4f} |")
    print(f"wrote section 'options' of {args.json}")


if __name__ == "__main__":
    main()
