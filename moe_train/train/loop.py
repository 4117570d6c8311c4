"""The training loop: config -> distributed -> topology -> model -> engine -> data -> loop.

    python -m moe_train train --config configs/tiny_moe.yaml [--set a.b=c] [--resume auto|PATH|none]

runs as one process, under torchrun, the deepspeed launcher, srun or mpirun (rank
discovery in ``moe_train.parallel.init``). Each concern lives in its own place: the step
(``step.train_step``), the evaluation (``evaluate``), the schedule (``schedule``),
metrics (``metrics``), DeepSpeed (``engine``), checkpoints and which one to resume
(``moe_train.checkpoint``), stop requests (``control``), test faults (``faults``).

Seams for launchers: ``StopRequest.request()`` (from a signal handler, say) makes every
rank stop after the current step, write one complete checkpoint and return
``TrainResult.stopped = True``; the agreement costs one small all-reduce per step.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

import moe_train.checkpoint.canonical as canonical
from moe_train.checkpoint.engine_format import load_model_weights, load_rank_state, save_checkpoint
from moe_train.checkpoint.optimizer_state import load_optimizer_state
import moe_train.checkpoint.resume as resume_choice
from moe_train.checkpoint.rng import reseed, set_rng_state
from moe_train.checkpoint.state import LATEST, CheckpointError, TrainState, agree, read_meta
from moe_train.config import (Config, check_vocab_fits, config_to_dict, default_run_name, dump_config,
                              validate)
from moe_train.data import build_train_loader, build_val_loader
from moe_train.model.build import build_model
from moe_train.model.sizing import flops_per_token, human_count, param_counts
from moe_train.moe.balance import update_selection_biases
from moe_train.parallel.groups import ParallelGroups, build_groups
from moe_train.parallel.init import DistEnv, discover, init_distributed
from moe_train.parallel.phase import PHASE, Watchdog
from moe_train.parallel.topology import Topology
from moe_train.train.control import StopRequest, TimeLimit, install_stop_signals, slurm_job_end
import moe_train.train.determinism as determinism
from moe_train.train.engine import DTYPES, Engine, build_engine
from moe_train.train.evaluate import evaluate
from moe_train.train.faults import NO_FAULTS, Faults
from moe_train.train.metrics import (MetricsWriter, RoutingMonitor, StepTimer, format_console_line,
                                     measure_peak_flops, memory_tag, moe_metrics, peak_memory_bytes, reduce_mean)
from moe_train.train.step import StepOut, train_step

log = logging.getLogger("moe_train.train")


@dataclass
class TrainResult:
    """What a run did (rank-local view; losses are the rank-averaged lm losses of every
    step taken in this process, skipped steps as NaN)."""

    final_step: int
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, Optional[float]] = field(default_factory=dict)
    batch_digests: dict[int, int] = field(default_factory=dict)  # this rank's input ids, hashed
    stopped: bool = False
    state: Optional[dict] = None  # with keep_state: final parameters by name (CPU)
    checkpoint: Optional[str] = None
    skipped_steps: int = 0


# -------------------------------------------------------------------------- setup


def seed_everything(seed: int, rank: int) -> None:
    """Dense weights need the same draw on every rank (seeded alike); data order and
    jitter are seeded per (seed, rank) after the model is built."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + 1000003 * rank)


