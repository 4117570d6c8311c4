"""Shared expert: one dense FFN every token passes through, beside the routed experts.

Shape legend: T tokens, D model width, F shared hidden width (``moe.shared_d_ff``).

MOE_REFERENCE.md, "Shared experts": the MoE layer's output is
    combine(routed) + g_T * shared(x_TD)
with ``shared`` an FFN of the experts' activation (N shared experts of width F are one
FFN of width N*F) and ``g_T = 1`` (``shared_gate: none``, DeepSeek) or
``g_T = sigmoid(x_TD @ w_D)`` in fp32, one scalar per token (``sigmoid``, Qwen2-MoE).
Every token gets it, including tokens whose routed assignments were all dropped.

Its parameters are DENSE in every respect: replicated and initialised from the global RNG
like the other dense weights (the transformer re-draws every 2-D non-expert weight with
``model.init_std``), never marked as DeepSpeed MoE parameters, so their gradients are
averaged over the whole data-parallel group, they sit in the dense optimizer groups and
count once in the gradient norm. Capacity, balance losses and biases do not see them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_train.moe.experts import expert_activation


class SharedExpert(nn.Module):
    """y = act(x @ w1) @ w2 (gelu, relu) or (silu(x @ w1) * (x @ w3)) @ w2 (swiglu), no
    bias; times a per-token sigmoid gate when ``gated``.

    Args:
        d_model, d_ff: D and F.
        activation: "gelu" (exact erf), "relu" or "swiglu", as the routed experts.
        gated: add the fp32 gate ``w_gate_D``.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool):
        super().__init__()
        self.activation = activation
        self.w1_DF = nn.Parameter(torch.empty(d_model, d_ff))
        self.w2_FD = nn.Parameter(torch.empty(d_ff, d_model))
        self.w3_DF = nn.Parameter(torch.empty(d_model, d_ff)) if activation == "swiglu" else None
        self.w_gate_D = nn.Parameter(torch.empty(d_model)) if gated else None
        if not self.w1_DF.is_meta:  # on the meta device the model initialises it later
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """w1, w3 ~ N(0, 1/D), w2 ~ N(0, 1/F), the gate N(0, 0.01/D): drawn from the global
        RNG in that order, as ``randn * scale`` (its values do not depend on the order of
        anything else)."""
        D, F = self.w1_DF.shape
        for p, scale in ((self.w1_DF, D ** -0.5), (self.w2_FD, F ** -0.5), (self.w3_DF, D ** -0.5),
                         # small, like the router: the gate starts near 0.5 for every token
                         (self.w_gate_D, D ** -0.5 * 0.1)):
            if p is not None:
                p.copy_(torch.randn(p.shape, device=p.device) * scale)

    def ffn(self, x_TD: Tensor) -> Tensor:
        """The ungated FFN in the dtype of ``x_TD`` (the autocast dtype under autocast)."""
        h_TF = x_TD @ self.w1_DF.to(x_TD.dtype)
        g_TF = x_TD @ self.w3_DF.to(x_TD.dtype) if self.w3_DF is not None else None
        return expert_activation(h_TF, g_TF, self.activation) @ self.w2_FD.to(x_TD.dtype)

    def gate(self, x_TD: Tensor) -> Tensor:
        """g_T = sigmoid(x_TD @ w_D) in fp32, [T, 1]; None when ungated."""
        if self.w_gate_D is None:
            return None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return torch.sigmoid(x_TD.float() @ self.w_gate_D.float()).unsqueeze(1)

    def forward(self, x_TD: Tensor) -> Tensor:
        """g_T * shared(x_TD), [T, D]; fp32 when gated (the gate is fp32)."""
        y_TD = self.ffn(x_TD)
        g_T1 = self.gate(x_TD)
        return y_TD if g_T1 is None else y_TD * g_T1
