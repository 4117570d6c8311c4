"""Expert pruning and dense magnitude pruning (``moe-train prune``).

Shape legend: E experts before, N experts kept, D model width, G expert groups.

Expert pruning. Each MoE layer's load is measured on the validation split: the fraction of
the layer's routed assignments (top-k choices before capacity dropping, with the selection
bias if any: the experts the router actually picks) that went to each expert. Every layer
then keeps its N highest-load experts (ties to the lower id), in their original order, so
the top-k tie rule and group boundaries stay as they were. N is ONE number for every layer
(``moe.num_experts`` is one config value):

  * ``keep=N`` (``--keep-experts N``): N per layer.
  * ``min_load=FRAC`` (``--min-load FRAC``): per layer the count of experts whose load is
    at least FRAC; N is the LARGEST count over layers, so no layer loses an expert that
    carries FRAC of its assignments; a layer with fewer such experts keeps its next most
    loaded ones as well (printed).

N is raised to ``moe.top_k`` (a token needs k experts) and, with group-limited routing
(``moe.num_groups`` G > 1), must be a multiple of G: each group keeps its N / G most loaded
experts, so each group stays a contiguous block of experts. What is removed per dropped
expert: its slices of the stacked weights (``w1_EDF``, ``w2_EFD``, ``w3_EDF``), its column
of the router (``w_DE`` [D, E] -> [D, N]) and its entry of the selection bias ``b_E``.
Capacity follows from the new count: ceil(k * T * cf / N) slots per expert, the same total.

What the pruned model computes: a token none of whose top-k experts was dropped is routed
to the same experts. Its gates are unchanged when the k gates are renormalised
(``normalize_topk``, the default for k > 1) or the scores are sigmoids; with softmax
top-1 (Switch) the gate p_e = exp(l_e) / sum_j exp(l_j) loses the dropped experts from the
denominator and grows by 1 / (1 - their probability mass). A dropped expert's tokens go
to their next choice. So the output is exactly the original's when the dropped experts
received no tokens and the gates are renormalised or sigmoid (tests/test_compress.py).

Dense magnitude pruning (``dense_sparsity`` s > 0): the dense weights inside the blocks
(attention qkv and proj, dense MLPs, the shared expert) lose the fraction s of their
smallest-magnitude entries, with ``torch.nn.utils.prune`` (``l1_unstructured`` per
tensor, ``scope="layer"``; or one threshold over all of them, ``global_unstructured``,
``scope="global"``), made permanent with ``prune.remove``: plain zeros in plain weights,
no ``weight_orig`` or mask. Embeddings, the head, routers, norms and routed experts are
left alone. The zeros are stored densely (bytes on disk do not shrink; int8 does that).

The output is a weights-only checkpoint (``checkpoint.save_model_checkpoint``) whose
meta.json carries the pruned, resolved config (moe.num_experts = N, checkpoint.dir = the
output directory), with the same config as ``config.yaml`` beside it. ``moe.num_experts``
is a shape key, so ``train --resume`` needs it: ``moe-train train --config OUT/config.yaml``
resumes (``--resume auto`` finds the pruned checkpoint), or your own config with
``--set moe.num_experts=N --resume OUT/step_S``; both are printed. The expert-parallel
size of a resume must divide N: when the saved one does not, the written config uses the
largest size dividing both (printed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from moe_train.checkpoint.state import TrainState
from moe_train.checkpoint.weights import save_model_checkpoint
from moe_train.config import config_from_dict, config_to_dict, dump_config
from moe_train.inference.int8 import read_record
from moe_train.inference.load import load_for_inference
from moe_train.model.transformer import MoETransformer
from moe_train.moe.layer import MoELayer
from moe_train.moe.shared import SharedExpert
import moe_train.transform.report as report


def measure_expert_load(loaded, eval_batches: int) -> tuple[float, int, dict[str, Tensor]]:
    """Validation loss of ``loaded`` and the routed assignments per expert of each MoE
    layer (a layer shared by several blocks sums its uses), in one pass.

    Returns:
        (loss, tokens, {layer name: int64 counts_E}), layers in module order.
    """
    counts: dict[str, Tensor] = {}
    hooks = []
    for name, module in loaded.model.named_modules():
        if isinstance(module, MoELayer):
            counts[name] = torch.zeros(module.cfg.num_experts, dtype=torch.int64)

            def hook(mod, args, out, name=name):
                counts[name] += out.stats.routed_per_expert_E.detach().cpu()

            hooks.append(module.register_forward_hook(hook))
    try:
        loss, tokens = report.evaluate(loaded, eval_batches)
    finally:
        for h in hooks:
            h.remove()
    return loss, tokens, counts


def kept_experts(load_E: Tensor, keep: int, num_groups: int = 1) -> list[int]:
    """The ``keep`` highest-load experts (ties to the lower id), ``keep / num_groups`` from
    each group of contiguous experts, in ascending id order."""
    E = load_E.shape[0]
    per_group, keep_per_group = E // num_groups, keep // num_groups
    ids = []
    for g in range(num_groups):
        block = load_E[g * per_group:(g + 1) * per_group].tolist()
        best = sorted(range(per_group), key=lambda i: (-block[i], i))[:keep_per_group]
        ids += [g * per_group + i for i in best]
    return sorted(ids)


def experts_to_keep(loads: dict[str, Tensor], moe_cfg, keep: Optional[int], min_load: Optional[float]) -> int:
    """N from ``--keep-experts`` or ``--min-load`` (module docstring), checked against
    top_k and the groups; a ValueError names the flag."""
    E, k, G = moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.num_groups
    if (keep is None) == (min_load is None):
        raise ValueError("give exactly one of --keep-experts N and --min-load FRAC")
    if keep is not None:
        if not k <= keep <= E:
            raise ValueError(f"--keep-experts {keep}: must be between moe.top_k ({k}) and moe.num_experts ({E})")
        if keep % G:
            raise ValueError(f"--keep-experts {keep}: must be a multiple of moe.num_groups ({G}), so that "
                             f"every expert group keeps the same number of experts")
        return keep
    if not 0.0 <= min_load <= 1.0:
        raise ValueError(f"--min-load {min_load}: a fraction of a layer's routed assignments, in [0, 1]")
    counts = [int((c.double() / max(int(c.sum()), 1) >= min_load).sum()) for c in loads.values()]
    n = max(max(counts), k)
    return min(n + (-n) % G, E)  # up to a multiple of G; E is one


def pruned_state(model: nn.Module, kept: dict[str, list[int]]) -> dict[str, Tensor]:
    """The model's state dict with every MoE layer's expert, router-column and
    selection-bias tensors cut to its kept experts (every name a shared layer has)."""
    layer_of: dict[int, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            layer_of[id(module)] = kept[name]
    prefixes = {name + ".": layer_of[id(m)] for name, m in model.named_modules(remove_duplicate=False)
                if id(m) in layer_of}
    state = {}
    for name, tensor in model.state_dict().items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            ids = torch.tensor(prefixes[prefix])
            rest = name[len(prefix):]
            if rest.startswith("experts.") or rest == "router.expert_bias":
                tensor = tensor.index_select(0, ids)  # [E, ...] -> [N, ...]
            elif rest == "router.w_DE":
                tensor = tensor.index_select(1, ids)  # [D, E] -> [D, N]
        state[name] = tensor.clone()
    return state


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer") -> tuple[int, int, int]:
    """Zeroes the fraction ``sparsity`` of the smallest |w| of the dense block weights
    (module docstring), permanently. Returns (tensors, weights, zeros among them)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--dense-sparsity {sparsity}: must be in [0, 1)")
    if scope not in ("layer", "global"):
        raise ValueError(f"--dense-scope {scope!r}: must be layer or global")
    targets = []
    for name, module in model.named_modules():  # a shared module once
        if not name.startswith("blocks."):
            continue
        if isinstance(module, nn.Linear):
            targets.append((module, "weight"))
        elif isinstance(module, SharedExpert):
            targets += [(module, w) for w in ("w1_DF", "w2_FD", "w3_DF") if getattr(module, w) is not None]
    if sparsity > 0 and targets:
        if scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
        else:
            for module, w in targets:
                prune.l1_unstructured(module, w, amount=sparsity)
        for module, w in targets:
            prune.remove(module, w)  # weight = weight_orig * mask, as a plain parameter
    weights = sum(getattr(m, w).numel() for m, w in targets)
    zeros = sum(int((getattr(m, w) == 0).sum()) for m, w in targets)
    return len(targets), weights, zeros


