"""Stacked expert weights and the grouped expert MLP.

Shape legend:
  N  rows for the local experts, grouped by expert (contiguous runs)
  D  model width      F  expert hidden width
  E  local experts    M  rows per expert in the padded layout (the busiest expert)

The experts see rows already grouped by local expert: rows [0, n_0) belong to expert 0,
[n_0, n_0 + n_1) to expert 1, and so on. Three kernels compute the same math:

  "bmm"         scatter the rows into a zero-padded [E, M, D] buffer (a free view when
                every expert has the same count), run torch.bmm, gather back. Padding
                rows are zeros, so they add nothing to the weight gradients.
  "grouped_mm"  torch._grouped_mm with offs = cumulative counts (int32): no padding, but
                on CPU it is a loop of at::mm, slow for small groups.
  "auto"        "grouped_mm" when the widths meet its alignment (below) in the input
                dtype, else "bmm". Chosen once per (device type, dtype, alignment) and
                cached on the module (``resolved_impl``), never from a batch's counts:
                bmm and _grouped_mm round differently, and a choice per batch (as
                "auto" once made: bmm when every expert had the same count) made an
                expert's output for the same rows depend on the OTHER experts' counts.
                The one batch-dependent case is N = 0, which always runs bmm: its
                output is empty, so no number changes.

Measured on 2 CPU cores, fp32, n = 128 rows per expert, D = 512, F = 256 or 512: bmm
runs at ~120 GF/s in forward, dX and dW, _grouped_mm (one 2-thread at::mm per group) at
~95-110 GF/s; a padded bmm with realistic router counts (capacity 1.25, 25% padding)
lost to _grouped_mm on the same rows. "auto" therefore takes _grouped_mm, giving up
bmm's small lead on exactly equal counts, which real routing rarely produces.
_grouped_mm's own backward (dX by grouped_mm on w^T views, dW by the 2-D x 2-D form on
x^T) runs at forward speed, so no custom autograd.Function is needed. CPU _grouped_mm
takes fp32 and bf16, int32 offs, needs 16-byte row strides, leaves rows past offs[-1]
uninitialised, accepts decreasing or out-of-range offs without a check, and rejects
expanded (stride-0) gradients; hence _ContiguousGrad and the check that the counts sum
to N.

On CUDA, _grouped_mm has a fused fast path for bf16 on SM90 and newer; other dtypes and
GPUs take PyTorch's per-group fallback (pytorch PRs 161407, 162059), the same loop as on
CPU, so the same choice applies. No GPU was available to measure that here. On CPU (and
in that fallback) _grouped_mm is one matmul per expert over its own rows, so an expert's
output for given rows does not depend on the other experts' counts (tested on CPU in
tests/test_experts.py; the fused CUDA path is unchecked); padded bmm makes no such
promise (its row count is the busiest expert's).

Expert weights are drawn per GLOBAL expert id (``expert_seed``), so the model is the
same whatever the expert-parallel split is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from moe_train.moe.config import ACTIVATIONS, EXPERT_IMPLS as IMPLS


def expert_seed(base_seed: int, global_expert_id: int) -> int:
    """Seed of the generator that draws global expert ``global_expert_id``'s weights.

    Deterministic and distinct per expert for a given base seed (a 64-bit mix of the
    two; distinct ids give distinct seeds because the map is a bijection of the id for a
    fixed base seed).

    Args:
        base_seed: the model's expert seed (``moe.seed``).
        global_expert_id: g in [0, E_global).
    Returns:
        a non-negative int < 2**63 for ``torch.Generator.manual_seed``.
    """
    if global_expert_id < 0:
        raise ValueError(f"global_expert_id = {global_expert_id}: must be >= 0")
    mask = (1 << 63) - 1
    # splitmix64-style finaliser of (base, id); odd multipliers keep it a bijection in id.
    z = (base_seed * 0x9E3779B97F4A7C15 + global_expert_id * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 31)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 29)


class _RowsToPadded(torch.autograd.Function):
    """x_ND -> x_PD with P = E * M rows: row i goes to dest_N[i]; other rows are zero.

    Both directions are index_copy / index_select (a permutation with holes), so the
    backward never needs a scatter-add."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, dest_N: Tensor, num_rows: int) -> Tensor:
        ctx.save_for_backward(dest_N)
        x_PD = x_ND.new_zeros((num_rows, x_ND.shape[1]))
        return x_PD.index_copy_(0, dest_N, x_ND)

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        (dest_N,) = ctx.saved_tensors
        return grad_PD.index_select(0, dest_N), None, None


