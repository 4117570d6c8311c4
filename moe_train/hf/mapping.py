"""Which transformers architecture represents a moe_train model, and ``config.json`` both ways.

Read against transformers 5.24 (``models/{qwen3_moe,mixtral,qwen2_moe}/modeling_*.py``,
``modeling_rope_utils.py``, ``masking_utils.py``). What the three compute, and ours:

  block        pre-norm: x + attn(norm(x)), then x + mlp(norm(x)): same.
  RMSNorm      x * rsqrt(mean(x^2) + eps) * w in fp32, ``rms_norm_eps``: ours (``norm_eps``).
  attention    q/k/v/o without bias (Qwen2-MoE: q/k/v biases, written as zeros), GQA
               (query head h reads kv head h // (H / G), like ours), scale 1/sqrt(K),
               ``head_dim`` = d_model / num_heads; Qwen3-MoE: RMSNorm over the head dim on
               q and k (one weight [K] each, eps ``rms_norm_eps``) before RoPE: our qk_norm.
  RoPE         ``rotate_half`` (the "half" layout: pairs (i, i + K/2)), inv_freq =
               theta^(-2i/K) in fp32: ours. ``rope_type`` linear = ours; yarn = ours
               (beta_fast 32, beta_slow 1, truncate, attention factor 0.1 ln s + 1); our
               static ntk is the default rope with theta' = theta s^(K/(K-2)).
  sliding      ``sliding_window`` W: key j visible to query i iff i - j < W: our
               ``attention: sliding_window``.
  router       logits = x w^T; softmax in fp32; ``torch.topk`` of the probs; Qwen:
               renormalised iff ``norm_topk_prob``; Mixtral: always renormalised. No
               capacity (dropless), no jitter at inference. Ours: fp32 logits (the same
               in fp32; in bf16 Hugging Face's logits are bf16), top-k of the probs.
  experts      down(silu(gate(x)) * up(x)): our swiglu (w1 = gate, w3 = up, w2 = down).
  shared       Qwen2-MoE: sigmoid(x w_g) * shared_mlp(x), added to every token: ours with
               ``shared_gate: sigmoid``.
  head         ``tie_word_embeddings``: our ``tie_embeddings``.

Options with an exact counterpart only by rewriting the weights (the function is the
same, the parameterisation differs; an import gives back an equivalent model):
``moe.route_scale`` is folded into the experts' down projections; an ungated shared
expert becomes a zero gate (sigmoid(0) = 1/2 exactly) with the down projection doubled;
a model with no shared expert that needs Qwen2-MoE gets a zero shared expert of width 1
(it adds exactly 0); ``model.share_layers`` writes the shared weights under every block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from moe_train.model.config import ModelConfig
from moe_train.moe.config import MoEConfig

ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")
HF_CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
              "qwen2_moe": "Qwen2MoeForCausalLM"}
NAMES = {"qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}

# Every ModelConfig / MoEConfig field this module decides about. A field that is not
# listed (an option added later) is refused unless it has its default value.
MODEL_MAPPED = {
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "mlp_activation",
    "norm", "norm_eps", "position", "rope_theta", "max_seq_len", "moe_every", "first_dense_layers",
    "tie_embeddings", "init_std", "embed_dim", "share_layers", "share_group_size", "attention",
    "window", "global_tokens", "qk_norm", "rope_scaling", "rope_scaling_factor", "rope_original_max_len",
    "dropout", "attention_impl"}
MOE_MAPPED = {
    "num_experts", "top_k", "d_ff", "activation", "eval_capacity_factor", "normalize_topk",
    "score_func", "route_scale", "shared_d_ff", "shared_gate", "bias_update_rate", "num_groups",
    "aux_loss_coef",
    # training only, or only meaningful with an option checked above (eval capacity, groups)
    "capacity_factor", "min_capacity", "drop_policy", "jitter_eps", "z_loss_coef", "balance_scope",
    "expert_impl", "seed", "bias_freeze_step", "seq_balance_coef", "groups_per_token", "group_score",
    "dispatch"}


@dataclass
class ExportPlan:
    """How one model is written.

    Attributes:
        arch: one of ARCHS.
        notes: exact mappings worth saying (weights rewritten, training-only options).
        inexact: differences in the computed function, each naming our option; export
            only with ``--allow-inexact``.
        impossible: options with no counterpart at all; never exported.
        shared: how the Qwen2-MoE shared expert is written: "gated" (ours), "ungated"
            (zero gate, down doubled), "zero" (we have none: zeros of width 1); "" otherwise.
    """

    arch: str = ""
    notes: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    impossible: list[str] = field(default_factory=list)
    shared: str = ""

    def check(self, allow_inexact: bool) -> None:
        """Raises ValueError naming every refused option."""
        if self.impossible:
            raise ValueError("no transformers architecture represents this model: " + "; ".join(self.impossible))
        if self.inexact and not allow_inexact:
            raise ValueError(f"the {NAMES[self.arch]} export would compute a different function: "
                             + "; ".join(self.inexact)
                             + ". Change the option, or pass --allow-inexact to export anyway")


def _unknown_options(model: ModelConfig, moe: MoEConfig) -> list[str]:
    out = []
    for cfg, section, known in ((model, "model", MODEL_MAPPED), (moe, "moe", MOE_MAPPED)):
        default = type(cfg)()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name not in known and value != getattr(default, f.name):
                out.append(f"{section}.{f.name} = {value!r}: the Hugging Face export has no mapping for "
                           f"this option (only its default, {getattr(default, f.name)!r}, is exported)")
    return out


def _arch_problems(model: ModelConfig, moe: MoEConfig) -> dict[str, Optional[str]]:
    """Per architecture: None when it represents the model's structure, else why not."""
    shared = moe.shared_d_ff > 0 and model.num_moe_blocks > 0
    all_moe = model.num_moe_blocks == model.num_layers
    return {
        "qwen3_moe": (None if model.qk_norm and not shared else
                      "model.qk_norm = false: Qwen3-MoE always normalises q and k" if not model.qk_norm else
                      f"moe.shared_d_ff = {moe.shared_d_ff}: Qwen3-MoE has no shared expert"),
        "mixtral": ("model.qk_norm = true: Mixtral has no q/k norm" if model.qk_norm else
                    f"moe.shared_d_ff = {moe.shared_d_ff}: Mixtral has no shared expert" if shared else
                    f"model.moe_every = {model.moe_every}, model.first_dense_layers = {model.first_dense_layers}: "
                    f"Mixtral has no dense blocks" if not all_moe else
                    f"moe.normalize_topk = {moe.normalize_topk} (top_k {moe.top_k}): Mixtral always "
                    f"renormalises the top-k weights" if not moe.renormalize else None),
        "qwen2_moe": "model.qk_norm = true: Qwen2-MoE has no q/k norm" if model.qk_norm else None,
    }


