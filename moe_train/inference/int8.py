"""The int8 model format: post-training weight-only int8 (made by ``moe-train quantize``,
``moe_train.transform.quantize``; loaded by ``load.load_for_inference``).

Shape legend: O output channels, I input width; E experts, D model width, F expert (or
shared-expert) hidden width.

Scheme: symmetric, per output channel. For a weight w with output channel c,

    s_c = max |w[c, :]| / 127          (s_c = 1 for an all-zero channel)
    q   = clamp(round(w / s_c), -127, 127)   int8
    w^  = q * s_c                      |w - w^| <= s_c / 2 element by element

-128 is never used, so the grid is symmetric and max |w| maps to exactly +-127.
What is quantized, and where each output channel is:

  dense linears     ``nn.Linear`` weight [O, I] (attention qkv and proj, dense MLPs, the
                    factorised-embedding projections, an untied head): scale [O]
  routed experts    ``w1_EDF``, ``w3_EDF`` [E, D, F] (y = x @ w1: output F): scale [E, 1, F];
                    ``w2_EFD`` [E, F, D]: scale [E, 1, D]
  shared expert     ``w1_DF``, ``w3_DF``: scale [1, F]; ``w2_FD``: scale [1, D]

Kept in fp32: the embedding table (and a head tied to it), norms, the routers (the top-k
choice is decided by small logit differences) and their selection bias, the shared
expert's gate. The int8 tensor and its scales are what the model holds and what the
checkpoint stores (listed, with dtype, in the manifest); each forward dequantises right
before the matmul (``Int8Linear.forward``; for the experts ``Int8GroupedExperts._weights``,
the one place ``GroupedExperts``' bmm and grouped-mm kernels take their weights from), so
the float copy lives only for that matmul.

``dynamic=True`` (``--dynamic``) additionally runs the dense linears as PyTorch's
dynamically quantized linear (``torch.ao.nn.quantized.dynamic.Linear``, the module
``torch.ao.quantization.quantize_dynamic`` makes): int8 x int8 GEMMs with the activations
quantized per batch, CPU only (fbgemm / onednn), built from the same int8 values and
scales (no second rounding). In torch 2.13 ``torch.ao.quantization`` still works but is
deprecated in favour of torchao (not a dependency here); the experts stay weight-only
either way (no dynamic kernel takes stacked expert weights).

A quantized checkpoint is for inference: ``generate`` and evaluation load it
(``moe_train.inference.load.load_for_inference`` rebuilds these modules from
``quantization.pt`` before loading the int8 tensors); ``train --resume`` refuses it
(``moe_train.checkpoint.resume.check_compatible``), since training needs the float weights: resume from the
checkpoint it was quantized from.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_train.checkpoint.state import CheckpointError
from moe_train.checkpoint.weights import QUANTIZATION_FILE
from moe_train.moe.experts import GroupedExperts, expert_activation
from moe_train.moe.layer import mark_expert_params
from moe_train.moe.shared import SharedExpert

SCHEME = "int8 weight-only, symmetric, per output channel (scale = max|w| / 127)"
QMAX = 127


def quantize_int8(w: Tensor, reduce_dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``w`` with one scale per output channel.

    Args:
        w: float weight.
        reduce_dim: the input dimension (reduced over); every other index is an output
            channel (e.g. 1 for ``nn.Linear``'s [O, I], 1 for ``w1_EDF`` [E, D, F]).
    Returns:
        q (int8, shape of w), scale (fp32, shape of w with ``reduce_dim`` kept as 1).
    """
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=reduce_dim, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w32 / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scale (broadcast over the reduced dimension), in ``dtype``."""
    return (q.float() * scale.float()).to(dtype)


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` held as int8 ``weight_int8`` [O, I] and fp32
    ``scale_O1`` [O, 1] (buffers: dense, never trained); y = x @ (q * s)^T."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free linears only (moe_train has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight, reduce_dim=1)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale_O1", scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, dequantize_int8(self.weight_int8, self.scale_O1, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


_EXPERT_WEIGHTS = (("w1_EDF", "w1_int8_EDF", "w1_scale_E1F"), ("w2_EFD", "w2_int8_EFD", "w2_scale_E1D"),
                   ("w3_EDF", "w3_int8_EDF", "w3_scale_E1F"))


class Int8GroupedExperts(GroupedExperts):
    """``GroupedExperts`` holding int8 stacked weights and per-(expert, output channel)
    scales: same kernels (bmm / grouped_mm, chosen as before), weights dequantised in
    ``_weights`` right before them. The int8 tensors and scales are frozen parameters
    marked as expert parameters, so ``checkpoint.split_state`` stores them, stacked
    [E, ...], in the expert files like the float weights they replace."""

    def __init__(self, experts: GroupedExperts):
        nn.Module.__init__(self)  # not GroupedExperts.__init__: no float weights to draw
        for attr in ("num_local_experts", "d_model", "d_ff", "activation", "impl", "max_pad_frac",
                     "first_global_expert_id", "seed"):
            setattr(self, attr, getattr(experts, attr))
        for name, q_name, s_name in _EXPERT_WEIGHTS:
            w = getattr(experts, name)
            self.register_parameter(name, None)  # the float weight is gone
            q, scale = quantize_int8(w, reduce_dim=1) if w is not None else (None, None)
            self.register_parameter(q_name, None if q is None else nn.Parameter(q, requires_grad=False))
            self.register_parameter(s_name, None if scale is None else nn.Parameter(scale, requires_grad=False))
        mark_expert_params(self, 1)

    def _dequantized(self, index: int, dtype: torch.dtype, e: Optional[int] = None) -> Optional[Tensor]:
        _, q_name, s_name = _EXPERT_WEIGHTS[index]
        q, scale = getattr(self, q_name), getattr(self, s_name)
        if q is None:
            return None
        if e is not None:
            q, scale = q[e], scale[e]
        return dequantize_int8(q, scale, dtype)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return self._dequantized(0, dtype), self._dequantized(1, dtype), self._dequantized(2, dtype)

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        w1, w2, w3 = (self._dequantized(i, x_nD.dtype, e) for i in range(3))
        g_nF = x_nD @ w3 if w3 is not None else None
        return self._act(x_nD @ w1, g_nF) @ w2

    def reset_parameters(self) -> None:
        raise RuntimeError("int8 experts hold trained weights; there is nothing to re-draw")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 per output channel"


_SHARED_WEIGHTS = (("w1_DF", "w1_int8_DF", "w1_scale_1F"), ("w2_FD", "w2_int8_FD", "w2_scale_1D"),
                   ("w3_DF", "w3_int8_DF", "w3_scale_1F"))


class Int8SharedExpert(SharedExpert):
    """``SharedExpert`` with int8 FFN weights (buffers: dense) dequantised in ``ffn``; the
    fp32 gate ``w_gate_D`` stays a float parameter."""

    def __init__(self, shared: SharedExpert):
        nn.Module.__init__(self)
        self.activation = shared.activation
        for name, q_name, s_name in _SHARED_WEIGHTS:
            w = getattr(shared, name)
            self.register_parameter(name, None)
            q, scale = quantize_int8(w, reduce_dim=0) if w is not None else (None, None)
            self.register_buffer(q_name, q)
            self.register_buffer(s_name, scale)
        self.w_gate_D = shared.w_gate_D

    def ffn(self, x_TD: Tensor) -> Tensor:
        w1, w2, w3 = (None if getattr(self, q) is None else dequantize_int8(getattr(self, q), getattr(self, s), x_TD.dtype)
                      for _, q, s in _SHARED_WEIGHTS)
        g_TF = x_TD @ w3 if w3 is not None else None
        return expert_activation(x_TD @ w1, g_TF, self.activation) @ w2


def tied_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's head when it shares the embedding's weight (kept in fp32), else None."""
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is embed.weight:
        return head
    return None


