"""Does the MoE pay off? Dense against MoE variants at equal FLOPs per token, one pass over
real text that needs no download, then the finalist against dense over 3 seeds, and the
finalist with its router frozen as a control.

    python -m benchmarks.moe_payoff                 # the committed run (docs/moe_payoff.*)
    python -m benchmarks.moe_payoff --steps 60 --eval-every 20 --out /tmp/mp --work /tmp/mp/runs  # smoke

Data: the Python standard library's source (``data_tools/prepare_corpus.py python-stdlib``,
one document per file, 2% of the files held out by content hash), a sentencepiece
tokenizer of 2048 pieces and 128-token samples, made once under --data. Every run reads
the same samples in the same order (``data.seed`` fixed) and no sample twice: the runs
stop before the end of the first epoch (``max_epochs`` in the JSON says how far they got).
The corpus is written file by file in path order (a package's modules side by side), so
the samples are shuffled across the whole training split (``data.shuffle_buffer`` 32768 >=
its 31.7K samples): with the default buffer of one shard, every ~128 steps came from a
few neighbouring files, and the validation loss of every model rose and fell together
with them (a first run: 6.10, 5.36, 5.33, 5.55, 6.05, 4.51, 4.99 at steps 100-700).

Models (``VARIANTS``; on top of configs/tiny_switch.yaml, d_model 128, 4 blocks, 4 heads,
dense MLP width 512, GELU, one process, ZeRO 0, 8 x 128 = 1024 tokens a step):
  dense         every MLP dense
  switch_alt    Switch as in configs/tiny_switch.yaml: MoE in blocks 1 and 3, 8 experts, top-1,
                capacity factor 1.25, load-balancing loss 0.01
  switch_all    the same in every block
  fine          fine-grained, every block: 32 experts of ~1/4 the width, top-4, dropless
  fine_shared   fine with a shared expert of 1/4 the width and top-3 routed
  fine_bias     fine balanced by a selection bias (rate 1e-3) instead of the Switch loss
Equal FLOPs per token, router included: the expert width of every variant is the largest
multiple of 4 for which ``sizing.flops_per_token`` (attention, MLPs, router 2 D E per
MoE block, head) is at most the dense model's (``matched_expert_width``), so an MoE
model never gets more compute than dense; the JSON holds each model's FLOPs per token.

Procedure: all variants with seed 0; the finalist is the variant whose validation loss
first reaches the dense model's final loss in the fewest steps (the lowest final loss
if none does). Then dense and the finalist with seeds 1 and 2 (model initialisation,
expert seeds and router jitter; the same data), and the finalist with seed 0 and its
router frozen at initialisation (``moe.freeze_router``; a selection bias frozen too).
All runs share the schedule: --steps steps, linear warm-up over the first tenth, cosine
to a tenth of the peak learning rate 2e-3, an evaluation every --eval-every steps on the
same --eval-batches held-out batches.

Reported per seed: the steps to the dense model's final validation loss (linear between
evaluations) and dense steps / those steps; wall-clock likewise, with every step costed
at the model's step time measured INTERLEAVED with dense in one process after the runs
(the runs themselves go two at a time on a 2-core machine, so their own clocks share a
noisy neighbour; both numbers are in the JSON). Outputs under --out: moe_payoff.json
(``summary`` and ``runs``), moe_payoff.md (tables) and moe_payoff.png (validation loss
against steps and against seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from benchmarks.switch_vs_dense import (BASE_YAML, REPO, LoadSampler, corpus_name, first_reach, git_commit,
                                        machine_line, read_run, run_model, time_steps)

COMMON = ["model.vocab_size=2048", "model.d_model=128", "model.num_heads=4", "model.num_layers=4",
          "model.d_ff=512", "model.max_seq_len=128", "data.seq_len=128", "data.micro_batch_size=8",
          "parallel.expert_parallel_size=1", "parallel.zero_stage=0", "optim.lr=0.002", "optim.min_lr=0.0002",
          "moe.jitter_eps=0.01", "moe.z_loss_coef=0.001", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
          "logging.every_steps=10", "data.seed=1234", "data.shuffle_buffer=32768"]
DENSE_D_FF = 512
VARIANTS: dict[str, dict] = {
    # name: overrides, and the nominal expert width before matching (None: dense)
    "dense": {"set": ["model.moe_every=0"], "nominal": None},
    "switch_alt": {"set": ["model.moe_every=2", "moe.num_experts=8", "moe.top_k=1", "moe.capacity_factor=1.25",
                           "moe.aux_loss_coef=0.01"], "nominal": 512},
    "switch_all": {"set": ["model.moe_every=1", "moe.num_experts=8", "moe.top_k=1", "moe.capacity_factor=1.25",
                           "moe.aux_loss_coef=0.01"], "nominal": 512},
    "fine": {"set": ["model.moe_every=1", "moe.num_experts=32", "moe.top_k=4", "moe.capacity_factor=null",
                     "moe.aux_loss_coef=0.01"], "nominal": 128},
    "fine_shared": {"set": ["model.moe_every=1", "moe.num_experts=32", "moe.top_k=3", "moe.capacity_factor=null",
                            "moe.shared_d_ff=128", "moe.aux_loss_coef=0.01"], "nominal": 128},
    "fine_bias": {"set": ["model.moe_every=1", "moe.num_experts=32", "moe.top_k=4", "moe.capacity_factor=null",
                          "moe.aux_loss_coef=0", "moe.bias_update_rate=0.001"], "nominal": 128},
}
SEEDS = (0, 1, 2)
DATA = REPO / "runs" / "moe_payoff" / "data"


# ------------------------------------------------------------------------ configs


def _config(overrides: list[str]):
    from moe_train.config import load_config

    return load_config(BASE_YAML, overrides)


def flops_of(overrides: list[str]) -> float:
    from moe_train.model.sizing import flops_per_token

    cfg = _config(overrides)
    return flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len)


def matched_expert_width(variant_set: list[str], nominal: int, dense_flops: float, align: int = 4) -> int:
    """The largest multiple of ``align`` <= ``nominal`` at which the variant's FLOPs per
    token (router included) are at most ``dense_flops``."""
    width = nominal - nominal % align
    while width > 0 and flops_of(COMMON + variant_set + [f"moe.d_ff={width}"]) > dense_flops:
        width -= align
    if width <= 0:
        raise ValueError(f"{variant_set}: no expert width matches the dense FLOPs {dense_flops:.4g}")
    return width


def variant_overrides(name: str, seed: int, frozen: bool = False) -> list[str]:
    """Every --set of a run: COMMON, the variant (expert width matched), the seed."""
    spec = VARIANTS[name]
    out = COMMON + spec["set"]
    if spec["nominal"] is not None:
        dense = flops_of(COMMON + VARIANTS["dense"]["set"])
        out = out + [f"moe.d_ff={matched_expert_width(spec['set'], spec['nominal'], dense)}"]
    out = out + [f"train.seed={1234 + seed}", f"moe.seed={1234 + seed}"]
    if frozen:
        out = out + ["moe.freeze_router=true", "moe.bias_freeze_step=0"]
    return out


def schedule_overrides(args, manifest: Path, run_dir: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
            f"train.eval_steps={args.eval_batches}", f"optim.warmup_steps={max(1, args.steps // 10)}",
            f"checkpoint.dir={run_dir / 'checkpoints'}", f"logging.dir={run_dir / 'tb'}",
            f"logging.run_name={run_dir.name}"]


def sizes(overrides: list[str]) -> dict:
    from moe_train.model.sizing import flops_per_token, param_counts

    cfg = _config(overrides)
    n = param_counts(cfg.model, cfg.moe)
    embed = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
    return {"flops_per_token": flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len), "params_total": n.total,
            "params_active": n.active_per_token, "params_total_no_embed": n.total - embed,
            "params_active_no_embed": n.active_per_token - embed,
            "expert_d_ff": cfg.moe.d_ff if cfg.model.moe_every else None}


# ------------------------------------------------------------------------ data


def ensure_data(data: Path) -> Path:
    from benchmarks.experiments import prepare_demo_data

    return prepare_demo_data(data, corpus="python-stdlib")[0]


def epochs_used(manifest: Path, steps: int, tokens_per_step: int) -> float:
    """Passes over the training split that ``steps`` steps make."""
    meta = json.loads(manifest.read_text())
    return steps * tokens_per_step / (meta["splits"]["train"]["samples"] * meta["seq_len"])


# ------------------------------------------------------------------------ arithmetic


def speedups(dense: dict, other: dict) -> dict:
    """Steps (and seconds) at which ``other`` first reaches ``dense``'s final validation
    loss, and dense's / those. ``step_time`` (s/step of each, interleaved) costs the steps."""
    target = dense["val_loss"][-1]
    step = first_reach(other["steps"], other["val_loss"], target)
    out = {"steps_to_dense_final": step, "step_speedup": dense["steps"][-1] / step if step else None,
           "final_gap": target - other["val_loss"][-1]}
    wall = first_reach(other["wall_s"], other["val_loss"], target) if step else None
    out["wall_speedup_run_clock"] = dense["wall_s"][-1] / wall if wall else None
    if step and dense.get("step_time_s") and other.get("step_time_s"):
        out["wall_speedup"] = (dense["steps"][-1] * dense["step_time_s"]) / (step * other["step_time_s"])
    else:
        out["wall_speedup"] = None
    return out