def _pruned_config(loaded, num_experts: int, out: Path, data: Optional[str], log) -> dict:
    config = config_to_dict(loaded.cfg)
    config["moe"]["num_experts"] = num_experts
    config["checkpoint"]["dir"] = str(out)
    if data:
        config["data"]["manifest"] = str(data)
    ep = config["parallel"]["expert_parallel_size"]
    if num_experts % ep:
        config["parallel"]["expert_parallel_size"] = math.gcd(num_experts, ep)
        log(f"note: parallel.expert_parallel_size {ep} does not divide {num_experts} experts; the written "
            f"config uses {math.gcd(num_experts, ep)} (a resume's ep must divide {num_experts})")
    try:
        config_from_dict(config)
    except ValueError as err:
        raise ValueError(f"the pruned config is invalid: {err}") from None
    return config


def prune_checkpoint(checkpoint: str | Path, out: str | Path, keep: Optional[int] = None,
                     min_load: Optional[float] = None, dense_sparsity: float = 0.0,
                     dense_scope: str = "layer", eval_batches: int = 0, data: Optional[str] = None,
                     log: Callable[[str], None] = print) -> dict:
    """``moe-train prune`` (module docstring): measures, prunes, writes ``out/step_S``
    (S = the source's step) and ``out/config.yaml``, reloads the result as ``generate``
    does and measures it.

    Returns:
        {"path", "before", "after" (``report.Snapshot``), "kept" ({layer: ids}),
        "loads" ({layer: fractions}), "num_experts", "resume" (the printed commands)}.
    """
    out = report.check_out_dir(out)
    loaded = report.with_data(load_for_inference(checkpoint), data)
    if read_record(loaded.path, loaded.meta) is not None:
        raise ValueError(f"{loaded.path} is int8 (moe-train quantize); prune the float checkpoint, then quantize")
    E = loaded.cfg.moe.num_experts
    log(f"# moe-train prune: {loaded.path} (step {loaded.meta['step']}, {E} experts, top-{loaded.cfg.moe.top_k})")
    loss, tokens, counts = measure_expert_load(loaded, eval_batches)
    before = report.snapshot(loaded, loaded.path, eval_batches, loss=(loss, tokens))
    if not counts:
        raise ValueError(f"{loaded.path}: the model has no MoE layer; there are no experts to prune")
    N = experts_to_keep(counts, loaded.cfg.moe, keep, min_load)
    log(f"expert load = share of each layer's routed top-{loaded.cfg.moe.top_k} assignments on "
        f"{tokens:,} validation tokens of {loaded.cfg.data.manifest}; keeping {N} of {E} experts per layer"
        + (f" (--min-load {min_load}: the most experts at or above it in any layer)" if min_load is not None else ""))
    kept, loads = {}, {}
    for name, c in counts.items():
        frac = c.double() / max(int(c.sum()), 1)
        kept[name] = kept_experts(c, N, loaded.cfg.moe.num_groups)
        loads[name] = frac.tolist()
        below = [i for i in kept[name] if min_load is not None and frac[i] < min_load]
        log(f"  {name}: load [{' '.join(f'{x:.3f}' for x in loads[name])}] -> keeps {kept[name]} "
            f"({float(frac[kept[name]].sum()):.1%} of its assignments)"
            + (f"; {below} below --min-load, kept to make {N}" if below else ""))
    config = _pruned_config(loaded, N, out, data, log)
    cfg = config_from_dict(config)
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model, cfg.moe)
    model.load_state_dict(pruned_state(loaded.model, kept), strict=True)
    if dense_sparsity > 0:
        n, weights, zeros = magnitude_prune(model, dense_sparsity, dense_scope)
        log(f"dense magnitude pruning ({dense_scope}, torch.nn.utils.prune, made permanent): {n} tensors, "
            f"{zeros:,} of {weights:,} weights zero ({zeros / max(weights, 1):.1%})")
    saved = loaded.meta.get("train_state", {})
    state = TrainState(**{k: saved[k] for k in ("step", "tokens_seen", "skipped_steps", "loader_states") if k in saved})
    origin = (f"pruned from {loaded.path}: {N} of {E} experts per MoE layer kept "
              f"({'; '.join(f'{k}: {v}' for k, v in kept.items())}), dense sparsity {dense_sparsity}")
    path = save_model_checkpoint(out, model, config, state, origin)
    (out / "config.yaml").write_text(dump_config(cfg))
    after = report.snapshot(report.with_data(load_for_inference(path), data), path, eval_batches)
    log(f"wrote {path} and {out / 'config.yaml'} (moe.num_experts = {N})")
    for line in report.table(before, after):
        log(line)
    resume = [f"moe-train train --config {out / 'config.yaml'} --set train.max_steps=M",
              f"moe-train train --config YOUR.yaml --set moe.num_experts={N}"
              + (f" --set parallel.expert_parallel_size={cfg.parallel.expert_parallel_size}"
                 if cfg.parallel.expert_parallel_size != loaded.cfg.parallel.expert_parallel_size else "")
              + f" --resume {path} --set train.max_steps=M"]
    log(f"resume training (M > {state.step}; any ep dividing {N}):\n  " + "\n  ".join(resume))
    return {"path": path, "before": before, "after": after, "kept": kept, "loads": loads,
            "num_experts": N, "resume": resume}
