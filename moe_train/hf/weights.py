"""Tensor names and layouts between a moe_train state dict and a Hugging Face checkpoint.

Shape legend: V vocabulary, D model width, H query heads, G key/value heads, K head dim,
F expert (or dense, or shared) hidden width, E experts.

Ours (``MoETransformer.state_dict()``, experts stacked over ALL E experts) and theirs
(the Hub layout that ``save_pretrained`` writes, one tensor per expert; transformers 5
fuses the experts on load):

  embed.weight [V, D]                 model.embed_tokens.weight
  head.weight [V, D] (untied only)    lm_head.weight
  norm.weight                         model.norm.weight
  blocks.i.norm1 / norm2.weight       model.layers.i.input_layernorm / post_attention_layernorm.weight
  blocks.i.attn.qkv.weight            rows [q | k | v] = self_attn.q_proj [HK, D], k_proj [GK, D], v_proj [GK, D]
                                      (Qwen2-MoE: q/k/v_proj.bias, zeros)
  blocks.i.attn.proj.weight           self_attn.o_proj.weight
  blocks.i.attn.q_norm / k_norm       self_attn.q_norm / k_norm.weight (Qwen3-MoE)
  dense block: mlp.gate / up / down   mlp.gate_proj / up_proj / down_proj.weight
  MoE block (Mixtral: block_sparse_moe. instead of mlp.; w1 w3 w2 for gate up down):
  mlp.router.w_DE [D, E]              mlp.gate.weight [E, D] (transposed)
  mlp.experts.w1_EDF[e] [D, F]        mlp.experts.e.gate_proj.weight [F, D] (transposed)
  mlp.experts.w3_EDF[e] [D, F]        mlp.experts.e.up_proj.weight [F, D]
  mlp.experts.w2_EFD[e] [F, D]        mlp.experts.e.down_proj.weight [D, F] (times moe.route_scale)
  mlp.shared.w1_DF / w3_DF / w2_FD    mlp.shared_expert.gate_proj / up_proj / down_proj.weight (Qwen2-MoE)
  mlp.shared.w_gate_D [D]             mlp.shared_expert_gate.weight [1, D]

Transposes and copies are exact, so import -> export reproduces every tensor bitwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moe_train.hf.mapping import ExportPlan, shared_width
from moe_train.model.config import ModelConfig
from moe_train.moe.config import MoEConfig

EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def _moe_prefix(arch: str, i: int) -> str:
    return f"model.layers.{i}." + ("block_sparse_moe." if arch == "mixtral" else "mlp.")


def to_hf(sd: dict[str, Tensor], model: ModelConfig, moe: MoEConfig, plan: ExportPlan,
          dtype: torch.dtype) -> dict[str, Tensor]:
    """Our full state dict (experts stacked over all E) -> the Hub tensors of ``plan.arch``,
    each a contiguous tensor of its own in ``dtype`` (safetensors stores no shared memory)."""
    def own(t: Tensor) -> Tensor:
        return t.detach().to(dtype=dtype, copy=True).contiguous()

    H, G, K = model.num_heads, model.kv_heads, model.head_dim
    out = {"model.embed_tokens.weight": own(sd["embed.weight"]), "model.norm.weight": own(sd["norm.weight"])}
    if not model.tie_embeddings:
        out["lm_head.weight"] = own(sd["head.weight"])
    for i in range(model.num_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = own(sd[p + "norm1.weight"])
        out[q + "post_attention_layernorm.weight"] = own(sd[p + "norm2.weight"])
        q_w, k_w, v_w = sd[p + "attn.qkv.weight"].split([H * K, G * K, G * K], dim=0)
        for name, w in (("q_proj", q_w), ("k_proj", k_w), ("v_proj", v_w)):
            out[q + f"self_attn.{name}.weight"] = own(w)
            if plan.arch == "qwen2_moe":  # Qwen2-MoE attention has q/k/v biases: ours are zero
                out[q + f"self_attn.{name}.bias"] = torch.zeros(w.shape[0], dtype=dtype)
        out[q + "self_attn.o_proj.weight"] = own(sd[p + "attn.proj.weight"])
        if model.qk_norm:
            out[q + "self_attn.q_norm.weight"] = own(sd[p + "attn.q_norm.weight"])
            out[q + "self_attn.k_norm.weight"] = own(sd[p + "attn.k_norm.weight"])
        if model.is_moe_block(i):
            out.update(_moe_to_hf(sd, p, i, model, moe, plan, own))
        else:
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[q + f"mlp.{theirs}.weight"] = own(sd[p + f"mlp.{ours}.weight"])
    return out


def _moe_to_hf(sd: dict, p: str, i: int, model: ModelConfig, moe: MoEConfig, plan: ExportPlan,
               own: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    m = _moe_prefix(plan.arch, i)
    gate, up, down = EXPERT_NAMES.get(plan.arch, QWEN_EXPERT_NAMES)
    out = {m + "gate.weight": own(sd[p + "mlp.router.w_DE"].t())}
    w1, w3, w2 = (sd[p + f"mlp.experts.{n}"] for n in ("w1_EDF", "w3_EDF", "w2_EFD"))
    if moe.route_scale != 1.0:  # gates * scale * down(h) == gates * (scale * down)(h)
        w2 = w2 * moe.route_scale
    for e in range(moe.num_experts):
        out[m + f"experts.{e}.{gate}.weight"] = own(w1[e].t())
        out[m + f"experts.{e}.{up}.weight"] = own(w3[e].t())
        out[m + f"experts.{e}.{down}.weight"] = own(w2[e].t())
    if plan.arch != "qwen2_moe":
        return out
    s = m + "shared_expert."
    D, F = model.d_model, shared_width(moe, plan)
    if plan.shared == "zero":  # no shared expert of ours: zeros of width 1 add exactly 0
        weights = {"gate_proj": torch.zeros(F, D), "up_proj": torch.zeros(F, D), "down_proj": torch.zeros(D, F)}
        gate_w = torch.zeros(1, D)
    else:
        w2s = sd[p + "mlp.shared.w2_FD"]
        if plan.shared == "ungated":  # sigmoid(0) * (2 W) == W: both factors are exact in binary
            w2s = w2s * 2
            gate_w = torch.zeros(1, D)
        else:
            gate_w = sd[p + "mlp.shared.w_gate_D"][None, :]
        weights = {"gate_proj": sd[p + "mlp.shared.w1_DF"].t(), "up_proj": sd[p + "mlp.shared.w3_DF"].t(),
                   "down_proj": w2s.t()}
    for name, w in weights.items():
        out[s + f"{name}.weight"] = own(w)
    out[m + "shared_expert_gate.weight"] = own(gate_w)
    return out


# ------------------------------------------------------------------------------ import


class _Source:
    """The Hugging Face tensors, consumed by name; what is never taken is reported."""

    def __init__(self, tensors: dict[str, Tensor], where: str):
        self.tensors, self.where = dict(tensors), where

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ValueError(f"{self.where}: tensor {name!r} is missing")
        return self.tensors.pop(name).to(torch.float32)

    def take_zero(self, name: str) -> None:
        """A bias moe_train has no place for: accepted only when it is all zeros."""
        if name in self.tensors and bool(self.take(name).any()):
            raise ValueError(f"{self.where}: {name} is not zero, and moe_train's attention has no bias")


def from_hf(tensors: dict[str, Tensor], arch: str, model: ModelConfig, moe: MoEConfig,
            where: str) -> dict[str, Tensor]:
    """Hub tensors -> our full state dict (fp32, experts stacked over all E). The Qwen2-MoE
    shared expert follows ``moe`` (``importer.settle_shared`` decided it). Raises
    ValueError naming a missing tensor, a non-zero bias or a tensor left over."""
    src = _Source(tensors, where)
    H, G, K = model.num_heads, model.kv_heads, model.head_dim
    sd = {"embed.weight": src.take("model.embed_tokens.weight"), "norm.weight": src.take("model.norm.weight")}
    if model.tie_embeddings:
        if src.has("lm_head.weight") and not torch.equal(src.take("lm_head.weight"), sd["embed.weight"]):
            raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embeddings")
        sd["head.weight"] = sd["embed.weight"]
    else:
        sd["head.weight"] = src.take("lm_head.weight")
    for i in range(model.num_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        sd[p + "norm1.weight"] = src.take(q + "input_layernorm.weight")
        sd[p + "norm2.weight"] = src.take(q + "post_attention_layernorm.weight")
        parts = [src.take(q + f"self_attn.{n}_proj.weight") for n in "qkv"]
        for n in ("q", "k", "v", "o"):
            src.take_zero(q + f"self_attn.{n}_proj.bias")
        if [t.shape[0] for t in parts] != [H * K, G * K, G * K]:
            raise ValueError(f"{where}: layer {i} q/k/v projections have {[t.shape[0] for t in parts]} rows, "
                             f"expected {[H * K, G * K, G * K]}")
        sd[p + "attn.qkv.weight"] = torch.cat(parts, dim=0)
        sd[p + "attn.proj.weight"] = src.take(q + "self_attn.o_proj.weight")
        if model.qk_norm:
            sd[p + "attn.q_norm.weight"] = src.take(q + "self_attn.q_norm.weight")
            sd[p + "attn.k_norm.weight"] = src.take(q + "self_attn.k_norm.weight")
        if model.is_moe_block(i):
            sd.update(_moe_from_hf(src, p, i, arch, moe))
        else:
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                sd[p + f"mlp.{ours}.weight"] = src.take(q + f"mlp.{theirs}.weight")
    if src.tensors:
        left = sorted(src.tensors)
        raise ValueError(f"{where}: {len(left)} tensor(s) have no place in the moe_train model, e.g. {left[:3]}")
    return sd


def _moe_from_hf(src: _Source, p: str, i: int, arch: str, moe: MoEConfig) -> dict[str, Tensor]:
    m = _moe_prefix(arch, i)
    if not src.has(m + "gate.weight") and src.has(f"model.layers.{i}.mlp.gate.weight"):
        m = f"model.layers.{i}.mlp."  # Mixtral as transformers 5 names it after loading
    gate, up, down = EXPERT_NAMES.get(arch, QWEN_EXPERT_NAMES)
    out = {p + "mlp.router.w_DE": src.take(m + "gate.weight").t().contiguous()}
    if src.has(m + "experts.gate_up_proj"):  # the fused layout of transformers 5: [E, 2F, D], [E, D, F]
        gate_up, down_w = src.take(m + "experts.gate_up_proj"), src.take(m + "experts.down_proj")
        F = gate_up.shape[1] // 2
        w1, w3, w2 = gate_up[:, :F].transpose(1, 2), gate_up[:, F:].transpose(1, 2), down_w.transpose(1, 2)
    else:
        rows = [[src.take(m + f"experts.{e}.{n}.weight").t() for e in range(moe.num_experts)]
                for n in (gate, up, down)]
        w1, w3, w2 = (torch.stack(r) for r in rows)
    out[p + "mlp.experts.w1_EDF"] = w1.contiguous()
    out[p + "mlp.experts.w3_EDF"] = w3.contiguous()
    out[p + "mlp.experts.w2_EFD"] = w2.contiguous()
    if arch != "qwen2_moe":
        return out
    s = m + "shared_expert."
    names = [s + f"{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")] + [m + "shared_expert_gate.weight"]
    w1s, w3s, w2s, g = (src.take(n) for n in names)
    if moe.shared_d_ff == 0:  # a zero shared expert (settle_shared checked): nothing to keep
        return out
    if moe.shared_gate == "none":  # a zero gate: sigmoid(0) = 1/2 times the down projection
        w2s = w2s / 2
    else:
        out[p + "mlp.shared.w_gate_D"] = g[0].contiguous()
    out[p + "mlp.shared.w1_DF"] = w1s.t().contiguous()
    out[p + "mlp.shared.w3_DF"] = w3s.t().contiguous()
    out[p + "mlp.shared.w2_FD"] = w2s.t().contiguous()
    return out


def shared_kind(tensors: dict[str, Tensor], model: ModelConfig) -> str:
    """A Qwen2-MoE checkpoint's shared experts over all MoE blocks: "zero" (every weight
    zero: our export of a model without one), "ungated" (every gate zero: our export of
    ``shared_gate: none``) or "gated"."""
    blocks = [i for i in range(model.num_layers) if model.is_moe_block(i)]
    if not blocks:
        return "gated"

    def all_zero(suffixes) -> bool:
        return all(not bool(tensors[f"model.layers.{i}.mlp.{s}"].any()) for i in blocks for s in suffixes
                   if f"model.layers.{i}.mlp.{s}" in tensors)

    experts = [f"shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    if all_zero(experts):
        return "zero"
    if all_zero(["shared_expert_gate.weight"]):
        return "ungated"
    return "gated"


def model_mismatch(sd: dict, model) -> str | None:
    """What keeps ``sd`` from loading into ``model`` (a model built on the meta device
    from the config: no memory): the missing and unexpected names, or the first tensor
    whose shape differs; None when it fits."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        return f"tensors differ from the model: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, t in expected.items():
        if tuple(sd[name].shape) != tuple(t.shape):
            return f"{name} has shape {tuple(sd[name].shape)}, the model expects {tuple(t.shape)}"
    return None
