"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes a MoE one.

    moe-train upcycle --checkpoint DENSE_CKPT --out DIR \\
        --set model.moe_every=2 --set moe.num_experts=8 --set moe.top_k=2 \\
        --set moe.normalize_topk=true --set moe.capacity_factor=null --set moe.eval_capacity_factor=null
    moe-train train --config DIR/config.yaml            # --resume auto finds DIR/step_00000000

Shape legend: D model width, Fd dense MLP width (``model.d_ff``), F expert width
(``moe.d_ff``), E experts, G granularity ``G_u = Fd / F``, R = E / G replicas.

What becomes what (MOE_REFERENCE.md "Upcycling"):
  * every tensor of the dense model is copied by name, except the dense MLP of each block
    that becomes a MoE block (``model.moe_every``, ``model.first_dense_layers``);
  * routed expert e of such a block copies that block's dense MLP: ``w1`` <- up (gelu) or
    gate (swiglu, the silu branch), ``w3`` <- up (swiglu), ``w2`` <- down, transposed to
    the stacked ``[E, D, F]`` / ``[E, F, D]`` layouts. Granular upcycling (F = Fd / G):
    expert e takes hidden shard ``s = e mod G`` (columns ``[s F, (s + 1) F)``) with its
    down projection times G;
  * the router is new, drawn like any router of ours (``Router``: N(0, (0.1 / sqrt(D))^2),
    from the global RNG seeded with ``train.seed``, as ``moe_train.model.build.build_model`` does). With
    G > 1 the G experts of replica r = e // G (experts ``[r G, (r + 1) G)``) share one
    column, so their logits tie and top-k takes whole replicas (ties go to the lower id);
  * a shared expert (``moe.shared_d_ff``) starts with its output projection ``w2`` at
    zero and its input projections (and gate) at their usual init: it adds nothing at
    step 0, so exact mode is kept, and it learns from the first step (the gradient of
    ``w2`` is not zero). Copying the dense MLP into it as well would double the MLP
    output unless the copies were scaled down, which changes their training dynamics;
  * the selection bias (``moe.bias_update_rate``) starts at zero, as in a fresh run.

Exact mode: ``normalize_topk`` on, dropless (``capacity_factor`` and
``eval_capacity_factor`` null), ``route_scale`` 1, and with G > 1 ``top_k`` a multiple of
G (whole replicas) and group-limited routing only with groups of whole replicas. Then
the k gates of a token sum to one over identical experts (G = 1), or over whole replicas
that each sum to the dense MLP (G > 1), so the upcycled logits equal the dense ones at
step 0 (fp32, to rounding). With G = 1 the LM loss does not depend on the router at
step 0 (the output is ``MLP(x) * sum of the gates`` = ``MLP(x)``), so its gradient there
is zero; the balance losses still train it, and the LM loss does once the experts have
drifted apart. With G > 1 the shards differ, so the router's LM gradient is not zero.
Top-1 with ``normalize_topk`` makes the gate 1 for ever: the router then learns from the
balance losses only (the command warns); Komatsuzaki et al. route their decoders top-2.
A config that is not exact is refused unless ``allow_inexact``; in every case the
command measures the largest logit difference on a few random tokens and prints it.

Step and data position: the output is a weights-only checkpoint at step 0, so
``train --resume`` starts a fresh optimizer and a fresh LR schedule (warm-up included:
the schedule is a pure function of the step) for ``train.max_steps`` new steps, while
the data loader continues where the dense run stopped (its ``loader_states``) and
``tokens_seen`` continues counting the data the weights have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moe_train.checkpoint.state import TrainState, list_checkpoints
from moe_train.checkpoint.weights import save_model_checkpoint
from moe_train.config import Config, apply_overrides, config_from_dict, config_to_dict, dump_config
from moe_train.inference.load import load_for_inference
from moe_train.model.sizing import human_count, param_counts
from moe_train.model.transformer import MoETransformer

