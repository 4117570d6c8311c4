"""Which checkpoint a resume loads, and how.

A resume at the layout an engine checkpoint was saved at is exact (ZeRO partitions, RNG).
At any other layout only the canonical checkpoint (``canonical``) holds an optimizer
state that can be read, so ``choose_resume`` takes the step's canonical checkpoint, or
refuses with one line naming the conversion (``moe-train ckpt canonical``,
``moe_train.transform.convert``): never a silent restart of AdamW's moments (a known
failure of several stacks: Megatron PR #7162, DeepSpeed #8147). ``check_compatible``
refuses a checkpoint whose weights cannot fit the run's config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moe_train.checkpoint.canonical import KIND, complete_canonical, verify
from moe_train.checkpoint.state import CANONICAL_DIRNAME, LATEST, CheckpointError, list_checkpoints, read_meta
from moe_train.checkpoint.verify import verify_checkpoint
from moe_train.checkpoint.weights import QUANTIZATION_FILE
from moe_train.parallel.topology import Topology

log = logging.getLogger("moe_train.checkpoint")
# Config values a checkpoint's weights are shaped by: a resume with another value fails.
SHAPE_KEYS = (("model", "vocab_size"), ("model", "d_model"), ("model", "num_layers"),
              ("model", "num_heads"), ("model", "num_kv_heads"), ("model", "d_ff"),
              ("model", "moe_every"), ("model", "first_dense_layers"), ("model", "mlp_activation"),
              ("model", "position"), ("model", "norm"), ("model", "tie_embeddings"),
              ("moe", "num_experts"), ("moe", "d_ff"), ("moe", "activation"),
              ("moe", "shared_d_ff"), ("moe", "shared_gate"),
              ("model", "embed_dim"), ("model", "share_layers"), ("model", "share_group_size"),
              ("model", "qk_norm"))


# ------------------------------------------------------------------- which checkpoint


def find_checkpoint(root: str | Path, resume: str, checksums: bool = True,
                    exclude: tuple = ()) -> Optional[Path]:
    """``resume``: "none" -> None; "auto" -> the newest complete checkpoint under
    ``root`` (``latest`` if it is complete, else a scan) that is not in ``exclude``, or
    None; anything else is a path, which must be a complete checkpoint (CheckpointError
    otherwise). ``checksums=False``: presence and sizes of the shared files only, each rank
    checking its own file as it loads it (``verify_checkpoint``)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        problems = verify_checkpoint(path, checksums)
        if problems:
            more = f" (and {len(problems) - 1} more; `moe-train ckpt verify {path}` lists them)" \
                if len(problems) > 1 else ""
            raise CheckpointError(f"--resume {resume}: {problems[0]}{more}")
        return path
    root = Path(root)
    pointer = root / LATEST
    candidates = [p for p, _, ok in reversed(list_checkpoints(root, rank_files=checksums))
                  if ok and p not in exclude]
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        elif named not in exclude and (named.exists() or pointer.read_text().strip()):
            log.warning("%s points at %s, which is incomplete; scanning for the newest complete one",
                        pointer, named)
    for candidate in candidates:
        problems = verify_checkpoint(candidate, checksums)
        if not problems:
            return candidate
        log.warning("--resume auto: skipping %s, which fails verification: %s", candidate, problems[0])
        print(f"WARNING: --resume auto: skipping {candidate}: {problems[0]}", flush=True)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory (holding meta.json), or a run's checkpoint directory (its newest
    complete checkpoint). Raises CheckpointError when there is none."""
    path = Path(path)
    if (path / "meta.json").is_file():
        found = find_checkpoint(path.parent, str(path))
    else:
        found = find_checkpoint(path, "auto")
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found


# ------------------------------------------------------------------------ compatible?


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuses a checkpoint whose weights cannot fit this config, naming both values."""
    if QUANTIZATION_FILE in meta.get("files", {}):  # moe-train quantize (moe_train.inference.int8)
        raise CheckpointError(f"checkpoint {path} holds int8 weights for inference ({meta.get('origin')}); "
                              f"training needs the float weights: resume from the checkpoint it was "
                              f"quantized from")
    saved = meta.get("config", {})
    for section, key in SHAPE_KEYS:
        old, new = saved.get(section, {}).get(key), config.get(section, {}).get(key)
        if key in saved.get(section, {}) and old != new:
            raise CheckpointError(f"checkpoint {path} was saved with {section}.{key} = {old!r}, "
                                  f"this run has {section}.{key} = {new!r}: its weights do not fit; "
                                  f"resume with the saved value or start a new checkpoint.dir")


