"""The one metrics API of the training loop: reduce, format, write.

Every rank calls the reductions (they are collectives); only the logging rank (rank 0)
holds a TensorBoard writer, so there is one event file per run, not one per rank. Values
are reduced over the right group *before* logging, and read to the host (``.item()`` /
``.tolist()``) once per log step, never on the other steps.

Tags are slash-namespaced, with units in the name where a value has one:

  train/...                  losses and optimiser values the loop logs (``reduce_mean``)
  perf/tokens_per_s          ``StepTimer.window``: tokens/s over the last log window
  perf/step_time_s           mean seconds per step over the window
  perf/mfu                   (the loop's: achieved / ``measure_peak_flops``)
  mem/peak_rss_bytes         CPU: peak resident set size of this process
  mem/max_allocated_bytes    CUDA: peak bytes allocated by tensors on the device
  moe/layer_{i}/...          ``moe_metrics``: five scalars and one histogram per MoE
                             layer, whatever the number of experts (bounded cardinality)
  moe/mean/...               the same, averaged over MoE layers
  moe/layer_{i}/maxvio, dead_experts_window, max_idle_steps, bias_min, bias_max,
  window_drop_frac, train/routing_alarms
                             ``RoutingMonitor``: routing health over whole steps
                             (every micro-batch, every rank) and alarms

Shape legend: E experts (global), L MoE layers.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moe_train.moe.balance import maxvio, moe_layers
from moe_train.moe.stats import MoEStats

PEAK_FLOPS_ENV = "MOE_TRAIN_PEAK_FLOPS"


class MetricsWriter:
    """TensorBoard writer that exists on the logging rank only.

    ``MetricsWriter(log_dir, enabled=(rank == 0))``: the ``SummaryWriter`` (and its
    event file) is created only when ``enabled`` and ``log_dir`` is set; otherwise
    every method is a no-op, so the loop calls them unconditionally on every rank.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool):
        self._writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # import only where used

            self._writer = SummaryWriter(log_dir=log_dir)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag (e.g. ``train/loss``, ``moe/layer_3/drop_frac``)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values, step: int) -> None:
        """Per-expert load histogram from per-expert token counts ``values`` [E].

        The data are the E relative loads ``count_e / mean(count)``, so the x-axis is
        "load in units of the balanced share": perfectly balanced routing is a spike of
        E experts at 1.0; dead experts sit at 0; an expert at 3.0 gets three times its
        share. Relative (not raw) loads keep the axis comparable across batch sizes,
        layers and expert counts; the y-axis counts experts. Bins are fixed edges from 0
        to max(2, max load) so successive steps are drawn on the same grid.
        """
        if self._writer is None:
            return
        counts_E = torch.as_tensor(values).detach().double().cpu().reshape(-1)
        rel_E = (counts_E / counts_E.mean().clamp_min(1e-9)).numpy()
        upper = max(2.0, float(rel_E.max()) * (1 + 1e-6))
        edges = np.linspace(0.0, upper, 41)  # 40 bins of width upper / 40
        self._writer.add_histogram(tag, rel_E, step, bins=edges)

    def text(self, tag: str, text: str, step: int) -> None:
        """Free text (resolved config, topology); stored as TensorBoard's text plugin."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes; safe to call twice (the loop calls it in ``finally``)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------------
# Reductions (collectives: every rank of ``group`` must call them, on the same steps)


def _packing_device(tensors: list[Tensor], group) -> torch.device:
    """Where to build a packed buffer: with the inputs, or on the GPU for NCCL."""
    if tensors:
        return tensors[0].device
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def moe_metrics(stats: list[MoEStats], layer_ids: list[int],
                group=None) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Per-layer MoE monitoring, reduced over ``group``.

    Each rank routes its own tokens, so the global picture is the sum of the ranks'
    counts: pass the group whose ranks together route the batch (the whole world for
    data + expert parallelism). All layers go in one packed float64 buffer (counts stay
    exact below 2**53) and one all-reduce SUM, whatever the number of layers.
    ``group=None`` means a single process: no collective.

    Args:
        stats: one ``MoEStats`` per MoE layer, in block order (same on every rank).
        layer_ids: the transformer block index of each entry of ``stats``.
        group: process group to reduce over, or None.

    Returns:
        (scalars, histograms). Scalars, per MoE layer i (block index):
          moe/layer_{i}/load_cv         population std / mean of the global routed
                                        counts per expert (0 = perfectly balanced)
          moe/layer_{i}/max_load        max expert load / mean load (1 = balanced)
          moe/layer_{i}/dead_experts    experts with no token routed to them globally
          moe/layer_{i}/drop_frac       global dropped / global assignments (K * T)
          moe/layer_{i}/router_entropy  router entropy, mean over ranks (nats)
          moe/layer_{i}/seq_loss        sequence-wise balance loss, mean over ranks
                                        (only when moe.seq_balance_coef > 0)
          moe/mean/load_cv, moe/mean/drop_frac   means over the MoE layers
        Histograms: moe/layer_{i}/expert_load -> global routed counts, float [E]
        (give it to ``MetricsWriter.histogram``). Both empty when ``stats`` is.
    """
    assert len(stats) == len(layer_ids), (len(stats), layer_ids)
    if not stats:
        return {}, {}
    device = _packing_device([s.routed_per_expert_E for s in stats], group)
    # Per layer: [routed_E..., kept total, num_assignments, router_entropy]; then 1 per
    # rank so the sum counts the ranks (for the mean entropy).
    parts = []
    for s in stats:
        parts.append(s.routed_per_expert_E.detach().to(device, torch.float64).reshape(-1))
        seq_loss = s.seq_loss if s.seq_loss is not None else torch.zeros(())
        parts.append(torch.stack([
            s.kept_per_expert_E.detach().sum().to(device, torch.float64),
            torch.tensor(float(s.num_assignments), dtype=torch.float64, device=device),
            s.router_entropy.detach().to(device, torch.float64).reshape(()),
            seq_loss.detach().to(device, torch.float64).reshape(()),
        ]))
    parts.append(torch.ones(1, dtype=torch.float64, device=device))
    packed = torch.cat(parts)
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

    num_ranks = packed[-1]
    names, values, hists = [], [], {}
    offset = 0
    for s, i in zip(stats, layer_ids):
        num_experts = s.routed_per_expert_E.numel()
        routed_E = packed[offset:offset + num_experts]
        kept, assignments, entropy_sum, seq_sum = packed[offset + num_experts:offset + num_experts + 4]
        offset += num_experts + 4
        mean = routed_E.mean().clamp_min(1e-9)
        layer_values = {
            "load_cv": routed_E.std(unbiased=False) / mean,
            "drop_frac": (routed_E.sum() - kept) / assignments.clamp_min(1.0),
            "router_entropy": entropy_sum / num_ranks,
            "max_load": routed_E.max() / mean,
            "dead_experts": (routed_E == 0).sum().to(torch.float64),
        }
        if s.seq_loss is not None and bool(s.seq_loss.ne(0)):  # only when the loss is on
            layer_values["seq_loss"] = seq_sum / num_ranks
        for key, value in layer_values.items():
            names.append(f"moe/layer_{i}/{key}")
            values.append(value)
        hists[f"moe/layer_{i}/expert_load"] = routed_E.float()
    for key in ("load_cv", "drop_frac"):
        per_layer = [v for n, v in zip(names, values) if n.endswith("/" + key)]
        names.append(f"moe/mean/{key}")
        values.append(torch.stack(per_layer).mean())
    host = torch.stack(values).tolist()  # the one device-to-host sync
    return dict(zip(names, host)), hists