def _broadcast_choice(value, env: DistEnv):
    """Rank 0's value on every rank (so all ranks resume from the same checkpoint)."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


def startup_report(cfg: Config, env: DistEnv, topo: Topology, engine: Engine, device,
                   resumed: Optional[Path]) -> str:
    counts = param_counts(cfg.model, cfg.moe)
    lines = [f"# launch: ranks from the {env.source} environment; rendezvous "
             f"{os.environ.get('MASTER_ADDR', env.master_addr)}:{os.environ.get('MASTER_PORT', env.master_port)}",
             "# topology", *topo.describe(),
             f"device {device}, backend {dist.get_backend() if dist.is_initialized() else 'none'}, "
             f"dtype {cfg.train.dtype}, ZeRO stage {cfg.parallel.zero_stage}",
             "# parameters",
             f"total {human_count(counts.total)} = dense {human_count(counts.dense)} + experts "
             f"{human_count(counts.expert)}; active per token {human_count(counts.active_per_token)}",
             "# deepspeed config", str(engine.ds_config),
             f"# resume: {resumed if resumed else 'fresh start'}"]
    return "\n".join(lines)


# -------------------------------------------------------------------------- run


class _Run:
    """The state one ``train`` call threads through its helpers."""

    def __init__(self, cfg: Config, env: DistEnv, device, groups: ParallelGroups, plan, faults: Faults):
        self.cfg, self.env, self.device, self.groups, self.plan = cfg, env, device, groups, plan
        self.faults = faults
        self.rank = env.rank
        self.writer = MetricsWriter(None, False)  # opened in _setup, once the run folder is known
        self.timer = StepTimer()
        self.layer_ids = [i for i in range(cfg.model.num_layers) if cfg.model.is_moe_block(i)]
        self.flops_per_token = flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len)
        self.peak_flops = None
        self.determinism = determinism.Determinism(False)

    def print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


def _log_step(run: _Run, step: int, out: StepOut, lr: float, state: TrainState) -> None:
    """Reduces and writes the metrics of ``step`` (a collective: every rank calls it)."""
    cfg = run.cfg
    losses = reduce_mean(out.loss_parts, run.groups.dp)
    moe_scalars, hists = moe_metrics(out.moe_stats, run.layer_ids, run.groups.dp)
    window = run.timer.window(cfg.train.max_steps - step)
    values = {"train/" + k: v for k, v in losses.items()}
    values.update({"train/lr": lr, "train/skipped_steps": state.skipped_steps,
                   "train/tokens_seen": state.tokens_seen})
    if out.grad_norm is not None:
        values["train/grad_norm"] = out.grad_norm
    if window:
        values["perf/tokens_per_s"] = window["tokens_per_s"]
        values["perf/step_time_s"] = window["step_time_s"]
        if run.peak_flops:
            achieved = window["tokens_per_s"] * run.flops_per_token / run.env.world_size
            values["perf/mfu"] = achieved / run.peak_flops
    values[memory_tag(run.device)] = peak_memory_bytes(run.device)
    values.update(moe_scalars)
    values.update(run.routing.check(run.groups.dp))  # [routing] health + alarms (a collective)
    for line in run.routing.alarms:
        run.print(f"ROUTING ALARM step {step}: {line}")
    run.writer.scalars(step, values)
    for tag, counts in hists.items():
        run.writer.histogram(tag, counts, step)
    console = {**losses, "lr": lr, "grad_norm": out.grad_norm, **window,
               "drop_frac": moe_scalars.get("moe/mean/drop_frac"), "load_cv": moe_scalars.get("moe/mean/load_cv")}
    run.print(format_console_line(step, cfg.train.max_steps,
                                  {k: v for k, v in console.items() if v is not None}))


def _save(run: _Run, engine: Engine, state: TrainState, loader, with_canonical: bool = False) -> Optional[Path]:
    """A collective checkpoint, with its canonical checkpoint (any layout) beside it when
    ``with_canonical``; a failed save is logged and training goes on (the previous
    checkpoint stays the one to resume from; a failed canonical save leaves the engine
    checkpoint of the step complete)."""
    cfg = run.cfg
    loader_state = loader.state_dict()
    if run.env.world_size > 1:
        states: list = [None] * run.env.world_size
        dist.all_gather_object(states, loader_state)
    else:
        states = [loader_state]
    state.loader_states = states
    try:
        path = save_checkpoint(cfg.checkpoint.dir, model=engine.module, optimizer=engine.optimizer,
                               state=state, topo=run.groups.topology, rank=run.rank,
                               config=config_to_dict(cfg), keep_last=cfg.checkpoint.keep_last,
                               fault_hook=run.faults.save_hook(state.step, run.rank))
    except CheckpointError as err:
        run.print(f"ERROR: {err}")
        return None
    run.print(f"checkpoint step {state.step} -> {path}")
    if with_canonical:
        try:
            written = canonical.save(path, model=engine.module, optimizer=engine.optimizer, state=state,
                                     groups=run.groups, config=config_to_dict(cfg))
            run.print(f"canonical checkpoint step {state.step} -> {written}")
        except CheckpointError as err:
            run.print(f"ERROR: {err}")
    return path


def _restore(run: _Run, source: resume_choice.ResumeSource, engine: Engine, loader, state: TrainState,
             loaded: Optional[canonical.Loaded], rank_state: Optional[dict]) -> None:
    """Optimizer, RNG and data position after the weights (loaded before the engine)."""
    path, meta = source.path, read_meta(source.path)
    saved = meta["train_state"]
    state.step, state.tokens_seen, state.skipped_steps = saved["step"], saved["tokens_seen"], saved["skipped_steps"]
    state.run_name = saved.get("run_name", "")  # its TensorBoard folder, continued
    topo, cfg = run.groups.topology, run.cfg
    here = f"world {topo.world_size}, ep {topo.ep_size}, ZeRO {cfg.parallel.zero_stage}, {cfg.train.dtype}"
    if source.kind == "engine":
        load_optimizer_state(engine.optimizer, rank_state["optimizer"], topo.world_size)
        set_rng_state(rank_state["rng"])
        loader.load_state_dict(saved["loader_states"][run.rank])
        run.print(f"resumed from {path} at step {state.step}: weights, optimizer, RNG and data position")
    elif source.kind == "canonical":
        summary = canonical.restore_optimizer(engine.optimizer, engine.module, loaded)
        reseed(cfg.train.seed, state.step, run.rank)
        same_world = len(saved["loader_states"]) == topo.world_size
        loader.load_state_dict(saved["loader_states"][run.rank if same_world else 0])
        run.print(f"resumed from {path} (canonical, saved at {resume_choice.describe_layout(meta)}) on {here} at step "
                  f"{state.step}: every fp32 master, AdamW moment and step by parameter name, experts by "
                  f"global id, checked against the manifest ({summary}); RNG re-derived from (seed "
                  f"{cfg.train.seed}, step {state.step}, rank); data position "
                  f"{'continued' if same_world else f're-split over {topo.world_size} ranks'}")
    elif source.kind == "weights":
        if saved["loader_states"]:
            loader.load_state_dict(saved["loader_states"][0])
        run.print(f"resumed from {path} at step {state.step}: a weights-only checkpoint "
                  f"({meta.get('origin', 'no origin recorded')}): every weight loaded and verified; the "
                  f"optimizer state starts fresh; data position "
                  f"{'continued' if saved['loader_states'] else 'starts at the beginning'}")
    else:  # "fresh_optimizer": asked for with checkpoint.fresh_optimizer_on_new_layout
        loader.load_state_dict(saved["loader_states"][0])
        run.print(f"WARNING: resumed from {path} (saved at {resume_choice.describe_layout(meta)}) on {here}: weights "
                  f"loaded by global expert id; the optimizer state (AdamW moments and step counts) was NOT "
                  f"loaded and starts fresh (checkpoint.fresh_optimizer_on_new_layout); RNG re-seeded; the "
                  f"data loader re-split the rest of the epoch")


def train(cfg: Config, resume: str = "auto", stop: Optional[StopRequest] = None,
          loaders=None, keep_state: bool = False, faults: Faults = NO_FAULTS) -> TrainResult:
    """Trains until ``train.max_steps`` (or a stop request); returns what happened.

    Args:
        resume: "auto", "none" or a checkpoint path (``moe_train.checkpoint.resume.choose_resume``).
        stop: set it (e.g. from a signal handler) to stop and checkpoint at the next step.
        loaders: ``(rank, world) -> (train_loader, val_loader or None)`` replacing the
            streaming loaders (tests feed identical global batches to different layouts).
        keep_state: return this rank's final parameters in ``TrainResult.state``.
        faults: test faults to inject (``moe_train.train.faults``); none by default.
    """
    stop = stop or StopRequest()
    env = discover()
    plan = validate(cfg, env.world_size)  # a bad config fails here, before any process group
    PHASE.rank = env.rank
    if threading.current_thread() is threading.main_thread():
        install_stop_signals(stop, env.rank)
    PHASE.enter("process-group start-up (rendezvous with every rank)", kind="startup")
    budgets = cfg.parallel.budgets()
    watchdog = Watchdog(budgets).start()
    env, device = init_distributed(cfg.parallel.device, cfg.parallel.backend, int(budgets.collective_s),
                                   env=env, always_group=True)
    det = determinism.configure(cfg.train.deterministic, device)
    try:
        topo = Topology(env.world_size, cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
        groups = build_groups(topo, env.rank)
        run = _Run(cfg, env, device, groups, plan, faults)
        run.determinism = det
        if loaders is None:
            def loaders(rank, world):
                return (build_train_loader(cfg.data, rank, world),
                        build_val_loader(cfg.data, rank, world) if cfg.train.eval_every else None)
        return _train(run, resume, stop, loaders, keep_state)
    finally:
        determinism.restore(det)
        watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _report_skip(run: _Run, state: TrainState, in_a_row: int, last_saved) -> None:
    """Warns about a skipped step; too many in a row end the run naming the step."""
    limit = run.cfg.train.max_skipped_in_a_row
    run.print(f"WARNING: step {state.step}: non-finite loss or gradient; step skipped "
              f"({in_a_row} in a row, {state.skipped_steps} in all)")
    if in_a_row >= limit:
        raise RuntimeError(f"step {state.step}: {in_a_row} non-finite steps in a row "
                           f"(train.max_skipped_in_a_row = {limit}); stopping without checkpointing "
                           f"the non-finite state; the last checkpoint is {last_saved or 'none from this run'}")


def _last_good(run: _Run) -> str:
    """The checkpoint a resume would start from now: what ``latest`` names."""
    pointer = Path(run.cfg.checkpoint.dir) / LATEST
    try:
        return str(pointer.parent / pointer.read_text().strip())
    except OSError:
        return f"none (no {pointer})"


def _after_failed_save(run: _Run, state: TrainState, in_a_row: int, stop: Optional[StopRequest]) -> None:
    """A failed save (already reported, its half-written directory removed) lets training
    go on, except when it was the last chance: a stop's checkpoint, the final step's, or
    ``checkpoint.max_failed_saves`` failures in a row. Those raise ``CheckpointError`` on
    every rank (``moe-train train`` exits 3)."""
    limit = run.cfg.checkpoint.max_failed_saves
    if stop is not None:
        why = f"stop requested ({stop.reason or 'another rank'}) but the checkpoint of step {state.step} failed"
    elif state.step == run.cfg.train.max_steps:
        why = f"the FINAL checkpoint (step {state.step}) failed, so the last steps are not saved"
    elif in_a_row >= limit:
        why = (f"{in_a_row} checkpoint saves in a row failed (checkpoint.max_failed_saves = {limit}); stopping "
               f"at step {state.step} rather than training on without checkpoints")
    else:
        run.print(f"WARNING: training goes on without the checkpoint of step {state.step} ({in_a_row} failed in "
                  f"a row; the run stops at checkpoint.max_failed_saves = {limit}); the last good "
                  f"checkpoint is {_last_good(run)}")
        return
    raise CheckpointError(f"{why}; the last good checkpoint is {_last_good(run)} (free space or fix "
                          f"checkpoint.dir, then resume with --resume auto)")


def _resume_source(run: _Run, resume: str, exclude: tuple = ()) -> Optional[resume_choice.ResumeSource]:
    """Rank 0 chooses the checkpoint and how to load it (``resume_choice.choose_resume``),
    checking presence and sizes only: reading every rank's files would cost rank 0 time
    in proportion to the whole checkpoint while all others wait; each rank checks the
    tensors it loads instead (``_load_source``). Every rank gets the choice, or raises
    rank 0's refusal (none waits for a rank that failed)."""
    choice = None
    if run.env.rank == 0:
        try:
            choice = resume_choice.choose_resume(run.cfg.checkpoint.dir, resume, run.groups.topology,
                                                 config_to_dict(run.cfg), checksums=False, exclude=exclude)
        except CheckpointError as err:
            choice = str(err)
    choice = _broadcast_choice(choice, run.env)
    if isinstance(choice, str):
        raise CheckpointError(choice)
    return choice


