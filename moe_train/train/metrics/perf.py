"""Memory and peak FLOP/s: what ``mem/*`` and ``perf/mfu`` are measured against."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Optional

import torch

PEAK_FLOPS_ENV = "MOE_TRAIN_PEAK_FLOPS"


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
    # Its own generator: the measurement runs after a resume restored the RNG state, and a
    # draw from the global generator there would shift router jitter and dropout of every
    # later step (the resumed run would no longer repeat the uninterrupted one).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
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