# Model keys the copied tensors are shaped by (model.moe_every and model.first_dense_layers
# choose which blocks become MoE and may change); model.max_seq_len shapes the learned
# position table only.
SHAPE_MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                    "mlp_activation", "norm", "position", "tie_embeddings", "embed_dim",
                    "share_layers", "share_group_size", "qk_norm")
# Tensors of a MoE block that have no dense counterpart (made here, not copied).
_NEW_SUFFIXES = (".mlp.router.w_DE", ".mlp.router.expert_bias", ".mlp.shared.w1_DF", ".mlp.shared.w2_FD",
                 ".mlp.shared.w3_DF", ".mlp.shared.w_gate_D")


@dataclass
class UpcycleReport:
    """What ``upcycle_checkpoint`` did.

    Attributes:
        path: the written checkpoint (``out/step_00000000``).
        config_path: the upcycled run's resolved config (``out/config.yaml``).
        moe_blocks: the blocks whose MLP became a MoE layer.
        granularity: G_u = Fd / F.
        exact: whether the config is in exact mode (module docstring).
        inexact: why not, one line per key ("" when exact).
        warnings: further notes (top-1 routing, bf16).
        params_before, params_after: total parameters (``sizing.param_counts``).
        active_before, active_after: parameters per token.
        max_logit_diff: the largest |upcycled - dense| logit on the check batch (eval mode).
        dense_path: the dense checkpoint read; dense_step its step.
    """

    path: Path
    config_path: Path
    moe_blocks: list
    granularity: int
    exact: bool
    inexact: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    active_before: int = 0
    active_after: int = 0
    max_logit_diff: float = float("nan")
    dense_path: Optional[Path] = None
    dense_step: int = 0
    tokens_seen: int = 0
    data_position: str = ""
    num_experts: int = 0
    top_k: int = 0
    expert_d_ff: int = 0

    def lines(self) -> list[str]:
        cfg_moe = (f"{len(self.moe_blocks)} MoE blocks ({', '.join(map(str, self.moe_blocks))}) of "
                   f"{self.num_experts} experts, top-{self.top_k}, expert d_ff {self.expert_d_ff}")
        status = ("yes" if self.exact else "NO (--allow-inexact): " + "; ".join(self.inexact))
        return [
            f"upcycled {self.dense_path} (step {self.dense_step}) -> {self.path}",
            f"{cfg_moe}; granularity G_u = {self.granularity}"
            + (" (each expert a copy of the dense MLP)" if self.granularity == 1 else
               f" (expert e: hidden shard e mod {self.granularity} of the dense MLP, down projection x "
               f"{self.granularity})"),
            f"parameters: {human_count(self.params_before)} -> {human_count(self.params_after)} "
            f"({self.params_before:,} -> {self.params_after:,}); per token "
            f"{human_count(self.active_before)} -> {human_count(self.active_after)}",
            f"exact mode: {status}; max |logit difference| vs the dense model on the check batch "
            f"(eval mode, fp32): {self.max_logit_diff:.3g}",
            *[f"WARNING: {w}" for w in self.warnings],
            f"step 0 (fresh optimizer and LR schedule); tokens seen {self.tokens_seen:,}; {self.data_position}",
            f"config: {self.config_path}; continue with: moe-train train --config {self.config_path} "
            f"(under moe-train launch for several ranks; --resume auto finds {self.path.name})",
        ]


# ------------------------------------------------------------------------- config