def plan_export(model: ModelConfig, moe: MoEConfig, arch: str = "auto",
                selection_bias_is_zero: bool = False) -> ExportPlan:
    """Decides the architecture and lists every difference (``ExportPlan``); raises nothing.

    Args:
        arch: "auto" (Qwen3-MoE, else Mixtral, else Qwen2-MoE: the first that fits) or one
            of ARCHS.
        selection_bias_is_zero: the routers' selection bias (``moe.bias_update_rate`` > 0)
            holds zeros only, so dropping it changes no routing.
    """
    plan = ExportPlan()
    plan.impossible += _unknown_options(model, moe)
    has_moe = model.num_moe_blocks > 0
    dense = model.num_moe_blocks < model.num_layers
    if model.norm != "rmsnorm":
        plan.impossible.append(f"model.norm = {model.norm!r}: the targets use RMSNorm")
    if model.position != "rope":
        plan.impossible.append(f"model.position = {model.position!r}: the targets use rotary positions (rope)")
    if model.embed_dim is not None and model.embed_dim != model.d_model:  # E = D is the plain table
        plan.impossible.append(f"model.embed_dim = {model.embed_dim}: factorised embeddings have no counterpart")
    if dense and model.mlp_activation != "swiglu":
        plan.impossible.append(f"model.mlp_activation = {model.mlp_activation!r}: the dense blocks of "
                               f"Qwen3-MoE and Qwen2-MoE are SwiGLU")
    if has_moe and moe.activation != "swiglu":
        plan.impossible.append(f"moe.activation = {moe.activation!r}: the experts of every target are SwiGLU")
    if model.attention in ("local_block", "longformer"):
        plan.inexact.append(f"model.attention = {model.attention!r}: exported as a sliding window of "
                            f"model.window = {model.window} tokens"
                            + (" without the global tokens" if model.attention == "longformer" else
                               " (each query sees the last window tokens, not its own block)"))
    if model.share_layers != "none":
        plan.notes.append(f"model.share_layers = {model.share_layers!r}: the shared weights are written under "
                          f"every block (the same function; a Hugging Face fine-tune unties them)")
    if model.dropout > 0:
        plan.notes.append(f"model.dropout = {model.dropout}: training only, not exported (attention_dropout 0)")
    if model.rope_scaling == "ntk":
        plan.notes.append(f"model.rope_scaling = 'ntk' (static): written as rope_theta = "
                          f"{ntk_theta(model):.6g} (theta * factor^(K / (K - 2)))")
    if has_moe:
        _plan_routing(plan, moe, selection_bias_is_zero)
    problems = _arch_problems(model, moe)
    if arch == "auto":
        fitting = [a for a in ARCHS if problems[a] is None]
        if not fitting:
            plan.impossible.append("; ".join(dict.fromkeys(p for p in problems.values() if p)))
            return plan
        arch = fitting[0]
    elif arch not in ARCHS:
        raise ValueError(f"--arch {arch}: must be auto or one of {', '.join(ARCHS)}")
    elif problems[arch] is not None:
        plan.impossible.append(problems[arch])
    plan.arch = arch
    if arch == "qwen2_moe":
        if moe.shared_d_ff > 0 and has_moe:
            plan.shared = "gated" if moe.shared_gate == "sigmoid" else "ungated"
            if plan.shared == "ungated":
                plan.notes.append("moe.shared_gate = 'none': written as a zero shared_expert_gate "
                                  "(sigmoid(0) = 1/2) with the shared down projection doubled: exact")
        else:
            plan.shared = "zero"
            plan.notes.append("no shared expert: Qwen2-MoE gets a zero shared expert of width 1 (adds exactly 0)")
    return plan