class RoutingMonitor:
    """Routing health over whole optimizer steps, and the alarms (MOE_REFERENCE.md,
    "Selection bias"; issue "Routing beyond the peers").

    Reads the layers' ``RoutingTally`` (every training micro-batch of a step, this
    rank), which ``moe_train.moe.balance.update_selection_biases`` closes after every
    step. ``check`` is a collective on log steps only: one float64 all-reduce SUM
    (counts, drops) and one MIN (idle streaks), whatever the number of layers.

    Args:
        model: the model (``engine.module``).
        layer_ids: block index of each MoE layer, in order.
        dead_expert_steps: ``logging.dead_expert_steps`` (0: no dead-expert alarm).
        max_drop_frac: ``logging.max_drop_frac`` (None: no drop alarm).
    Attributes:
        num_alarms: alarms raised so far (``train/routing_alarms``).
        alarms: the alarm lines of the last ``check``.
    """

    def __init__(self, model, layer_ids: list[int], dead_expert_steps: int, max_drop_frac: Optional[float]):
        self.layers = moe_layers(model)
        # A layer shared by several blocks (model.share_layers) has one tally for all its
        # uses; it is named by the first block that uses it (``block_ids``, set by the model).
        uses = [getattr(m, "block_ids", None) for m in self.layers]
        if all(uses) and sorted(i for u in uses for i in u) == sorted(layer_ids):
            layer_ids = [u[0] for u in uses]
        assert len(self.layers) == len(layer_ids), (len(self.layers), layer_ids)
        self.layer_ids, self.dead_expert_steps, self.max_drop_frac = layer_ids, dead_expert_steps, max_drop_frac
        self.num_alarms, self.alarms = 0, []

    def check(self, group=None) -> dict[str, float]:
        """Scalars per MoE layer i, reduced over ``group`` (all ranks must call it):

          moe/layer_{i}/maxvio              (max c - mean c) / mean c of the last step's
                                            counts c (all micro-batches, all ranks)
          moe/layer_{i}/dead_experts_window experts no rank routed a token to in the last
                                            ``dead_expert_steps`` steps (with that > 0)
          moe/layer_{i}/max_idle_steps      the longest such streak so far (steps)
          moe/layer_{i}/window_drop_frac    dropped / assignments since the last check
          moe/layer_{i}/bias_min, bias_max  the selection bias (when on)
          moe/mean/maxvio                   mean over the layers
          train/routing_alarms              alarms so far
        Sets ``alarms`` (one line per layer and reason) and counts them.
        """
        if not self.layers:
            return {}
        device = self.layers[0].router.w_DE.device
        sums, idles = [], []
        for layer in self.layers:
            tally = layer.tally
            tally.step_counts(device)  # allocates the tally's tensors if no step has run yet
            last_E = tally.last_routed_E
            dropped, assignments = tally.take_window()
            sums += [last_E.to(device, torch.float64), torch.stack([dropped, assignments]).to(device, torch.float64)]
            idles.append(tally.idle_steps_E.to(device, torch.float64))
        packed, idle_min = torch.cat(sums), torch.cat(idles)
        if group is not None:  # counts add up over ranks; an expert idles globally as
            # long as its shortest per-rank streak
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(idle_min, op=dist.ReduceOp.MIN, group=group)
        return self._summarise(packed, idle_min)

    def _summarise(self, packed: Tensor, idle_min: Tensor) -> dict[str, float]:
        values, self.alarms = {}, []
        offset = idle_offset = 0
        for layer, i in zip(self.layers, self.layer_ids):
            E = layer.tally.num_experts
            counts_E = packed[offset:offset + E]
            dropped, assignments = packed[offset + E:offset + E + 2].tolist()
            idle_E = idle_min[idle_offset:idle_offset + E]
            offset, idle_offset = offset + E + 2, idle_offset + E
            values[f"moe/layer_{i}/maxvio"] = float(maxvio(counts_E))
            values[f"moe/layer_{i}/max_idle_steps"] = float(idle_E.max())
            values[f"moe/layer_{i}/window_drop_frac"] = dropped / max(assignments, 1.0)
            if self.dead_expert_steps:
                dead = (idle_E >= self.dead_expert_steps).nonzero().flatten().tolist()
                values[f"moe/layer_{i}/dead_experts_window"] = float(len(dead))
                if dead:
                    self.alarms.append(f"MoE layer {i}: experts {dead} received no token for "
                                       f">= {self.dead_expert_steps} steps (logging.dead_expert_steps)")
            frac = values[f"moe/layer_{i}/window_drop_frac"]
            if self.max_drop_frac is not None and assignments > 0 and frac > self.max_drop_frac:
                self.alarms.append(f"MoE layer {i}: drop fraction {frac:.3f} over the last log window "
                                   f"is above logging.max_drop_frac = {self.max_drop_frac}")
            bias = layer.router.expert_bias
            if bias is not None:
                values[f"moe/layer_{i}/bias_min"] = float(bias.min())
                values[f"moe/layer_{i}/bias_max"] = float(bias.max())
        values["moe/mean/maxvio"] = sum(values[f"moe/layer_{i}/maxvio"] for i in self.layer_ids) / len(self.layer_ids)
        self.num_alarms += len(self.alarms)
        values["train/routing_alarms"] = float(self.num_alarms)
        return values


