"""Sparse upcycling experiment (issue 12): a dense tiny model trained N steps, then M more
steps as dense vs as an upcycled 8-expert MoE, same steps and data order; writes
docs/upcycling.json and docs/upcycling.png.

    python docs/upcycling_experiment.py --data demo_out/shakespeare --work /tmp/upcycling \\
        --dense-steps 300 --steps 300 --eval-every 25

Model: configs/tiny_switch.yaml (the learning issue's tiny config: 4 blocks, d 128, MLP
512, GELU) with ``model.moe_every: 0``, i.e. the dense model; 2 ranks, ep 2, ZeRO-2. Data: Project
Gutenberg Shakespeare, sentencepiece 2048, 128-token samples, 2% held out, prepared
exactly as launchers/demo.sh does (built under --data when absent).

  1. dense: ``moe-train train`` N steps (the config's LR schedule: warm-up 100, cosine
     to min_lr over N steps).
  2. the split point, two weights-only checkpoints of the step-N weights, each at step 0
     with the dense run's data position and tokens seen:
       dense     the dense model itself (``save_model_checkpoint``);
       upcycled  ``moe-train upcycle``: blocks 1 and 3 become MoE layers of 8 experts, each
                 a copy of the dense MLP, top-2 with ``normalize_topk``, dropless, a new
                 router: exact mode (its step-0 logits are the dense ones).
  3. each trained M steps by ``moe-train train`` (resume: fresh Adam, the LR schedule from
     step 0 again over M steps, the data continuing where the dense run stopped, so both
     arms see the same batches in the same order), evaluated every --eval-every steps on
     the whole held-out split (eval/loss of the TensorBoard events). Step 0 of each arm:
     the held-out loss of its starting checkpoint in one process (moe_train.inference.heldout_loss).

Both arms get the same treatment after the split (fresh optimizer, re-warm), so the
difference between them is the upcycling alone. "Equal steps" is not equal compute: the
upcycled model runs 2 experts per token in its MoE blocks; the JSON records the
training FLOPs per token (moe_train.model.sizing) and the mean step time of each arm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import prepare_demo_data, run_command as run  # noqa: E402
UPCYCLE = ["model.moe_every=2", "moe.num_experts=8", "moe.top_k=2", "moe.normalize_topk=true",
           "moe.capacity_factor=null", "moe.eval_capacity_factor=null"]


def train(config: Path, sets: list[str], launcher: str, resume: str = "auto") -> None:
    args = ["--config", str(config), "--resume", resume]
    for s in sets:
        args += ["--set", s]
    run([sys.executable, "-m", "moe_train", "launch", "--launcher", launcher, "--nproc", "2", "--", *args])


def arm_settings(work: Path, name: str, steps: int, eval_every: int) -> list[str]:
    return [f"train.max_steps={steps}", f"train.eval_every={eval_every}", "train.eval_steps=0",
            "checkpoint.every_steps=0", "logging.every_steps=10", f"logging.dir={work / name / 'tb'}"]


def dense_arm(dense_ckpt: Path, out: Path, sets: list[str]) -> Path:
    """The step-N dense weights as a weights-only checkpoint at step 0 with the data
    position carried, the way ``upcycle`` writes the other arm; returns its config."""
    from moe_train.checkpoint import TrainState, save_model_checkpoint
    from moe_train.config import config_to_dict, dump_config
    from moe_train.inference import load_for_inference
    from moe_train.transform.upcycle import upcycled_config

    loaded = load_for_inference(dense_ckpt)
    cfg = upcycled_config(loaded.meta["config"], sets, out)
    saved = loaded.meta["train_state"]
    save_model_checkpoint(out, loaded.model, config_to_dict(cfg),
                          TrainState(0, saved["tokens_seen"], 0, saved["loader_states"]),
                          f"dense continuation of {loaded.path}")
    (out / "config.yaml").write_text(dump_config(cfg))
    return out / "config.yaml"


def start_loss(ckpt_dir: Path) -> float:
    from moe_train.inference import heldout_loss
    from moe_train.inference import load_for_inference

    return heldout_loss(load_for_inference(ckpt_dir))[0]


def read_events(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moe_train.train.metrics.writer import event_dir

    acc = EventAccumulator(event_dir(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def summarise(work: Path, starts: dict[str, float]) -> dict:
    from moe_train.config import load_config
    from moe_train.model.sizing import flops_per_token, param_counts

    out = {"runs": {}}
    for name in ("dense", "upcycled"):
        ev = read_events(work / name / "tb")
        steps = sorted(ev["eval/loss"])
        cfg = load_config(work / name / "ckpt" / "config.yaml")
        times = list(ev.get("perf/step_time_s", {}).values())
        out["runs"][name] = {
            "steps": [0, *steps], "val_loss": [starts[name], *[ev["eval/loss"][s] for s in steps]],
            "train_lm_loss_log": {int(s): v for s, v in ev["train/lm_loss"].items()},
            "params": param_counts(cfg.model, cfg.moe).total,
            "train_flops_per_token": flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len),
            "mean_step_time_s": sum(times) / len(times) if times else None,
        }
    return out


def first_reach(steps: list[int], losses: list[float], target: float):
    """The first step at which ``losses`` is at or below ``target``, linear between
    evaluations; None if never."""
    for i, (step, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in result["runs"].items():
        ax.plot(r["steps"], r["val_loss"], marker="o", label=f"{name} ({r['params'] / 1e6:.2f}M params)")
    d, u = result["runs"]["dense"], result["runs"]["upcycled"]
    dax.plot(d["steps"], [b - a for a, b in zip(d["val_loss"], u["val_loss"])], marker="o", color="C1")
    dax.axhline(0.0, color="gray", lw=1)
    dax.set_ylabel("upcycled - dense validation loss")
    ax.set_ylabel("validation loss (held-out split)")
    for a in (ax, dax):
        a.set_xlabel(f"steps after the split (dense pretraining: {result['dense_steps']} steps)")
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "demo_out" / "shakespeare",
                        help="corpus/, tok/, shards/ as launchers/demo.sh makes them (built when absent)")
    parser.add_argument("--work", type=Path, required=True, help="checkpoints and TensorBoard events")
    parser.add_argument("--dense-steps", type=int, default=300, help="N: dense pretraining steps")
    parser.add_argument("--steps", type=int, default=300, help="M: steps of each arm after the split")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--launcher", default="torchrun")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "upcycling.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "upcycling.png")
    args = parser.parse_args(argv)
    manifest = prepare_demo_data(Path(args.data))[0]
    work = args.work
    dense_dir = work / "pretrain"
    starts_path = work / "start_losses.json"
    if not args.summarise_only:
        shutil.rmtree(work, ignore_errors=True)
        train(REPO / "configs" / "tiny_switch.yaml",
              ["model.moe_every=0", f"data.manifest={manifest}", f"train.max_steps={args.dense_steps}",
               "train.eval_every=0", "checkpoint.every_steps=0", f"checkpoint.dir={dense_dir / 'ckpt'}",
               "logging.every_steps=10", f"logging.dir={dense_dir / 'tb'}"], args.launcher, resume="none")
        sets = {name: arm_settings(work, name, args.steps, args.eval_every) for name in ("dense", "upcycled")}
        dense_arm(dense_dir / "ckpt", work / "dense" / "ckpt", sets["dense"])
        upcycle = [sys.executable, "-m", "moe_train", "upcycle", "--checkpoint", str(dense_dir / "ckpt"),
                   "--out", str(work / "upcycled" / "ckpt")]
        for s in UPCYCLE + sets["upcycled"]:
            upcycle += ["--set", s]
        run(upcycle)
        starts = {name: start_loss(work / name / "ckpt") for name in ("dense", "upcycled")}
        starts_path.write_text(json.dumps(starts))
        for name in ("dense", "upcycled"):
            train(work / name / "ckpt" / "config.yaml", [], args.launcher)
    result = summarise(work, json.loads(starts_path.read_text()))
    result["dense_steps"] = args.dense_steps
    d, u = result["runs"]["dense"], result["runs"]["upcycled"]
    result["upcycled_steps_to_dense_final"] = first_reach(u["steps"], u["val_loss"], d["val_loss"][-1])
    result["flops_ratio"] = u["train_flops_per_token"] / d["train_flops_per_token"]
    ran = [a for a in (argv or sys.argv[1:]) if a != "--summarise-only"]  # the command that trained
    result["command"] = " ".join(["python", "docs/upcycling_experiment.py", *ran])
    result["setup"] = (f"configs/tiny_switch.yaml with model.moe_every=0 (dense), Shakespeare, 2 ranks, "
                       f"{args.dense_steps} dense steps, then {args.steps} steps each: dense vs upcycled "
                       f"({' '.join(UPCYCLE)}); both arms a fresh optimizer and LR schedule at the split, "
                       f"same data order")
    result["title"] = (f"upcycling after {args.dense_steps} dense steps: 8 experts top-2 in blocks 1, 3 "
                       f"vs dense, same data and steps")
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    for name, r in result["runs"].items():
        print(f"{name}: params {r['params']:,}, train FLOPs/token {r['train_flops_per_token']:.4g}, "
              f"mean step {r['mean_step_time_s'] or float('nan'):.3f} s")
        print("  " + ", ".join(f"{s}: {v:.4f}" for s, v in zip(r["steps"], r["val_loss"])))
    d, u = result["runs"]["dense"], result["runs"]["upcycled"]
    print("upcycled - dense val loss: " + ", ".join(
        f"{s}: {b - a:+.4f}" for s, a, b in zip(d["steps"], d["val_loss"], u["val_loss"])))
    reach = result["upcycled_steps_to_dense_final"]
    print(f"dense final val loss {d['val_loss'][-1]:.4f} (step {d['steps'][-1]}); the upcycled model first "
          f"reaches it at step {'never' if reach is None else f'{reach:.0f}'} (linear between evaluations); "
          f"training FLOPs per token upcycled / dense = {result['flops_ratio']:.3f}")


if __name__ == "__main__":
    main()