def _plan_routing(plan: ExportPlan, moe: MoEConfig, selection_bias_is_zero: bool) -> None:
    if moe.eval_capacity_factor is not None:
        plan.inexact.append(f"moe.eval_capacity_factor = {moe.eval_capacity_factor}: ours drops assignments "
                            f"over capacity at inference, Hugging Face routes every token (dropless; set it "
                            f"to null for an exact export)")
    if moe.score_func != "softmax":
        plan.inexact.append(f"moe.score_func = {moe.score_func!r}: the targets gate with softmax probabilities "
                            f"(the same experts are chosen, their weights differ)")
    if moe.route_scale != 1.0:
        plan.notes.append(f"moe.route_scale = {moe.route_scale}: folded into the experts' down projections")
    if moe.has_bias:
        (plan.notes if selection_bias_is_zero else plan.inexact).append(
            f"moe.bias_update_rate = {moe.bias_update_rate}: the selection bias is dropped"
            + (" (it is zero: no routing changes; its updates do not continue in Hugging Face)"
               if selection_bias_is_zero else " (Hugging Face selects by the probabilities alone)"))
    if moe.num_groups > 1:
        plan.inexact.append(f"moe.num_groups = {moe.num_groups}: group-limited routing is dropped (Hugging Face "
                            f"picks the top-{moe.top_k} over all experts)")


def ntk_theta(model: ModelConfig) -> float:
    """Static NTK-aware scaling as a plain rope base (``layers.rope_inv_freq``)."""
    K = model.head_dim
    return model.rope_theta * model.rope_scaling_factor ** (K / (K - 2))


def yarn_original_len(model: ModelConfig) -> int:
    """The pretraining length yarn uses (``layers.rope_tables``)."""
    return model.rope_original_max_len or max(1, round(model.max_seq_len / model.rope_scaling_factor))