def choose_finalist(runs: dict) -> str:
    """Fewest steps to the dense final loss; ties and never-reached by final loss."""
    dense = runs["dense"]
    scored = []
    for name, run in runs.items():
        if name == "dense":
            continue
        step = first_reach(run["steps"], run["val_loss"], dense["val_loss"][-1])
        scored.append((step if step is not None else math.inf, run["val_loss"][-1], name))
    return min(scored)[2]


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: dict, finalist: str, max_epochs: float) -> dict:
    """The ``summary`` of the JSON from the runs (keys "<name>@<seed>", "<finalist>@0-frozen")."""
    by_seed = {s: speedups(runs[f"dense@{s}"], runs[f"{finalist}@{s}"]) for s in SEEDS if f"{finalist}@{s}" in runs}
    dense_final = [runs[f"dense@{s}"]["val_loss"][-1] for s in by_seed]
    fin_final = [runs[f"{finalist}@{s}"]["val_loss"][-1] for s in by_seed]
    spread = max(statistics.pstdev(dense_final), statistics.pstdev(fin_final)) if len(by_seed) > 1 else None
    frozen = runs.get(f"{finalist}@0-frozen")
    return {
        "finalist": finalist,
        "step_speedup_by_seed": [by_seed[s]["step_speedup"] for s in by_seed],
        "step_speedup_mean": _mean([by_seed[s]["step_speedup"] for s in by_seed]),
        "wall_speedup_by_seed": [by_seed[s]["wall_speedup"] for s in by_seed],
        "wall_speedup_mean": _mean([by_seed[s]["wall_speedup"] for s in by_seed]),
        "wall_speedup_run_clock_mean": _mean([by_seed[s]["wall_speedup_run_clock"] for s in by_seed]),
        "final_gap_by_seed": [by_seed[s]["final_gap"] for s in by_seed],
        "final_gap_mean": _mean([by_seed[s]["final_gap"] for s in by_seed]),
        "seed_spread": spread,
        "frozen_router_gap": (frozen["val_loss"][-1] - runs[f"{finalist}@0"]["val_loss"][-1]) if frozen else None,
        "max_epochs": max_epochs,
        "screening": {name.split("@")[0]: speedups(runs["dense@0"], run) for name, run in runs.items()
                      if name.endswith("@0") and not name.startswith("dense")},
        "targets": {"goal_step_speedup": 2.0, "min_step_speedup": 1.5, "min_wall_speedup": 1.3,
                    "gap_over_spread": 3.0},
    }


