"""The weights-only checkpoint: model weights and no optimizer, written from one process
(upcycling, pruning, quantizing, Hugging Face import).

It has the engine format's model files (``model_dense.pt``, ``experts_ep000.pt`` with
every expert), ``"weights_only": true`` in meta.json and no rank files; a resume from it
loads at any world size and ep dividing E and starts the optimizer fresh, saying so. An
int8 checkpoint (``moe-train quantize``) adds ``QUANTIZATION_FILE``; training refuses it
(``resume.check_compatible``), inference rebuilds its int8 modules
(``moe_train.inference.int8``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from torch import nn

from moe_train.checkpoint.engine_format import split_state
import moe_train.checkpoint.manifest as mf
from moe_train.checkpoint.state import CheckpointError, TrainState, publish, step_dir_name
from moe_train.parallel.topology import Topology

QUANTIZATION_FILE = "quantization.pt"  # the int8 record of a quantized checkpoint


def save_weights_checkpoint(root: str | Path, *, dense: dict, experts: dict, num_experts: int,
                            config: dict, state: TrainState, origin: str,
                            extra_files: Optional[dict[str, Any]] = None) -> Path:
    """Writes a checkpoint of model weights only, from one process, under ``root`` as
    ``step_N`` (N = ``state.step``) with ``latest`` pointing at it, so that
    ``train --resume auto`` (with ``checkpoint.dir = root``) or ``--resume root/step_N``
    loads it at any world size and ep dividing ``num_experts``; the optimizer starts
    fresh (the resume says so) and the data position continues from
    ``state.loader_states``.

    Args:
        dense: every non-expert parameter and buffer, by the model's state-dict name.
        experts: every expert tensor stacked over ALL experts, ``[E, ...]``.
        origin: what made it ("upcycled from ...", "pruned from ..."), recorded in meta.
        extra_files: further ``name -> object`` files (e.g. quantization scales), listed in
            the manifest like the rest.
    """
    root = Path(root)
    name = step_dir_name(state.step)
    tmp, final = root / f".tmp_{name}", root / name
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = mf.write_listed(tmp, "model_dense.pt", dense)
        entries.update(mf.write_listed(tmp, "experts_ep000.pt", {"first_expert": 0, "tensors": experts}))
        for file_name, obj in (extra_files or {}).items():
            entries.update(mf.write_listed(tmp, file_name, obj))
        publish(root, tmp, final, state, Topology(1, 1, num_experts), config, keep_last=10 ** 9,
                manifest=mf.build_manifest(entries), extra={"weights_only": True, "origin": origin})
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing the checkpoint {final} failed: {err}; nothing was published") from err
    return final


def save_model_checkpoint(root: str | Path, model: nn.Module, config: dict, state: TrainState,
                          origin: str) -> Path:
    """``save_weights_checkpoint`` of a single-process model holding every expert."""
    dense, experts = split_state(model)
    num_experts = config["moe"]["num_experts"]
    for name, t in experts.items():
        if t.shape[0] != num_experts:
            raise ValueError(f"{name} holds {t.shape[0]} experts, not moe.num_experts = {num_experts}: "
                             f"save_model_checkpoint needs a model with every expert (ep 1)")
    return save_weights_checkpoint(root, dense=dense, experts=experts, num_experts=num_experts,
                                   config=config, state=state, origin=origin)