def check_convertible(dense: Config, cfg: Config) -> int:
    """Refuses a MoE config whose copied tensors would not fit the dense ones; returns G_u.

    Raises:
        ValueError naming every offending key with both values.
    """
    problems = []
    for key in SHAPE_MODEL_KEYS:
        old, new = getattr(dense.model, key), getattr(cfg.model, key)
        if old != new:
            problems.append(f"model.{key}: {old!r} -> {new!r}")
    if dense.model.position == "learned" and dense.model.max_seq_len != cfg.model.max_seq_len:
        problems.append(f"model.max_seq_len: {dense.model.max_seq_len} -> {cfg.model.max_seq_len} "
                        f"(the learned position table)")
    if problems:
        raise ValueError("upcycling copies the dense tensors, so their shapes must not change: "
                         + "; ".join(problems) + ". Drop these overrides")
    if cfg.model.num_moe_blocks == 0:
        raise ValueError(f"model.moe_every = {cfg.model.moe_every} (first_dense_layers "
                         f"{cfg.model.first_dense_layers}) makes no MoE block: nothing to upcycle; "
                         f"set e.g. --set model.moe_every=2")
    if cfg.moe.activation != cfg.model.mlp_activation:
        raise ValueError(f"moe.activation = {cfg.moe.activation!r}: the experts copy the dense MLP, "
                         f"whose activation is model.mlp_activation = {cfg.model.mlp_activation!r}; "
                         f"set --set moe.activation={cfg.model.mlp_activation}")
    Fd, F, E = cfg.model.d_ff, cfg.moe.d_ff, cfg.moe.num_experts
    if F > Fd or Fd % F:
        raise ValueError(f"moe.d_ff = {F}: must be the dense width model.d_ff = {Fd} or divide it "
                         f"(granular upcycling: each expert takes a shard of Fd / G_u units)")
    G = Fd // F
    if E % G:
        raise ValueError(f"moe.num_experts = {E}: granular upcycling with G_u = {Fd} / {F} = {G} "
                         f"needs a multiple of {G} experts (every shard equally often)")
    return G