# ------------------------------------------------------------------------ writing


def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def write_table(result: dict, path: Path) -> None:
    s, runs = result["summary"], result["runs"]
    fin = s["finalist"]
    lines = ["# Does the MoE pay off? Dense against MoE variants at equal FLOPs per token", "",
             f"Made by: `{result['command']}` ({result['wall_minutes']:.0f} min on this machine)", "",
             f"Corpus: {result['corpus']}. Machine: {result['machine']}", "",
             "## Screening, seed 0", "",
             "| model | params total / active (without embeddings) | expert width | FLOPs/token (vs dense) | "
             "final val loss | steps to dense final | speed-up (steps) | step time (interleaved) |",
             "|---|---|---|---|---|---|---|---|"]
    dense0 = runs["dense@0"]
    for key, run in runs.items():
        if not key.endswith("@0"):
            continue
        name = key.split("@")[0]
        sp = s["screening"].get(name, {})
        lines.append(
            f"| {name}{' (finalist)' if name == fin else ''} | {run['params_total_no_embed'] / 1e6:.2f}M / "
            f"{run['params_active_no_embed'] / 1e6:.2f}M | {_f(run['expert_d_ff'], 'd')} | "
            f"{run['flops_per_token'] / 1e6:.3f}M ({run['flops_per_token'] / dense0['flops_per_token']:.3f}) | "
            f"{run['val_loss'][-1]:.4f} | "
            + ("(reference)" if name == "dense" else _f(sp.get("steps_to_dense_final"), ".0f", "not reached"))
            + f" | {'1.00' if name == 'dense' else _f(sp.get('step_speedup'), '.2f')} | "
            f"{_f(run.get('step_time_s'), '.3f')} s |")
    lines += ["", f"## {fin} against dense, three seeds", "",
              "| seed | dense final | finalist final | gap | steps to dense final | speed-up (steps) | "
              "speed-up (wall, interleaved step times) | speed-up (wall, run clocks) |",
              "|---|---|---|---|---|---|---|---|"]
    for seed in SEEDS:
        d, f = runs.get(f"dense@{seed}"), runs.get(f"{fin}@{seed}")
        if not (d and f):
            continue
        sp = speedups(d, f)
        lines.append(f"| {seed} | {d['val_loss'][-1]:.4f} | {f['val_loss'][-1]:.4f} | {sp['final_gap']:.4f} | "
                     f"{_f(sp['steps_to_dense_final'], '.0f', 'not reached')} | {_f(sp['step_speedup'], '.2f')} | "
                     f"{_f(sp['wall_speedup'], '.2f')} | {_f(sp['wall_speedup_run_clock'], '.2f')} |")
    lines += ["", f"Mean step speed-up {_f(s['step_speedup_mean'], '.2f')}x (goal 2x, target >= 1.5x); mean "
              f"wall speed-up {_f(s['wall_speedup_mean'], '.2f')}x (target >= 1.3x); mean final gap "
              f"{_f(s['final_gap_mean'], '.4f')} nats against a seed spread of {_f(s['seed_spread'], '.4f')} "
              f"(target > 3x); frozen router minus learned, seed 0: {_f(s['frozen_router_gap'], '.4f')} nats; "
              f"at most {s['max_epochs']:.2f} passes over the training data.", ""]
    by_step = speedup_by_dense_step(runs["dense@0"], runs[f"{fin}@0"])
    lines += [f"Does the lead grow with training? For each dense evaluation (step s, loss v), s / the step at "
              f"which {fin} (seed 0) first reached v:", "",
              "| dense step | " + " | ".join(by_step) + " |", "|---" * (len(by_step) + 1) + "|",
              f"| {fin} speed-up | " + " | ".join(_f(v, ".2f") for v in by_step.values()) + " |", ""]
    long = result.get("long_runs")
    if long:
        sp = long["speedup"]
        lines += [f"## A longer run: {long['steps']} steps ({long['epochs']:.2f} epochs), seed 0", "",
                  f"Made by: `{result.get('long_command', '')}`", "",
                  f"Dense final {list(long['runs'].values())[0]['val_loss'][-1]:.4f}, {fin} final "
                  f"{list(long['runs'].values())[1]['val_loss'][-1]:.4f}; {fin} reached the dense final loss at "
                  f"step {_f(sp['steps_to_dense_final'], '.0f', 'never')}: speed-up "
                  f"{_f(sp['step_speedup'], '.2f')}x in steps.", "",
                  "| dense step | " + " | ".join(long["speedup_by_dense_step"]) + " |",
                  "|---" * (len(long["speedup_by_dense_step"]) + 1) + "|",
                  f"| {fin} speed-up | " + " | ".join(_f(v, ".2f") for v in long["speedup_by_dense_step"].values())
                  + " |", ""]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    fin = result["summary"]["finalist"]
    for key, run in result["runs"].items():
        name, seed = key.split("@")
        main = name in ("dense", fin)
        style = dict(marker="." if seed == "0" else None, alpha=1.0 if main else 0.45,
                     linestyle="--" if "frozen" in seed else "-", linewidth=1.5 if main else 1.0)
        wall = [n * run["step_time_s"] for n in run["steps"]] if run.get("step_time_s") else run["wall_s"]
        axes[0].plot(run["steps"], run["val_loss"], label=key, **style)
        axes[1].plot(wall, run["val_loss"], label=key, **style)
    target = result["runs"]["dense@0"]["val_loss"][-1]
    for ax, xlabel in zip(axes, ("training step (1024 tokens each)",
                                 "training seconds (steps x interleaved step time, 1 thread)")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        low = min(min(r["val_loss"]) for r in result["runs"].values())
        ax.set_ylim(low - 0.05, low + 1.0)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"MoE variants vs dense at equal FLOPs per token, {result['corpus']}, CPU")
    fig.text(0.5, 0.005, f"made by: {result['command']}", ha="center", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def long_runs(args, finalist: str, work: Path) -> dict:
    """Dense and the finalist (seed 0) over ``--long-steps`` steps, the same schedule
    shape: does the finalist's lead grow with the tokens seen?"""
    manifest = ensure_data(Path(args.data))
    if epochs_used(manifest, args.long_steps, 8 * 128) > 1:
        raise SystemExit(f"--long-steps {args.long_steps}: more than one epoch of {manifest}")
    long_args = argparse.Namespace(**{**vars(args), "steps": args.long_steps})
    batch = {f"{name}@0-long{args.long_steps}": variant_overrides(name, 0) for name in ("dense", finalist)}
    runs = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = {key: pool.submit(run_model, key, ov + schedule_overrides(long_args, manifest, work / key),
                                 work / key, 1) for key, ov in batch.items()}
        for key, fut in done.items():
            meta = fut.result()
            runs[key] = {**read_run(work / key / "tb"), **sizes(batch[key]), "elapsed_s": round(meta["elapsed_s"], 1),
                         "overrides": batch[key]}
    dense, fin = runs[f"dense@0-long{args.long_steps}"], runs[f"{finalist}@0-long{args.long_steps}"]
    return {"steps": args.long_steps, "epochs": epochs_used(manifest, args.long_steps, 8 * 128),
            "runs": runs, "speedup": speedups(dense, fin),
            "speedup_by_dense_step": speedup_by_dense_step(dense, fin)}


def speedup_by_dense_step(dense: dict, other: dict) -> dict:
    """For every dense evaluation (step s, loss v): s / the step at which ``other`` first
    reached v. Whether the lead grows with training, from one pair of runs."""
    out = {}
    for s, v in zip(dense["steps"], dense["val_loss"]):
        reach = first_reach(other["steps"], other["val_loss"], v)
        out[str(s)] = s / reach if reach else None
    return out


# ------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    import time

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=25, help="held-out batches per evaluation (the same ones)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="dense first")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--work", default=str(REPO / "runs" / "moe_payoff"))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--time-reps", type=int, default=20)
    p.add_argument("--plot-only", action="store_true", help="remake the .md and .png from the .json")
    p.add_argument("--long-steps", type=int, default=0,
                   help="after (or, with an existing JSON, instead of) the experiment: dense and the "
                        "finalist, seed 0, trained this many steps (at most one epoch), added as long_runs")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    json_path = out / "moe_payoff.json"
    if args.plot_only or (args.long_steps and json_path.is_file()):
        result = json.loads(json_path.read_text())
    else:
        started = time.time()
        names = args.variants.split(",")
        if names[0] != "dense" or any(n not in VARIANTS for n in names):
            raise SystemExit(f"--variants {args.variants}: dense first, then any of {', '.join(VARIANTS)}")
        manifest = ensure_data(Path(args.data))
        command = "python -m benchmarks.moe_payoff " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
        runs: dict[str, dict] = {}
        sets: dict[str, list[str]] = {}

        def launch(batch: dict[str, list[str]]) -> None:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                done = {key: pool.submit(run_model, key, ov + schedule_overrides(args, manifest, work / key),
                                         work / key, 1) for key, ov in batch.items()}
                for key, fut in done.items():
                    meta = fut.result()
                    runs[key] = {**read_run(work / key / "tb"), **sizes(batch[key]),
                                 "elapsed_s": round(meta["elapsed_s"], 1), "overrides": batch[key]}
            sets.update(batch)

        with LoadSampler() as sampler:
            launch({f"{n}@0": variant_overrides(n, 0) for n in names})
            finalist = choose_finalist({k.split("@")[0]: v for k, v in runs.items()})
            print(f"finalist: {finalist}", flush=True)
            second = {f"{finalist}@0-frozen": variant_overrides(finalist, 0, frozen=True)}
            for seed in SEEDS[1:]:
                second[f"dense@{seed}"] = variant_overrides("dense", seed)
                second[f"{finalist}@{seed}"] = variant_overrides(finalist, seed)
            launch(second)
        # what a step costs when every model sees the same machine at the same moment
        timed = {n: variant_overrides(n, 0) + [f"data.manifest={manifest}", f"checkpoint.dir={work / 'timing'}"]
                 for n in names}
        step_times = ({n: t["min_s"] for n, t in time_steps(timed, 1, args.time_reps, 3).items()}
                      if args.time_reps else {})
        for key, run in runs.items():
            run["step_time_s"] = step_times.get(key.split("@")[0])
        tokens_per_step = 8 * 128
        result = {"runs": runs, "command": command.strip(), "corpus": corpus_name(manifest),
                  "git_commit": git_commit(), "step_times_interleaved": step_times,
                  "machine": machine_line(argparse.Namespace(jobs=args.jobs, threads=1), sampler.samples),
                  "wall_minutes": (time.time() - started) / 60,
                  "summary": summarize(runs, finalist, epochs_used(manifest, args.steps, tokens_per_step))}
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    if args.long_steps and not args.plot_only:
        result["long_runs"] = long_runs(args, result["summary"]["finalist"], work)
        result["long_command"] = ("python -m benchmarks.moe_payoff " +
                                  " ".join(map(shlex.quote, argv or sys.argv[1:]))).strip()
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_table(result, out / "moe_payoff.md")
    write_plot(result, out / "moe_payoff.png")
    print((out / "moe_payoff.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