def reduce_mean(values: dict[str, Union[Tensor, float]], group=None) -> dict[str, float]:
    """Means of scalar metrics (losses, grad norm) over ``group`` in one all-reduce.

    Every rank of ``group`` must call it with the same keys in the same order.
    ``group=None``: a single process, the values as floats.
    """
    if not values:
        return {}
    tensors = [v for v in values.values() if isinstance(v, Tensor)]
    device = _packing_device(tensors, group)
    packed = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(())
                          for v in values.values()])
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed / dist.get_world_size(group)
    return dict(zip(values.keys(), packed.tolist()))


# ---------------------------------------------------------------------------------------
# Memory and peak FLOP/s


def memory_tag(device: torch.device) -> str:
    """Tag for ``peak_memory_bytes``: two tags, not one, because the two numbers are
    different quantities (all resident memory of the process vs. tensor allocations on
    the GPU) and must not be drawn as one curve."""
    return "mem/max_allocated_bytes" if device.type == "cuda" else "mem/peak_rss_bytes"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``torch.cuda.max_memory_allocated`` (bytes, since start or last reset).
    Otherwise: peak resident set size of this process (``ru_maxrss``: KiB on Linux,
    bytes on macOS). Per rank; the loop logs the logging rank's."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s. fp32 means
# TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``); checked in this order, so
# the more specific names come first (GH200 contains "h200").
_CUDA_PEAKS = [
    ("h100 pcie", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 378e12}),
    ("h200", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494.7e12}),
    ("h100", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494.7e12}),
    ("a100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12}),
]