def quantize_model(model: nn.Module) -> dict[str, list[str]]:
    """Replaces, in place, every quantizable module of ``model`` (module docstring) by its
    int8 form; a module registered under several names (``share_layers``) is converted
    once and stays shared. Returns the converted module names by kind, in module order."""
    tied = tied_head(model)
    kinds = {Int8Linear: "linears", Int8GroupedExperts: "experts", Int8SharedExpert: "shared"}
    # Every (parent, child) edge first, then the swaps: a shared child shows up once per
    # path, with the same identity, before anything is replaced.
    edges = [(f"{name}.{child_name}" if name else child_name, module, child_name, child)
             for name, module in model.named_modules(remove_duplicate=False)
             for child_name, child in module.named_children()]
    converted: dict[int, nn.Module] = {}
    names: dict[str, list[str]] = {kind: [] for kind in kinds.values()}
    for path, parent, child_name, child in edges:
        cls = (Int8Linear if isinstance(child, nn.Linear) and child is not tied else
               Int8GroupedExperts if type(child) is GroupedExperts else
               Int8SharedExpert if type(child) is SharedExpert else None)
        if cls is None:
            continue
        if id(child) not in converted:
            converted[id(child)] = cls(child)
        setattr(parent, child_name, converted[id(child)])
        names[kinds[cls]].append(path)
    return names


def to_dynamic(model: nn.Module) -> int:
    """Replaces every ``Int8Linear`` by ``torch.ao.nn.quantized.dynamic.Linear`` holding the
    same int8 values and scales (CPU). Returns how many were replaced."""
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices: said in the docs
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized.dynamic as nnqd

        edges = [(module, child_name, child) for _, module in model.named_modules(remove_duplicate=False)
                 for child_name, child in module.named_children() if isinstance(child, Int8Linear)]
        done: dict[int, nn.Module] = {}
        for parent, child_name, child in edges:
            if id(child) not in done:
                scale_O = child.scale_O1.squeeze(1).double()
                qweight = torch.quantize_per_channel(  # exactly q again: (q * s) / s rounds to q
                    dequantize_int8(child.weight_int8, child.scale_O1), scale_O,
                    torch.zeros_like(scale_O, dtype=torch.long), 0, torch.qint8)
                dyn = nnqd.Linear(child.in_features, child.out_features, bias_=False, dtype=torch.qint8)
                dyn.set_weight_bias(qweight, None)
                done[id(child)] = dyn
            setattr(parent, child_name, done[id(child)])
    return len(done)


def read_record(step_dir: Path, meta: dict) -> Optional[dict]:
    """The checkpoint's quantization record, or None for a float checkpoint."""
    if QUANTIZATION_FILE not in meta.get("files", {}):
        return None
    return torch.load(Path(step_dir) / QUANTIZATION_FILE, map_location="cpu", weights_only=True)


def prepare_for_load(model: nn.Module, record: dict, path: Path) -> None:
    """Gives a freshly built float model the int8 modules of ``record`` (their values are
    overwritten by the checkpoint's); a mismatch means another model or format."""
    names = quantize_model(model)
    if names != record["modules"]:
        raise CheckpointError(f"checkpoint {path}: its int8 modules ({QUANTIZATION_FILE}) differ from the "
                              f"ones this version quantizes in the model of its config; re-run "
                              f"moe-train quantize on the float checkpoint ({record.get('source')})")


def finish_load(model: nn.Module, record: dict) -> None:
    """After the int8 weights are loaded: the dynamic-quantized linears, if recorded."""
    if record.get("dynamic"):
        to_dynamic(model)