class _PaddedToRows(torch.autograd.Function):
    """y_PD -> y_ND = y_PD[dest_N]; backward puts the gradient back, zeros elsewhere."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, dest_N: Tensor) -> Tensor:
        ctx.save_for_backward(dest_N)
        ctx.num_rows = y_PD.shape[0]
        return y_PD.index_select(0, dest_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (dest_N,) = ctx.saved_tensors
        grad_PD = grad_ND.new_zeros((ctx.num_rows, grad_ND.shape[1]))
        return grad_PD.index_copy_(0, dest_N, grad_ND), None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: _grouped_mm's backward
    rejects expanded gradients (stride 0, e.g. from ``y.sum().backward()``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def expert_activation(h_xF: Tensor, g_xF: Tensor | None, activation: str) -> Tensor:
    """The experts' activation: gelu (exact erf form) or relu of h; swiglu: silu(h) * g,
    with g = x @ w3. Shared by the routed and the shared experts."""
    if activation == "gelu":
        return F_.gelu(h_xF)
    if activation == "relu":
        return F_.relu(h_xF)
    return F_.silu(h_xF) * g_xF


def _padded_rows_index(tokens_per_expert_E: Tensor, rows_per_expert: int, num_rows: int) -> Tensor:
    """dest_N[i] = e * M + (i - start_e) for row i of expert e: its row in [E * M, D].
    ``num_rows``: the counts' sum, known to the host (no read for the output size)."""
    num_experts = tokens_per_expert_E.shape[0]
    device = tokens_per_expert_E.device
    expert_of_row_N = torch.repeat_interleave(
        torch.arange(num_experts, device=device), tokens_per_expert_E, output_size=num_rows)
    start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    shift_E = torch.arange(num_experts, device=device) * rows_per_expert - start_E
    return torch.arange(expert_of_row_N.shape[0], device=device) + shift_E[expert_of_row_N]