def table_peak_flops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Datasheet dense peak for a CUDA device name and dtype, or None if unknown."""
    name = device_name.lower()
    for key, peaks in _CUDA_PEAKS:
        if key in name:
            return peaks.get(dtype)
    return None


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: kernel selection, caches, clocks
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters % 4 == 0 or device.type == "cpu":
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * n ** 3 * iters / elapsed


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Peak FLOP/s that MFU is computed against.

    In order: the ``MOE_TRAIN_PEAK_FLOPS`` environment variable (a float, FLOP/s, per
    device); on CUDA, the datasheet dense peak of a known device (H100/H200 SXM bf16
    989e12, A100 bf16 312e12; fp32 = TF32 figures); otherwise a *measured achievable*
    peak: a square matmul (1024 on CPU, 8192 on GPU) in ``dtype`` timed for about
    ``seconds`` after a warm-up, with the thread count training uses. A measured peak is
    below the datasheet number, so a CPU MFU reads higher than a GPU one would.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r}: expected FLOP/s as a number, "
                             "e.g. 989e12") from None
    if device.type == "cuda":
        peak = table_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    return _measure_matmul_flops(device, dtype, seconds)


# ---------------------------------------------------------------------------------------
# Throughput and the console line


class StepTimer:
    """Tokens/s, seconds per step and ETA over the current log window.

    Call ``tick(num_tokens)`` after every step and ``window(steps_left)`` on log steps.
    Wall time is measured between ticks; on CUDA a single step's wall time means little
    (kernels run asynchronously), but the log step's ``.item()`` synchronises, so a
    whole window's time is right. Call ``restart()`` after work that is not training
    (eval, checkpoint) so it is not counted as step time.
    """

    def __init__(self):
        self.restart()
        self._reset_window()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def _reset_window(self) -> None:
        self._seconds, self._steps, self._tokens = 0.0, 0, 0

    def tick(self, num_tokens: int) -> float:
        """Ends a step of ``num_tokens`` (global) tokens; returns its wall seconds."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._seconds += dt
        self._steps += 1
        self._tokens += num_tokens
        return dt

    def window(self, steps_left: int) -> dict[str, float]:
        """``tokens_per_s``, ``step_time_s`` (mean) and ``eta_s`` of the window since
        the last call, then starts a new window. Empty if no step was ticked."""
        if self._steps == 0:
            return {}
        step_time = self._seconds / self._steps
        out = {"tokens_per_s": self._tokens / max(self._seconds, 1e-9),
               "step_time_s": step_time,
               "eta_s": step_time * max(steps_left, 0)}
        self._reset_window()
        return out


def format_eta(seconds: Optional[float]) -> str:
    """``1h02m`` from an hour on, ``4m05s`` below it; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_console_line(step: int, max_steps: int, values: dict) -> str:
    """One console line per log step, fields separated by `` | ``:

    ``step   30/100 | loss 4.1234 (lm 4.1000 aux 1.0123 z 0.2345) | lr 3.00e-04 |
    gnorm 0.812 | 12,345 tok/s | 0.210 s/step | drop 0.012 | load_cv 0.231 | eta 0m15s``

    Always starts with ``step <n>/<total>`` (n right-aligned to the width of total); the
    other fields come from ``values`` keys loss, lm_loss, aux_loss, z_loss, lr,
    grad_norm, tokens_per_s, step_time_s, drop_frac, load_cv, eta_s, and a missing key
    leaves its field out. Parse with e.g. ``r"^step\\s+(\\d+)/(\\d+) .*\\blm (\\S+)"``.
    """
    width = len(str(max_steps))
    fields = [f"step {step:>{width}}/{max_steps}"]
    parts = [f"{label} {values[key]:.4f}" for key, label in
             (("lm_loss", "lm"), ("aux_loss", "aux"), ("z_loss", "z")) if key in values]
    if "loss" in values:
        fields.append(f"loss {values['loss']:.4f}" + (f" ({' '.join(parts)})" if parts else ""))
    elif parts:
        fields.append(" ".join(parts))
    formats = [("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
               ("tokens_per_s", "{:,.0f} tok/s"), ("step_time_s", "{:.3f} s/step"),
               ("drop_frac", "drop {:.3f}"), ("load_cv", "load_cv {:.3f}")]
    fields += [fmt.format(values[key]) for key, fmt in formats if key in values]
    if "eta_s" in values:
        fields.append(f"eta {format_eta(values['eta_s'])}")
    return " | ".join(fields)