def same_layout(meta: dict, topo: Topology, config: dict) -> bool:
    """Whether an engine checkpoint was saved at this layout (world size, ep, ZeRO stage,
    dtype): only then can its ZeRO partitions be read back."""
    saved_topo, saved_cfg = meta["topology"], meta.get("config", {})
    return (not meta.get("weights_only") and saved_topo["world_size"] == topo.world_size
            and saved_topo["ep_size"] == topo.ep_size
            and saved_cfg.get("parallel", {}).get("zero_stage") == config["parallel"]["zero_stage"]
            and saved_cfg.get("train", {}).get("dtype") == config["train"]["dtype"])


# ----------------------------------------------------------------------- resume choice


@dataclass
class ResumeSource:
    """What a resume loads. ``kind``: "engine" (same layout: exact, ZeRO partitions and
    RNG), "canonical" (any layout), "weights" (a weights-only checkpoint: fresh optimizer
    by design), "fresh_optimizer" (an engine checkpoint at another layout, weights only,
    with ``checkpoint.fresh_optimizer_on_new_layout`` set)."""

    kind: str
    path: Path


def describe_layout(meta: dict) -> str:
    """The layout a checkpoint was saved at, as "world W, ep E, ZeRO Z, dtype"."""
    cfg, topo = meta.get("config", {}), meta["topology"]
    return (f"world {topo['world_size']}, ep {topo['ep_size']}, "
            f"ZeRO {cfg.get('parallel', {}).get('zero_stage', '?')}, {cfg.get('train', {}).get('dtype', '?')}")


def choose_resume(root: str | Path, resume: str, topo, config: dict, checksums: bool = True,
                  exclude: tuple = ()) -> Optional[ResumeSource]:
    """Which checkpoint ``--resume`` (auto, none or a path) loads, and how.

    An engine checkpoint at this layout resumes exactly. At another layout its canonical
    checkpoint (``step_N/canonical``) is loaded, and never silently an optimizer state
    re-initialised: without one, the resume fails naming the conversion command, the
    newest older canonical checkpoint if there is one, and the opt-in
    ``checkpoint.fresh_optimizer_on_new_layout``. ``checksums`` and ``exclude``: as for
    ``find_checkpoint`` (training passes ``checksums=False``: its ranks verify what they load).

    Raises:
        CheckpointError: a checkpoint that fails verification, or the case above.
    """
    path = find_checkpoint(root, resume, checksums, exclude)
    if path is None:
        return None
    meta = read_meta(path) or {}
    if meta.get("kind") == KIND:
        return ResumeSource("canonical", path)
    if same_layout(meta, topo, config):
        return ResumeSource("engine", path)
    if meta.get("weights_only"):
        return ResumeSource("weights", path)
    canonical_dir = complete_canonical(path)
    if canonical_dir is not None:
        problems = verify(canonical_dir, checksums=checksums)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{canonical_dir} is needed to resume {path} on another layout but fails "
                                  f"verification: {problems[0]}{more}; rewrite it with "
                                  f"`moe-train ckpt canonical {path}`")
        return ResumeSource("canonical", canonical_dir)
    if config.get("checkpoint", {}).get("fresh_optimizer_on_new_layout"):
        return ResumeSource("fresh_optimizer", path)
    older = [p for p, _, ok in reversed(list_checkpoints(path.parent))
             if ok and p.name < path.name and complete_canonical(p) is not None]
    alternative = f"; or resume from the older {older[0] / CANONICAL_DIRNAME} (--resume PATH)" if older else ""
    here = (f"world {topo.world_size}, ep {topo.ep_size}, ZeRO {config['parallel']['zero_stage']}, "
            f"{config['train']['dtype']}")
    raise CheckpointError(
        f"{path} was saved at {describe_layout(meta)} and has no canonical checkpoint; this run is {here}, where "
        f"its ZeRO-partitioned optimizer state cannot be read. Convert it with `moe-train ckpt canonical "
        f"{path}` and resume again{alternative}; or set checkpoint.fresh_optimizer_on_new_layout=true to "
        f"load its weights and start AdamW's moments from zero")