def exactness_problems(cfg: Config, G: int) -> list[str]:
    """Why the upcycled model's step-0 logits would differ from the dense ones (empty:
    exact mode), each naming the key and the value to set."""
    moe, out = cfg.moe, []
    if not moe.renormalize:
        out.append(f"moe.normalize_topk = {moe.normalize_topk} (top_k {moe.top_k}): the gates must sum "
                   f"to 1; set moe.normalize_topk=true")
    for key in ("capacity_factor", "eval_capacity_factor"):
        if getattr(moe, key) is not None:
            out.append(f"moe.{key} = {getattr(moe, key)}: a dropped token loses its MLP; set moe.{key}=null")
    if moe.route_scale != 1.0:
        out.append(f"moe.route_scale = {moe.route_scale}: scales the MLP output; set moe.route_scale=1.0")
    if G > 1 and moe.top_k % G:
        out.append(f"moe.top_k = {moe.top_k}: granular upcycling (G_u = {G}) needs whole replicas, "
                   f"a multiple of {G}")
    if G > 1 and moe.num_groups > 1 and (moe.num_experts // moe.num_groups) % G:
        out.append(f"moe.num_groups = {moe.num_groups}: groups of {moe.num_experts // moe.num_groups} "
                   f"experts split the replicas of G_u = {G}; use groups of a multiple of {G}")
    return out


def upcycled_config(dense_raw: dict, overrides: list[str], out: Path) -> Config:
    """The dense run's saved config + overrides, with ``checkpoint.dir`` = ``out`` (so
    ``train --resume auto`` finds the result) and ``logging.dir`` = ``out/runs`` unless
    overridden."""
    keys = {o.partition("=")[0].strip() for o in overrides}
    if "checkpoint.dir" in keys:
        raise ValueError(f"--set checkpoint.dir: the checkpoint goes to --out ({out}); drop the override")
    raw = apply_overrides(dense_raw, overrides)
    raw.setdefault("checkpoint", {})["dir"] = str(out)
    if "logging.dir" not in keys:
        raw.setdefault("logging", {})["dir"] = str(out / "runs")
    return config_from_dict(raw)


# ------------------------------------------------------------------------ weights


def _dense_mlp(dense_sd: dict, block: int, activation: str) -> tuple:
    """(w1_DF, w2_FD, w3_DF or None) of dense block ``block`` in the experts' layout."""
    p = f"blocks.{block}.mlp."
    down_FD = dense_sd[p + "down.weight"].t()
    if activation == "swiglu":  # down(silu(gate x) * up x) = (silu(x w1) * (x w3)) w2
        return dense_sd[p + "gate.weight"].t(), down_FD, dense_sd[p + "up.weight"].t()
    return dense_sd[p + "up.weight"].t(), down_FD, None


@torch.no_grad()
def upcycle_weights(dense_model: torch.nn.Module, moe_model: torch.nn.Module, cfg: Config, G: int) -> None:
    """Fills ``moe_model`` (ep 1, every expert local, freshly built: its router and
    shared-expert init are kept) from ``dense_model`` as the module docstring says.

    Raises:
        ValueError naming a tensor that is missing, left over or of another shape.
    """
    dense_sd, moe_sd = dense_model.state_dict(), moe_model.state_dict()
    moe_blocks = [i for i in range(cfg.model.num_layers) if cfg.model.is_moe_block(i)]
    consumed = {f"blocks.{i}.mlp.{n}.weight" for i in moe_blocks for n in ("up", "gate", "down")}
    new_state, E, F = {}, cfg.moe.num_experts, cfg.moe.d_ff
    for name, current in moe_sd.items():
        if name in dense_sd:
            tensor = dense_sd[name]
        elif ".mlp.experts.w" in name:
            block = int(name.split(".")[1])
            w1_DF, w2_FD, w3_DF = _dense_mlp(dense_sd, block, cfg.model.mlp_activation)
            kind = name.rsplit(".", 1)[1][:2]  # w1, w2, w3
            shards = [slice((e % G) * F, (e % G + 1) * F) for e in range(E)]  # expert e: shard e mod G
            if kind == "w2":  # [E, F, D]: the shard's rows of down, times G
                tensor = torch.stack([w2_FD[s, :] * G for s in shards])
            else:  # [E, D, F]: the shard's columns of up / gate
                tensor = torch.stack([(w1_DF if kind == "w1" else w3_DF)[:, s] for s in shards])
        elif name.endswith(_NEW_SUFFIXES):
            tensor = current
            if name.endswith(".mlp.router.w_DE") and G > 1:  # replica r's G experts share a column
                tensor = current[:, (torch.arange(E) // G) * G]
            elif name.endswith(".mlp.shared.w2_FD"):
                tensor = torch.zeros_like(current)
        else:
            raise ValueError(f"upcycle: the MoE model's tensor {name} has no source in the dense checkpoint")
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(f"upcycle: {name} would get shape {tuple(tensor.shape)} from the dense "
                             f"checkpoint, the MoE model has {tuple(current.shape)}")
        new_state[name] = tensor.to(current.dtype).contiguous()
    left = sorted(set(dense_sd) - set(moe_sd) - consumed)
    if left:
        raise ValueError(f"upcycle: dense tensors with no place in the MoE model: {left[:5]}")
    moe_model.load_state_dict(new_state, strict=True)


@torch.no_grad()
def max_logit_difference(dense_model, moe_model, vocab_size: int, seq_len: int, seed: int = 0) -> float:
    """Largest |logit| difference of the two models (eval mode) on 2 random sequences."""
    gen = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(0, vocab_size, (2, seq_len), generator=gen)
    dense_model.eval()
    moe_model.eval()
    diff = moe_model(ids_BS).logits_BSV.float() - dense_model(ids_BS).logits_BSV.float()
    return float(diff.abs().max())


# ---------------------------------------------------------------------- checkpoint


def upcycle_checkpoint(checkpoint: str | Path, out: str | Path, overrides: list[str] = (),
                       allow_inexact: bool = False) -> UpcycleReport:
    """Reads a dense checkpoint (verified against its manifest first), writes the
    upcycled weights-only checkpoint ``out/step_00000000`` (``latest`` points at it) and
    the resolved config ``out/config.yaml``. All in this process, before any engine.

    Raises:
        CheckpointError: the dense checkpoint fails verification or does not load.
        ValueError: a shape-changing override, an already-MoE checkpoint, a non-empty
            ``out``, or (without ``allow_inexact``) a config outside exact mode.
    """
    out = Path(out)
    if list_checkpoints(out):
        raise ValueError(f"--out {out} already holds checkpoints; choose a new directory")
    loaded = load_for_inference(checkpoint)  # verifies the manifest, then loads and checks every tensor
    dense_cfg, meta = loaded.cfg, loaded.meta
    if dense_cfg.model.num_moe_blocks:
        raise ValueError(f"{loaded.path} already has {dense_cfg.model.num_moe_blocks} MoE blocks "
                         f"(model.moe_every = {dense_cfg.model.moe_every}): upcycle takes a dense checkpoint")
    cfg = upcycled_config(meta["config"], list(overrides), out)
    G = check_convertible(dense_cfg, cfg)
    inexact = exactness_problems(cfg, G)
    if inexact and not allow_inexact:
        raise ValueError("the upcycled model would not reproduce the dense one at step 0 (exact mode): "
                         + "; ".join(inexact) + ". Fix these, or pass --allow-inexact")
    torch.manual_seed(cfg.train.seed)  # the new router's draw, as build_model seeds it
    moe_model = MoETransformer(cfg.model, cfg.moe)
    upcycle_weights(loaded.model, moe_model, cfg, G)
    diff = max_logit_difference(loaded.model, moe_model, cfg.model.vocab_size,
                                min(16, cfg.model.max_seq_len), seed=cfg.train.seed)
    state = TrainState(step=0, tokens_seen=int(meta.get("tokens_seen", 0)), skipped_steps=0,
                       loader_states=list(meta.get("train_state", {}).get("loader_states") or []))
    origin = (f"upcycled from {loaded.path} (step {meta.get('step')}): {cfg.moe.num_experts} experts, "
              f"granularity {G}, top_k {cfg.moe.top_k}, exact mode {'yes' if not inexact else 'no'}")
    path = save_model_checkpoint(out, moe_model, config_to_dict(cfg), state, origin)
    config_path = out / "config.yaml"
    config_path.write_text(f"# {origin}\n" + dump_config(cfg))
    before, after = param_counts(dense_cfg.model, dense_cfg.moe), param_counts(cfg.model, cfg.moe)
    position = (f"data position of the dense run carried over ({len(state.loader_states)} rank state(s))"
                if state.loader_states else "no data position saved: the data starts from the beginning")
    return UpcycleReport(path=path, config_path=config_path,
                         moe_blocks=[i for i in range(cfg.model.num_layers) if cfg.model.is_moe_block(i)],
                         granularity=G, exact=not inexact, inexact=inexact, warnings=_warnings(cfg),
                         params_before=before.total, params_after=after.total,
                         active_before=before.active_per_token, active_after=after.active_per_token,
                         max_logit_diff=diff, dense_path=loaded.path, dense_step=int(meta.get("step", 0)),
                         tokens_seen=state.tokens_seen, data_position=position,
                         num_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k, expert_d_ff=cfg.moe.d_ff)


def _warnings(cfg: Config) -> list[str]:
    """Legal but noteworthy choices of the upcycled config."""
    out = []
    if cfg.moe.top_k == 1 and cfg.moe.renormalize:
        out.append("top_k = 1 with normalize_topk: every gate is 1, so the LM loss never trains "
                   "the router (only the balance losses do); top_k >= 2 lets it learn")
    if cfg.train.dtype != "fp32":
        out.append(f"train.dtype = {cfg.train.dtype}: exact mode is exact in fp32; in "
                   f"{cfg.train.dtype} the two models round differently")
    return out