def _load_source(run: _Run, source: resume_choice.ResumeSource, model):
    """This rank's part of ``source``, every tensor compared with the manifest as it is
    read: the weights into ``model`` (before the engine exists, so ZeRO's fp32 master
    starts from them) and, for an exact resume, this rank's optimizer and RNG file.
    Returns (canonical ``Loaded`` or None, rank state or None)."""
    if source.kind == "canonical":  # any layout: the fp32 masters become the weights
        loaded = canonical.load(source.path, model, run.groups)
        canonical.apply_to_model(model, loaded)
        return loaded, None
    load_model_weights(source.path, model, run.groups.topology, run.rank)
    return None, load_rank_state(source.path, run.rank) if source.kind == "engine" else None


def _load_agreed(run: _Run, resume: str):
    """The model with the chosen checkpoint loaded on every rank, or one error on every
    rank. With ``--resume auto`` a checkpoint that fails a rank's check (a corrupted
    tensor) is skipped for the next newest, as rank 0's size check would have done."""
    exclude: list = []
    while True:
        source = _resume_source(run, resume, tuple(exclude))
        model = build_model(run.cfg, run.groups, run.device)
        if source is None:
            return None, model, None, None
        # Weights that cannot fit this config: refused on every rank alike (never skipped).
        resume_choice.check_compatible(read_meta(source.path), config_to_dict(run.cfg), source.path)
        error = None
        try:
            loaded, rank_state = _load_source(run, source, model)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - a torn file: torch.load's own error types
            error = f"rank {run.rank}: reading {source.path} failed: {type(err).__name__}: {err}"
        failed = [e for e in agree(error, run.env.world_size) if e]
        if not failed:
            return source, model, loaded, rank_state
        if resume != "auto":
            raise CheckpointError(failed[0] + (f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""))
        run.print(f"WARNING: --resume auto: skipping {source.path}: {failed[0]}")
        exclude.append(source.path)