def _rope(model: ModelConfig) -> tuple[float, Optional[dict]]:
    """(rope_theta, the rope_scaling dict or None) of the export."""
    if model.rope_scaling == "linear":
        return model.rope_theta, {"rope_type": "linear", "factor": model.rope_scaling_factor}
    if model.rope_scaling == "yarn":
        return model.rope_theta, {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                                  "original_max_position_embeddings": yarn_original_len(model),
                                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
    if model.rope_scaling == "ntk":
        return ntk_theta(model), None
    return model.rope_theta, None


def moe_layout(model: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) placing our dense blocks: block i is MoE iff
    i not in mlp_only_layers and (i + 1) % step == 0."""
    step = model.moe_every if model.moe_every > 0 else 1
    dense_on_step = [i for i in range(model.num_layers) if (i + 1) % step == 0 and not model.is_moe_block(i)]
    return step, dense_on_step


def hf_config(model: ModelConfig, moe: MoEConfig, plan: ExportPlan, dtype: str, special: dict) -> dict:
    """``config.json`` of the export.

    Args:
        dtype: "float32", "bfloat16" or "float16" (the tensors' dtype).
        special: {"bos_token_id", "eos_token_id", "pad_token_id"} (ints or None).
    """
    theta, scaling = _rope(model)
    window = model.window if model.attention != "full" else None
    cfg: dict[str, Any] = {
        "architectures": [HF_CLASSES[plan.arch]], "model_type": plan.arch,
        "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.kv_heads, "head_dim": model.head_dim, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True,
        # both spellings: rope_parameters (transformers >= 5), rope_theta/rope_scaling (older readers)
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": theta, **(scaling or {"rope_type": "default"})},
        "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False, "sliding_window": window,
        "dtype": dtype, "torch_dtype": dtype, **special,  # dtype: transformers >= 5; torch_dtype: older
    }
    if plan.arch == "mixtral":
        cfg.update(intermediate_size=moe.d_ff, num_local_experts=moe.num_experts, router_jitter_noise=0.0)
        return cfg
    step, dense_layers = moe_layout(model)
    cfg.update(intermediate_size=model.d_ff, moe_intermediate_size=moe.d_ff, num_experts=moe.num_experts,
               norm_topk_prob=moe.renormalize, decoder_sparse_step=step, mlp_only_layers=dense_layers,
               use_sliding_window=window is not None)
    if plan.arch == "qwen3_moe":
        cfg["attention_bias"] = False
    else:
        cfg.update(qkv_bias=True, shared_expert_intermediate_size=shared_width(moe, plan),
                   # layer_types decides in transformers 5; older ones make blocks >= max_window_layers sliding
                   max_window_layers=0 if window else model.num_layers,
                   layer_types=["sliding_attention" if window else "full_attention"] * model.num_layers)
    return cfg


def shared_width(moe: MoEConfig, plan: ExportPlan) -> int:
    return 1 if plan.shared == "zero" else moe.shared_d_ff


# ------------------------------------------------------------------------------ import

DEFAULTS = {  # transformers' config defaults for the keys a config.json may leave out
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "tie_word_embeddings": False},
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6,
                "tie_word_embeddings": False},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "tie_word_embeddings": False},
}


@dataclass
class ImportedConfig:
    """Our ``model`` and ``moe`` keys for a Hugging Face config, and what was noted."""

    arch: str
    model: dict
    moe: dict
    notes: list[str] = field(default_factory=list)


def config_from_hf(hf: dict, source: str) -> ImportedConfig:
    """Our model/moe keys for a Qwen3-MoE, Mixtral or Qwen2-MoE ``config.json``; raises
    ValueError naming the key whose value has no exact counterpart here."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"{source}: model_type {arch!r} is not importable; supported: {', '.join(ARCHS)}")
    d = {**DEFAULTS[arch], **{k: v for k, v in hf.items() if v is not None}}

    def need(key: str) -> Any:
        if key not in d:
            raise ValueError(f"{source}: config.json has no {key!r}")
        return d[key]

    def refuse(key: str, why: str) -> None:
        raise ValueError(f"{source}: {key} = {d.get(key)!r}: {why}")

    H, D = need("num_attention_heads"), need("hidden_size")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "moe_train's SwiGLU uses silu")
    if D % H or d.get("head_dim", D // H) != D // H:
        refuse("head_dim", f"moe_train's head dim is hidden_size / num_attention_heads = {D / H:g}")
    L = need("num_hidden_layers")
    model = {"vocab_size": need("vocab_size"), "d_model": D, "num_layers": L, "num_heads": H,
             "num_kv_heads": d.get("num_key_value_heads", H), "mlp_activation": "swiglu", "norm": "rmsnorm",
             "norm_eps": float(d["rms_norm_eps"]), "position": "rope",
             "max_seq_len": d["max_position_embeddings"], "tie_embeddings": bool(d["tie_word_embeddings"]),
             "qk_norm": arch == "qwen3_moe", "embed_dim": None, "share_layers": "none"}
    if "initializer_range" in d:
        model["init_std"] = float(d["initializer_range"])
    model.update(_rope_from_hf(d, refuse))
    model.update(_window_from_hf(arch, d, refuse, L))
    # transformers 5 writes num_local_experts for every architecture; Qwen's own configs say num_experts
    E = d["num_experts"] if arch != "mixtral" and "num_experts" in d else need("num_local_experts")
    k = need("num_experts_per_tok")
    moe = {"num_experts": E, "top_k": k, "activation": "swiglu", "eval_capacity_factor": None,
           "score_func": "softmax", "route_scale": 1.0, "bias_update_rate": 0.0, "num_groups": 1,
           "shared_d_ff": 0, "shared_gate": "none"}
    if arch == "mixtral":
        moe.update(d_ff=need("intermediate_size"), normalize_topk=True)
        model.update(d_ff=need("intermediate_size"), moe_every=1, first_dense_layers=0)
    else:
        moe.update(d_ff=need("moe_intermediate_size"), normalize_topk=bool(d["norm_topk_prob"]))
        model["d_ff"] = need("intermediate_size")
        model.update(_placement_from_hf(d, refuse, L, E))
        if arch == "qwen2_moe":
            moe.update(shared_d_ff=need("shared_expert_intermediate_size"), shared_gate="sigmoid")
    notes = []
    if d.get("attention_dropout", 0) or d.get("router_jitter_noise", 0):
        notes.append("attention_dropout / router_jitter_noise are training options: not imported")
    return ImportedConfig(arch, model, moe, notes)


def _rope_from_hf(d: dict, refuse) -> dict:
    params = d.get("rope_parameters") or {**(d.get("rope_scaling") or {}), "rope_theta": d["rope_theta"]}
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "moe_train rotates the whole head")
    out = {"rope_theta": float(params.get("rope_theta", d["rope_theta"])), "rope_scaling": "none",
           "rope_scaling_factor": 1.0, "rope_original_max_len": None}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "yarn":
        extra = {key: params.get(key) for key in ("attention_factor", "mscale", "mscale_all_dim")
                 if params.get(key) not in (None, 0)}
        if (extra or params.get("beta_fast") not in (None, 32) or params.get("beta_slow") not in (None, 1)
                or params.get("truncate", True) is not True or params.get("factor") is None):
            refuse("rope_parameters", "moe_train's yarn has factor, original_max_position_embeddings, "
                                      "beta_fast 32, beta_slow 1, truncate and the default attention factor only")
        return {**out, "rope_scaling": "yarn", "rope_scaling_factor": float(params["factor"]),
                "rope_original_max_len": int(params["original_max_position_embeddings"])}
    refuse("rope_parameters", f"rope_type {kind!r} has no counterpart (default, linear and yarn do)")


def _window_from_hf(arch: str, d: dict, refuse, L: int) -> dict:
    if arch == "mixtral":
        window = d.get("sliding_window")
    elif not d.get("use_sliding_window", False):
        window = None
    else:
        window = d.get("sliding_window")
        if arch == "qwen2_moe":
            kinds = set(d.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 and i < d.get("max_window_layers", 28) else "full_attention"
                for i in range(L)])
            if kinds != {"sliding_attention"}:
                refuse("layer_types", "moe_train's sliding window applies to every block")
    if not window:
        return {"attention": "full"}
    return {"attention": "sliding_window", "window": int(window)}


def _placement_from_hf(d: dict, refuse, L: int, E: int) -> dict:
    """(moe_every, first_dense_layers) giving the same MoE blocks as mlp_only_layers and
    decoder_sparse_step."""
    step, only = d["decoder_sparse_step"], set(d.get("mlp_only_layers") or [])
    moe_blocks = {i for i in range(L) if i not in only and E > 0 and (i + 1) % step == 0}
    if not moe_blocks:
        return {"moe_every": 0, "first_dense_layers": 0}
    for every in range(1, L + 1):
        for first in range(L + 1):
            probe = ModelConfig(num_layers=L, moe_every=every, first_dense_layers=first)
            if {i for i in range(L) if probe.is_moe_block(i)} == moe_blocks:
                return {"moe_every": every, "first_dense_layers": first}
    refuse("mlp_only_layers", f"MoE blocks {sorted(moe_blocks)} cannot be placed by model.moe_every and "
                              f"model.first_dense_layers")