class GroupedExperts(nn.Module):
    """E_local expert MLPs with weights stacked over experts, no bias.

    y = act(x @ w1) @ w2 for "gelu" (exact erf GELU) and "relu";
    y = (silu(x @ w1) * (x @ w3)) @ w2 for "swiglu".

    Args:
        num_local_experts: E.
        d_model, d_ff: D, F.
        activation: "gelu", "relu" or "swiglu".
        first_global_expert_id: global id of local expert 0 (ep_rank * E).
        seed: base seed; global expert g draws from ``expert_seed(seed, g)``:
            w1, w3 ~ N(0, D**-0.5), w2 ~ N(0, F**-0.5).
        dtype: parameter dtype.
        impl: kernel, one of IMPLS (see the module docstring).
    """

    # No longer read: "auto" does not look at counts. Kept as an attribute because
    # inference/int8.py copies it onto Int8GroupedExperts.
    max_pad_frac: float = 0.0

    def __init__(self, num_local_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 first_global_expert_id: int = 0, seed: int = 0, dtype=torch.float32,
                 impl: str = "auto"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}: must be one of {ACTIVATIONS}")
        if impl not in IMPLS:
            raise ValueError(f"impl = {impl!r}: must be one of {IMPLS}")
        if num_local_experts < 1 or d_model < 1 or d_ff < 1:
            raise ValueError(f"num_local_experts = {num_local_experts}, d_model = {d_model}, "
                             f"d_ff = {d_ff}: must all be >= 1")
        self.num_local_experts, self.d_model, self.d_ff = num_local_experts, d_model, d_ff
        self.activation, self.impl = activation, impl
        self.first_global_expert_id, self.seed = first_global_expert_id, seed
        E, D, F = num_local_experts, d_model, d_ff
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F, dtype=dtype))
        self.w2_EFD = nn.Parameter(torch.empty(E, F, D, dtype=dtype))
        self.w3_EDF = nn.Parameter(torch.empty(E, D, F, dtype=dtype)) if activation == "swiglu" else None
        if not self.w1_EDF.is_meta:  # on the meta device the model initialises it later
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draws each local expert from its global expert's generator, in a fixed order
        (w1, then w2, then w3), always in fp32 on the CPU so the values depend on neither
        dtype nor device. An fp32 CPU parameter is drawn into in place (no temporary the
        size of an expert); any other goes through one fp32 CPU expert at a time."""
        D, F = self.d_model, self.d_ff
        for e in range(self.num_local_experts):
            gen = torch.Generator().manual_seed(expert_seed(self.seed, self.first_global_expert_id + e))
            for w, scale in ((self.w1_EDF, D ** -0.5), (self.w2_EFD, F ** -0.5), (self.w3_EDF, D ** -0.5)):
                if w is None:
                    continue
                if w.device.type == "cpu" and w.dtype == torch.float32:
                    torch.randn(w.shape[1:], generator=gen, out=w.detach()[e]).mul_(scale)
                else:
                    w[e].copy_(torch.randn(w.shape[1:], generator=gen).mul_(scale))

    def extra_repr(self) -> str:
        return (f"experts={self.num_local_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation}, impl={self.impl}, "
                f"first_global_expert_id={self.first_global_expert_id}")

    def _act(self, h_xF: Tensor, g_xF: Tensor | None) -> Tensor:
        return expert_activation(h_xF, g_xF, self.activation)

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """Plain per-expert math for local expert ``e`` (the slow reference).

        Args:
            e: local expert index in [0, E).
            x_nD: [n, D] rows for that expert.
        Returns:
            y_nD [n, D].
        """
        dtype = x_nD.dtype
        h_nF = x_nD @ self.w1_EDF[e].to(dtype)
        g_nF = x_nD @ self.w3_EDF[e].to(dtype) if self.w3_EDF is not None else None
        return self._act(h_nF, g_nF) @ self.w2_EFD[e].to(dtype)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Optional[Tensor] = None, *,
                rows_per_expert: Optional[int] = None, host_counts: Optional[list[int]] = None) -> Tensor:
        """All local experts on their rows, in one batched kernel per matmul.

        Two layouts of the rows:
          ragged: grouped by local expert with ``tokens_per_expert_E`` rows each (a device
              tensor); rows past their sum are padding: their outputs are unspecified and
              their gradients ignored (the caller never reads them). ``host_counts``: the
              same counts as host ints, when the caller already has them.
          uniform: ``rows_per_expert`` M (a host int): every expert has exactly M rows,
              x_ND is [E * M, D] (the capacity layout; the counts are not needed).
        Host reads: none, except "bmm" on a ragged layout without ``host_counts`` (the
        padded buffer needs the busiest expert's count: one ``tolist``). "grouped_mm"
        takes its offsets on the device.

        Args:
            x_ND: [N, D] rows grouped by local expert (contiguous runs, expert order).
            tokens_per_expert_E: int64 [E] rows per expert (ragged); zeros allowed; sums
                to at most N.
        Returns:
            y_ND [N, D], same row order, dtype of x. Differentiable w.r.t. x and weights;
            for N = 0 an empty tensor that still reaches every weight in backward.
        Raises:
            ValueError: shapes, or host counts that do not fit the rows;
            RuntimeError: device counts summing past N (checked on the device, raised
                where the device reports it).
        """
        E, D = self.num_local_experts, self.d_model
        if x_ND.dim() != 2 or x_ND.shape[1] != D:
            raise ValueError(f"x_ND has shape {tuple(x_ND.shape)}: expected [N, {D}]")
        num_rows = x_ND.shape[0]
        x_ND = x_ND.contiguous()
        impl = self.resolved_impl(x_ND.device, x_ND.dtype)
        if rows_per_expert is not None:
            if num_rows != E * rows_per_expert:
                raise ValueError(f"x_ND has {num_rows} rows: expected {E} experts x {rows_per_expert}")
            if impl == "grouped_mm" and num_rows > 0:
                offs_E = torch.arange(1, E + 1, device=x_ND.device, dtype=torch.int32) * rows_per_expert
                return self._forward_grouped_mm(x_ND, offs_E)
            return self._forward_bmm(x_ND, None, rows_per_expert)
        if tokens_per_expert_E is None or tokens_per_expert_E.shape != (E,):
            shape = None if tokens_per_expert_E is None else tuple(tokens_per_expert_E.shape)
            raise ValueError(f"tokens_per_expert_E has shape {shape}: expected [{E}]")
        if host_counts is not None and (sum(host_counts) > num_rows or min(host_counts) < 0):
            # _grouped_mm does not check offs: a bad count would read past x_ND.
            raise ValueError(f"tokens_per_expert_E sums to {sum(host_counts)} (min {min(host_counts)}), "
                             f"but x_ND has {num_rows} rows")
        if impl == "grouped_mm" and num_rows > 0:
            offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
            if host_counts is None:  # a device-side check: no host read
                torch._assert_async(offs_E[-1] <= num_rows, "moe: tokens_per_expert_E sums to more "
                                    "rows than x_ND has")
            return self._forward_grouped_mm(x_ND, offs_E)
        counts = host_counts if host_counts is not None else tokens_per_expert_E.tolist()
        if sum(counts) > num_rows or min(counts) < 0:
            raise ValueError(f"tokens_per_expert_E sums to {sum(counts)} (min {min(counts)}), "
                             f"but x_ND has {num_rows} rows")
        # N = 0: an [E, 0, D] bmm gives the empty output that still reaches the weights.
        return self._forward_bmm(x_ND, (tokens_per_expert_E, sum(counts)), max(counts))

    def resolved_impl(self, device: torch.device, dtype: torch.dtype) -> str:
        """The kernel this module runs for inputs on ``device`` in ``dtype``: chosen once
        per (device type, dtype, alignment) and cached, never from a batch's counts
        (module docstring).

        Args:
            device: the device of x_ND.
            dtype: the dtype of x_ND (the weights are cast to it).
        Returns:
            "bmm" or "grouped_mm".
        Raises:
            ValueError: impl "grouped_mm" with widths _grouped_mm cannot take in ``dtype``.
        """
        aligned = _grouped_mm_aligned(dtype, self.d_model, self.d_ff)
        key = (torch.device(device).type, dtype, aligned)
        # Made on first use: Int8GroupedExperts builds itself without our __init__.
        cache = self.__dict__.setdefault("_impl_by_key", {})
        if key not in cache:
            if self.impl == "grouped_mm" and not aligned:
                raise ValueError(
                    f"impl = 'grouped_mm' needs d_model ({self.d_model}) and d_ff ({self.d_ff}) "
                    f"rows of a multiple of 16 bytes in {dtype}; use impl = 'bmm'")
            cache[key] = "grouped_mm" if self.impl != "bmm" and aligned else "bmm"
        return cache[key]

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        w3 = self.w3_EDF.to(dtype) if self.w3_EDF is not None else None
        return self.w1_EDF.to(dtype), self.w2_EFD.to(dtype), w3

    def _forward_bmm(self, x_ND: Tensor, ragged: Optional[tuple[Tensor, int]], rows_per_expert: int) -> Tensor:
        """``ragged`` None: x_ND already is [E, M, D]. Else (counts_E, their host sum K):
        the first K rows are scattered into a zero-padded [E, M, D] buffer and gathered
        back; rows past K get zeros."""
        E, D, M = self.num_local_experts, self.d_model, rows_per_expert
        w1, w2, w3 = self._weights(x_ND.dtype)
        num_rows = x_ND.shape[0]
        if ragged is None or num_rows == E * M == ragged[1]:  # already [E, M, D]: a free view
            ragged, x_EMD = None, x_ND.view(E, M, D)
        else:
            counts_E, total = ragged
            dest_K = _padded_rows_index(counts_E, M, total)
            x_EMD = _RowsToPadded.apply(x_ND[:total], dest_K, E * M).view(E, M, D)
        h_EMF = torch.bmm(x_EMD, w1)
        g_EMF = torch.bmm(x_EMD, w3) if w3 is not None else None
        y_EMD = torch.bmm(self._act(h_EMF, g_EMF), w2)
        if ragged is None:
            return y_EMD.view(E * M, D)
        y_KD = _PaddedToRows.apply(y_EMD.view(E * M, D), dest_K)
        if total == num_rows:
            return y_KD
        return torch.cat([y_KD, y_KD.new_zeros((num_rows - total, D))])

    def _forward_grouped_mm(self, x_ND: Tensor, offs_E: Tensor) -> Tensor:
        """``offs_E``: int32 [E] cumulative row counts (on the device)."""
        w1, w2, w3 = self._weights(x_ND.dtype)
        h_NF = torch._grouped_mm(x_ND, w1, offs=offs_E)
        g_NF = torch._grouped_mm(x_ND, w3, offs=offs_E) if w3 is not None else None
        y_ND = torch._grouped_mm(self._act(h_NF, g_NF), w2, offs=offs_E)
        return _ContiguousGrad.apply(y_ND)


def _grouped_mm_aligned(dtype: torch.dtype, d_model: int, d_ff: int) -> bool:
    """torch._grouped_mm (CPU too) needs every row stride to be a multiple of 16 bytes."""
    elems = 16 // dtype.itemsize
    return d_model % elems == 0 and d_ff % elems == 0