def _setup(run: _Run, resume: str, loaders):
    """Model (weights from the checkpoint, if resuming), engine, data, and the restored
    state."""
    cfg, env, device, groups = run.cfg, run.env, run.device, run.groups
    source, model, loaded, rank_state = _load_agreed(run, resume)
    engine = build_engine(cfg, model, groups)
    run.routing = RoutingMonitor(engine.module, run.layer_ids, cfg.logging.dead_expert_steps,
                                 cfg.logging.max_drop_frac)  # [routing]
    loader, val_loader = loaders(env.rank, env.world_size)
    check_vocab_fits(cfg, loader.manifest["vocab_size"])
    state = TrainState()
    seed_everything(cfg.train.seed, env.rank)
    if source is not None:
        _restore(run, source, engine, loader, state, loaded, rank_state)
    run.print(startup_report(cfg, env, groups.topology, engine, device, source and source.path))
    state.run_name = _broadcast_choice(state.run_name or cfg.logging.run_name or default_run_name(), env)
    run.writer = MetricsWriter(cfg.logging.dir if cfg.logging.tensorboard else None, env.rank == 0, state.run_name)
    run.print(f"# TensorBoard: tensorboard --logdir {cfg.logging.dir} (this run: {state.run_name})")
    run.peak_flops = cfg.logging.peak_flops or measure_peak_flops(device, DTYPES[cfg.train.dtype], seconds=0.5)
    run.writer.text("config", "```\n" + dump_config(cfg) + "\n```", state.step)
    return engine, loader, val_loader, state


