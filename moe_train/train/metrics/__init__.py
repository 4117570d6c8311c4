"""The one metrics API of the training loop: reduce, format, write, split by job:
``writer`` (TensorBoard, logging rank only), ``reduce`` (losses and MoE metrics: the
collectives), ``routing`` (routing health and alarms), ``perf`` (memory, peak FLOP/s),
``console`` (throughput window, the console line).

Every rank calls the reductions (they are collectives); only the logging rank (rank 0)
holds a TensorBoard writer, so there is one event file per run, not one per rank. Values
are reduced over the right group *before* logging, and read to the host (``.item()`` /
``.tolist()``) once per log step, never on the other steps.

Tags are slash-namespaced, with units in the name where a value has one:

  train/...                  losses and optimiser values the loop logs (``reduce_mean``)
  perf/tokens_per_s          ``console.StepTimer.window``: tokens/s over the last log window
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

May import: ``moe_train.moe`` (the layers' statistics and routing tallies); nothing else
of ``train``, so the loop, benchmarks and tests can use it alone.
"""

from moe_train.train.metrics.console import StepTimer, format_console_line, format_eta
from moe_train.train.metrics.perf import (PEAK_FLOPS_ENV, measure_peak_flops, memory_tag, peak_memory_bytes,
                                          table_peak_flops)
from moe_train.train.metrics.reduce import moe_metrics, reduce_mean
from moe_train.train.metrics.routing import RoutingMonitor
from moe_train.train.metrics.writer import MetricsWriter

__all__ = ["PEAK_FLOPS_ENV", "MetricsWriter", "RoutingMonitor", "StepTimer", "format_console_line", "format_eta",
           "measure_peak_flops", "memory_tag", "moe_metrics", "peak_memory_bytes", "reduce_mean", "table_peak_flops"]
