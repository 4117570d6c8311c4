"""Balancing experiment of the issue "Routing beyond the peers": Switch loss vs the
selection bias (softmax and sigmoid scores) vs no balancing, same model, data, steps
and seeds; writes docs/balancing.json and docs/balancing.png.

    python docs/balancing_experiment.py --data /tmp/balancing --steps 400

Model: configs/tiny_switch.yaml (the learning issue's tiny config: 4 blocks, d 128,
8 experts per MoE block, capacity factor 1.25 train / 2.0 eval, 2 ranks, ep 2, ZeRO-2)
with ``moe.top_k=2``. Data: Project Gutenberg Shakespeare (data_tools/prepare_corpus.py;
``--corpus synthetic`` for the offline corpus), sentencepiece 2048, 128-token samples,
2% held out, exactly as launchers/demo.sh prepares it. Runs (only the balancing keys
differ; the router z-loss stays at 1e-3 everywhere):

  switch_loss    moe.aux_loss_coef 0.01 (Switch), no bias
  bias_softmax   moe.aux_loss_coef 0, moe.bias_update_rate U, softmax scores
  bias_sigmoid   moe.aux_loss_coef 0, moe.bias_update_rate U, moe.score_func sigmoid
  none           moe.aux_loss_coef 0, no bias

Recorded from each run's TensorBoard events: eval/loss at every eval step (the whole
held-out split), and at the same steps the mean over MoE layers of moe/layer_i/maxvio
(the last step's global counts), moe/layer_i/window_drop_frac (dropped / routed
assignments over the last log window) and moe/layer_i/dead_experts_window.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import prepare_demo_data, run_command as run  # noqa: E402

RUNS = {
    "switch_loss": ["moe.aux_loss_coef=0.01"],
    "bias_softmax": ["moe.aux_loss_coef=0.0", "moe.bias_update_rate={rate}"],
    "bias_sigmoid": ["moe.aux_loss_coef=0.0", "moe.bias_update_rate={rate}", "moe.score_func=sigmoid"],
    "none": ["moe.aux_loss_coef=0.0"],
}


def train(name: str, manifest: Path, runs: Path, steps: int, eval_every: int, rate: float,
          launcher: str, seed) -> None:
    sets = [s.format(rate=rate) for s in RUNS[name]] + ([f"train.seed={seed}"] if seed is not None else []) + [
        "moe.top_k=2", f"data.manifest={manifest}", f"train.max_steps={steps}",
        f"train.eval_every={eval_every}", "train.eval_steps=0", "logging.every_steps=10",
        f"checkpoint.dir={runs / name / 'ckpt'}", "checkpoint.every_steps=0",
        f"logging.dir={runs / name / 'tb'}"]
    args = ["--config", "configs/tiny_switch.yaml", "--resume", "none"]
    for s in sets:
        args += ["--set", s]
    run([sys.executable, "-m", "moe_train", "launch", "--launcher", launcher, "--nproc", "2", "--", *args])


def read_events(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moe_train.train.metrics.writer import event_dir

    acc = EventAccumulator(event_dir(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def layer_mean(events: dict, key: str, step: int) -> float:
    tags = [t for t in events if t.startswith("moe/layer_") and t.endswith("/" + key)]
    return sum(events[t][step] for t in tags) / len(tags)


def summarise(runs: Path, names: list[str]) -> dict:
    out = {"runs": {}}
    for name in names:
        ev = read_events(runs / name / "tb")
        steps = sorted(ev["eval/loss"])
        log_steps = sorted(ev["moe/mean/maxvio"])
        out["runs"][name] = {
            "steps": steps,
            "val_loss": [ev["eval/loss"][s] for s in steps],
            "maxvio": [layer_mean(ev, "maxvio", s) for s in steps],
            "drop_frac": [layer_mean(ev, "window_drop_frac", s) for s in steps],
            "dead_experts": [layer_mean(ev, "dead_experts", s) for s in steps],
            "log_steps": log_steps,
            "maxvio_log": [layer_mean(ev, "maxvio", s) for s in log_steps],
            "drop_frac_log": [layer_mean(ev, "window_drop_frac", s) for s in log_steps],
            "dead_experts_log": [layer_mean(ev, "dead_experts", s) for s in log_steps],
            "train_lm_loss_log": [ev["train/lm_loss"][s] for s in log_steps],
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in result["runs"].items():
        axes[0].plot(r["steps"], r["val_loss"], marker="o", label=name)
        axes[1].plot(r["log_steps"], r["maxvio_log"], label=name)
        axes[2].plot(r["log_steps"], r["drop_frac_log"], label=name)
    for ax, title in zip(axes, ["validation loss", "maxvio (mean over MoE layers)",
                                "drop fraction (last 10 steps, mean over layers)"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(result.get("title", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="work folder: corpus, shards, runs")
    parser.add_argument("--corpus", choices=("shakespeare", "synthetic"), default="shakespeare")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.01, help="moe.bias_update_rate of the bias runs")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--launcher", default="torchrun")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--seed", type=int, default=None,
                        help="train.seed (default: the config's, 1234); runs go to runs_seed<N>/")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "balancing.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "balancing.png")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    manifest = prepare_demo_data(Path(args.data), args.corpus)[0]
    runs = args.data / ("runs" if args.seed is None else f"runs_seed{args.seed}")
    if not args.summarise_only:
        for name in names:
            train(name, manifest, runs, args.steps, args.eval_every, args.rate, args.launcher, args.seed)
    result = summarise(runs, names)
    result["command"] = " ".join(["python", "docs/balancing_experiment.py", *(argv or sys.argv[1:])])
    result["setup"] = (f"configs/tiny_switch.yaml + moe.top_k=2 (8 experts, cf 1.25), {args.corpus} corpus, "
                       f"2 ranks ep 2, {args.steps} steps, bias_update_rate {args.rate}, "
                       f"seed {1234 if args.seed is None else args.seed}")
    result["title"] = result["setup"]
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    print(json.dumps({n: {"val_loss": r["val_loss"][-1], "maxvio": r["maxvio"][-1], "drop_frac": r["drop_frac"][-1]}
                      for n, r in result["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