def _train(run: _Run, resume: str, stop: StopRequest, loaders, keep_state: bool) -> TrainResult:
    cfg, env, device, groups = run.cfg, run.env, run.device, run.groups
    engine, loader, val_loader, state = _setup(run, resume, loaders)
    result = TrainResult(final_step=state.step, skipped_steps=state.skipped_steps)
    batches = _endless(loader)
    in_a_row, last_saved, failed_saves = 0, None, 0
    limit = TimeLimit(slurm_job_end() if env.rank == 0 else None, cfg.train.exit_before_time_limit_min)
    try:
        run.timer.restart()
        while state.step < cfg.train.max_steps:
            state.step += 1
            PHASE.enter("data loading", state.step, kind="step")
            run.faults.before_step(state.step, env.rank, stop)
            if limit.due():
                stop.request(f"Slurm time limit in {cfg.train.exit_before_time_limit_min} min")
            out = train_step(engine, batches, cfg, groups, device, state.step, stop, run.faults)
            state.tokens_seen += run.plan.tokens_per_step
            run.timer.tick(run.plan.tokens_per_step)
            in_a_row = in_a_row + 1 if out.skipped else 0
            state.skipped_steps += int(out.skipped)
            result.losses[state.step] = float("nan") if out.skipped else out.mean_lm
            result.grad_norms[state.step] = out.grad_norm
            result.batch_digests[state.step] = out.digest
            # [routing] selection-bias update (applied steps only) and routing tallies, every step
            update_selection_biases(engine.module, groups.dp, applied=not out.skipped, step=state.step)
            if out.skipped:
                _report_skip(run, state, in_a_row, last_saved)
            lr = engine.optimizer.param_groups[0]["lr"]
            if state.step % cfg.logging.every_steps == 0 or state.step == cfg.train.max_steps:
                PHASE.enter("metrics all-reduce")
                _log_step(run, state.step, out, lr, state)
                if run.routing.alarms and cfg.train.stop_on_routing_alarm:  # [routing] every rank agrees
                    PHASE.enter("checkpoint save (routing alarm)", kind="save")
                    saved = _save(run, engine, state, loader, bool(cfg.checkpoint.canonical_every_steps))
                    raise RuntimeError(f"step {state.step}: routing alarm (train.stop_on_routing_alarm): "
                                       f"{'; '.join(run.routing.alarms)}; checkpoint {saved or 'NOT written'}")
            if val_loader is not None and state.step % cfg.train.eval_every == 0:
                PHASE.enter("evaluation", kind="eval")
                scores = evaluate(engine.module, val_loader, max_batches=cfg.train.eval_steps, group=groups.dp,
                                  device=device)
                run.writer.scalars(state.step, scores.scalars())
                run.print(f"eval step {state.step}: loss {scores.loss:.4f} ppl {scores.ppl:.2f}")
                run.timer.restart()
            last = out.stop or state.step == cfg.train.max_steps
            every, canonical_every = cfg.checkpoint.every_steps, cfg.checkpoint.canonical_every_steps
            with_canonical = bool(canonical_every) and (state.step % canonical_every == 0 or last)
            # A skipped step changed nothing, so the state is the last finite one: safe to save.
            if (every and state.step % every == 0) or with_canonical or last:
                PHASE.enter("checkpoint save", kind="save")
                saved = _save(run, engine, state, loader, with_canonical)
                last_saved = saved or last_saved
                failed_saves = 0 if saved else failed_saves + 1
                if saved is None:
                    _after_failed_save(run, state, failed_saves, stop if out.stop else None)
                run.timer.restart()
            if out.stop:
                run.print(f"stopping at step {state.step} on request ({stop.reason or 'another rank'})")
                result.stopped = True
                break
    finally:
        run.writer.close()
    result.final_step, result.skipped_steps = state.step, state.skipped_steps
    result.checkpoint = str(last_saved) if last_saved else None
    run.print(f"done: step {state.step}/{cfg.train.max_steps}, {state.tokens_seen:,} tokens, "
              f"{state.skipped_steps} skipped steps; last checkpoint {result.checkpoint}; "
              f"TensorBoard: tensorboard --logdir {cfg.logging.dir} (this run: {state.run_name})")
    if cfg.train.deterministic:
        run.print(run.determinism.report())
    if keep_state:
        result.state = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
    return result
