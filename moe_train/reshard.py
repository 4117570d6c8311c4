"""Which checkpoint a resume loads and how, and turning an engine checkpoint into a
canonical one (``moe-train ckpt canonical``).

A resume at the layout an engine checkpoint was saved at is exact (ZeRO partitions, RNG).
At any other layout only the canonical checkpoint (``moe_train.canonical``) holds an
optimizer state that can be read, so ``choose_resume`` takes the step's canonical
checkpoint, or refuses with one line naming the conversion: never a silent restart of
AdamW's moments (a known failure of several stacks: Megatron PR #7162, DeepSpeed #8147).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe_train import canonical
from moe_train import checkpoint as ckpt
from moe_train.canonical import DIRNAME, KIND, complete_canonical, verify


# ----------------------------------------------------------------------- resume choice


@dataclass
class ResumeSource:
    """What a resume loads. ``kind``: "engine" (same layout: exact, ZeRO partitions and
    RNG), "canonical" (any layout), "weights" (a weights-only checkpoint: fresh optimizer
    by design), "fresh_optimizer" (an engine checkpoint at another layout, weights only,
    with ``checkpoint.fresh_optimizer_on_new_layout`` set)."""

    kind: str
    path: Path


def describe_layout(meta: dict) -> str:
    """The layout a checkpoint was saved at, as "world W, ep E, ZeRO Z, dtype"."""
    cfg, topo = meta.get("config", {}), meta["topology"]
    return (f"world {topo['world_size']}, ep {topo['ep_size']}, "
            f"ZeRO {cfg.get('parallel', {}).get('zero_stage', '?')}, {cfg.get('train', {}).get('dtype', '?')}")


def choose_resume(root: str | Path, resume: str, topo, config: dict) -> Optional[ResumeSource]:
    """Which checkpoint ``--resume`` (auto, none or a path) loads, and how.

    An engine checkpoint at this layout resumes exactly. At another layout its canonical
    checkpoint (``step_N/canonical``) is loaded, and never silently an optimizer state
    re-initialised: without one, the resume fails naming the conversion command, the
    newest older canonical checkpoint if there is one, and the opt-in
    ``checkpoint.fresh_optimizer_on_new_layout``.

    Raises:
        CheckpointError: a checkpoint that fails verification, or the case above.
    """
    path = ckpt.find_checkpoint(root, resume)
    if path is None:
        return None
    meta = ckpt.read_meta(path) or {}
    if meta.get("kind") == KIND:
        return ResumeSource("canonical", path)
    if ckpt.same_layout(meta, topo, config):
        return ResumeSource("engine", path)
    if meta.get("weights_only"):
        return ResumeSource("weights", path)
    canonical_dir = complete_canonical(path)
    if canonical_dir is not None:
        problems = verify(canonical_dir)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ckpt.CheckpointError(f"{canonical_dir} is needed to resume {path} on another layout but fails "
                                       f"verification: {problems[0]}{more}; rewrite it with "
                                       f"`moe-train ckpt canonical {path}`")
        return ResumeSource("canonical", canonical_dir)
    if config.get("checkpoint", {}).get("fresh_optimizer_on_new_layout"):
        return ResumeSource("fresh_optimizer", path)
    older = [p for p, _, ok in reversed(ckpt.list_checkpoints(path.parent))
             if ok and p.name < path.name and complete_canonical(p) is not None]
    alternative = f"; or resume from the older {older[0] / DIRNAME} (--resume PATH)" if older else ""
    here = (f"world {topo.world_size}, ep {topo.ep_size}, ZeRO {config['parallel']['zero_stage']}, "
            f"{config['train']['dtype']}")
    raise ckpt.CheckpointError(
        f"{path} was saved at {describe_layout(meta)} and has no canonical checkpoint; this run is {here}, where "
        f"its ZeRO-partitioned optimizer state cannot be read. Convert it with `moe-train ckpt canonical "
        f"{path}` and resume again{alternative}; or set checkpoint.fresh_optimizer_on_new_layout=true to "
        f"load its weights and start AdamW's moments from zero")


# ------------------------------------------------------------------------ conversion


def convert(path: str | Path, timeout_s: Optional[float] = None) -> Path:
    """Writes ``PATH/canonical`` from the engine checkpoint ``PATH`` (a step directory, or
    a checkpoint.dir: its newest complete checkpoint).

    Reading ZeRO partitions needs the layout they were saved at, so this runs the saved
    world size of processes: under a launcher (torchrun, srun, mpirun with that many
    ranks) it is one of them; otherwise it starts them itself as gloo processes on this
    machine's CPU (each holds the model and its ZeRO partition: budget about the
    training-time memory per rank, in host RAM).

    Raises:
        CheckpointError: the checkpoint fails verification or a rank fails.
        ValueError: a weights-only checkpoint, or a launcher with another world size.
    """
    from moe_train.parallel.init import discover

    path = Path(path)
    if not (path / "meta.json").is_file():
        found = ckpt.find_checkpoint(path, "auto")
        if found is None:
            raise ValueError(f"{path}: neither a checkpoint (no meta.json) nor a checkpoint.dir holding one")
        path = found
    problems = ckpt.verify_checkpoint(path)
    if problems:
        raise ckpt.CheckpointError(f"{path} fails verification: {problems[0]}")
    meta = ckpt.read_meta(path)
    if meta.get("kind") == KIND:
        raise ValueError(f"{path} is already a canonical checkpoint")
    if meta.get("weights_only"):
        raise ValueError(f"{path} is a weights-only checkpoint: it has no optimizer state to convert, and "
                         f"`train --resume {path}` already loads it at any layout")
    world = meta["topology"]["world_size"]
    env = discover()
    if env.source != "single":
        if env.world_size != world:
            raise ValueError(f"{path} was saved by {world} ranks; this launch has {env.world_size}: run "
                             f"`moe-train ckpt canonical` with {world} ranks, or with no launcher")
        _convert_rank(str(path), cpu=False)
    else:
        _spawn_convert(path, world, timeout_s or meta["config"]["parallel"].get("timeout_s", 600) + 300)
    out = path / DIRNAME
    problems = verify(out)
    if problems:
        raise ckpt.CheckpointError(f"{out} was written but fails verification: {problems[0]}")
    return out


def _convert_rank(path: str, cpu: bool) -> None:
    """One rank of ``convert``: the engine at the saved layout, the engine checkpoint
    loaded exactly (weights, ZeRO partitions), then ``save``."""
    from moe_train.config import config_from_dict
    from moe_train.engine import build_engine
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train import build_model

    meta = ckpt.read_meta(Path(path))
    cfg = config_from_dict(meta["config"])
    if cpu:
        cfg.parallel.device, cfg.parallel.backend = "cpu", "gloo"
    created = not dist.is_initialized()
    env, device = init_distributed(cfg.parallel.device, cfg.parallel.backend, cfg.parallel.timeout_s,
                                   always_group=True)
    try:
        topo = Topology(env.world_size, meta["topology"]["ep_size"], meta["topology"]["num_experts"])
        groups = build_groups(topo, env.rank)
        model = build_model(cfg, groups, device)
        ckpt.load_model_weights(Path(path), model, topo, env.rank)
        engine = build_engine(cfg, model, groups)
        saved = ckpt.load_rank_state(Path(path), env.rank)
        ckpt.load_optimizer_state(engine.optimizer, saved["optimizer"], topo.world_size)
        canonical.save(path, model=engine.module, optimizer=engine.optimizer,
                       state=ckpt.TrainState(**meta["train_state"]), groups=groups, config=meta["config"])
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _convert_worker(rank: int, world: int, port: int, path: str, result: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        _convert_rank(path, cpu=True)
        Path(result).write_text("ok")
    except BaseException as err:  # the parent reports the first rank's failure
        Path(result).write_text(canonical._first_line(err))


def _spawn_convert(path: Path, world: int, timeout_s: float) -> None:
    import tempfile

    from moe_train.parallel.spawn import free_local_port, run_local_processes

    port = free_local_port()
    with tempfile.TemporaryDirectory() as out:
        results = [os.path.join(out, f"rank{r}") for r in range(world)]
        codes = run_local_processes(_convert_worker, [(r, world, port, str(path), results[r]) for r in range(world)],
                                    timeout_s)
        for rank, res in enumerate(results):
            text = Path(res).read_text() if os.path.exists(res) else (
                f"no result (exit code {codes[rank]})" if codes[rank] is not None
                else f"still running after {timeout_s:.0f} s; killed")
            if text != "ok":
                raise ckpt.CheckpointError(
                    f"converting {path} to a canonical checkpoint: rank {rank} of {world} (gloo, CPU) failed: "
                    f"{text}. If the saved layout cannot run on this CPU (e.g. fp16), run the conversion on "
                    f"the devices it was trained on: torchrun --nproc_per_node {world} -m moe_train ckpt "
                    f"canonical {path}")
