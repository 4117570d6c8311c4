"""Loading a checkpoint for inference, in one process, whatever expert parallelism
trained it.

The model is rebuilt from the resolved config stored in the checkpoint's ``meta.json``
(``MoETransformer(cfg.model, cfg.moe)``, no process group), then the dense weights and
every expert are loaded, experts by global expert id from all of the ``experts_ep*.pt``
files (``load_model_weights`` with a world-1, ep-1 topology), so a checkpoint saved at
ep = 2, 4, ... loads the same as one saved at ep = 1. A pruned checkpoint (``moe-train
prune``) is an ordinary one with fewer experts in its config; an int8 one (``moe-train
quantize``, ``quantization.pt`` in its manifest) gets its int8 modules (``int8``) before
the int8 tensors load.

The model runs in eval mode: no dropout, no router jitter, and each MoE layer's capacity
comes from ``moe.eval_capacity_factor`` over the tokens in flight, as when the
validation loss was measured; ``dropless=True`` (``--dropless``) routes every token
instead. ``heldout_loss`` scores it on its validation split with the one evaluation
(``moe_train.train.evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moe_train.checkpoint.engine_format import load_model_weights
from moe_train.checkpoint.resume import resolve_checkpoint
from moe_train.checkpoint.state import read_meta
from moe_train.config import Config, config_from_dict
from moe_train.data import build_val_loader
from moe_train.inference.int8 import finish_load, prepare_for_load, read_record
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.topology import Topology
from moe_train.train.evaluate import evaluate


@dataclass
class LoadedModel:
    """A checkpoint in one process: the model (eval mode), its config and meta; for an
    int8 checkpoint (``moe-train quantize``) its quantization record."""

    model: torch.nn.Module
    cfg: Config
    meta: dict
    path: Path
    quantization: Optional[dict] = None


def load_for_inference(path: str | Path, dropless: bool = False) -> LoadedModel:
    """Rebuilds the model of a checkpoint in this process and loads every expert.

    Args:
        path: a step directory or a checkpoint root (see `resolve_checkpoint`).
        dropless: route every token (``moe.eval_capacity_factor = None``) instead of the
            configured eval capacity.
    """
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    if dropless:
        cfg.moe = dataclasses.replace(cfg.moe, eval_capacity_factor=None)
    torch.manual_seed(cfg.train.seed)  # irrelevant after loading; keeps construction quiet
    model = MoETransformer(cfg.model, cfg.moe)  # ep_group None: every expert is local
    quantization = read_record(path, meta)  # moe-train quantize wrote int8 weights + scales
    if quantization is not None:
        prepare_for_load(model, quantization, path)  # the int8 modules, before their tensors load
    # world 1, ep 1: rank 0 owns experts [0, E), gathered from every experts_ep*.pt file
    load_model_weights(path, model, Topology(1, 1, cfg.moe.num_experts), rank=0)
    if quantization is not None:
        finish_load(model, quantization)
    model.eval()
    return LoadedModel(model, cfg, meta, path, quantization)


def tokenizer_path(cfg: Config, override: str = "") -> str:
    """The tokenizer the training shards were made with (from the data manifest)."""
    if override:
        return override
    manifest = cfg.data.manifest
    if not manifest or not Path(manifest).is_file():
        raise ValueError(f"data.manifest {manifest!r} of the checkpoint's config is not a readable "
                         f"file here; give --tokenizer PATH.model")
    model = json.loads(Path(manifest).read_text()).get("tokenizer", {}).get("model", "")
    if not model or not Path(model).is_file():
        raise ValueError(f"the manifest {manifest} names tokenizer {model!r}, which does not exist; "
                         f"give --tokenizer PATH.model")
    return model


def heldout_loss(loaded: LoadedModel, max_batches: int = 0) -> tuple[float, int]:
    """Token-weighted mean cross-entropy of a loaded checkpoint over the validation split
    of its training manifest, in this process (``moe_train.train.evaluate``). Batches are
    the training micro-batches, so each MoE layer routes as many tokens at a time as one
    rank did in the training run's evaluation (same eval capacity). Returns (loss, tokens)."""
    result = evaluate(loaded.model, build_val_loader(loaded.cfg.data, 0, 1), max_batches=max_batches)
    return result.loss, result.tokens
