"""Engine checkpoint in, canonical checkpoint out: ``moe-train ckpt canonical PATH``.

The ZeRO partitions of an engine checkpoint can be read only at the layout they were
saved at, so the conversion runs that layout (the saved number of ranks: under a
launcher, or as gloo processes on this machine's CPU), loads the engine checkpoint
exactly and writes ``PATH/canonical`` (``moe_train.checkpoint.canonical``), which resumes
at any world size, ep and ZeRO stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import moe_train.checkpoint.canonical as canonical
from moe_train.checkpoint.engine_format import load_model_weights, load_rank_state
from moe_train.checkpoint.optimizer_state import load_optimizer_state
from moe_train.checkpoint.resume import find_checkpoint
from moe_train.checkpoint.state import CheckpointError, TrainState, read_meta
from moe_train.checkpoint.verify import verify_checkpoint
from moe_train.config import config_from_dict
from moe_train.model.build import build_model
from moe_train.parallel.groups import build_groups
from moe_train.parallel.init import discover, init_distributed
from moe_train.parallel.spawn import free_local_port, run_local_processes
from moe_train.parallel.topology import Topology
from moe_train.train.engine import build_engine


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
    path = Path(path)
    if not (path / "meta.json").is_file():
        found = find_checkpoint(path, "auto")
        if found is None:
            raise ValueError(f"{path}: neither a checkpoint (no meta.json) nor a checkpoint.dir holding one")
        path = found
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"{path} fails verification: {problems[0]}")
    meta = read_meta(path)
    if meta.get("kind") == canonical.KIND:
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
    out = path / canonical.DIRNAME
    problems = canonical.verify(out)
    if problems:
        raise CheckpointError(f"{out} was written but fails verification: {problems[0]}")
    return out


def _convert_rank(path: str, cpu: bool) -> None:
    """One rank of ``convert``: the engine at the saved layout, the engine checkpoint
    loaded exactly (weights, ZeRO partitions), then ``save``."""
    meta = read_meta(Path(path))
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
        load_model_weights(Path(path), model, topo, env.rank)
        engine = build_engine(cfg, model, groups)
        saved = load_rank_state(Path(path), env.rank)
        load_optimizer_state(engine.optimizer, saved["optimizer"], topo.world_size)
        canonical.save(path, model=engine.module, optimizer=engine.optimizer,
                       state=TrainState(**meta["train_state"]), groups=groups, config=meta["config"])
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
        Path(result).write_text(canonical.one_line_error(err))


def _spawn_convert(path: Path, world: int, timeout_s: float) -> None:
    import tempfile

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
                raise CheckpointError(
                    f"converting {path} to a canonical checkpoint: rank {rank} of {world} (gloo, CPU) failed: "
                    f"{text}. If the saved layout cannot run on this CPU (e.g. fp16), run the conversion on "
                    f"the devices it was trained on: torchrun --nproc_per_node {world} -m moe_train ckpt "
                    f"canonical {path}")
