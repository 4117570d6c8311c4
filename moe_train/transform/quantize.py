"""Float checkpoint in, int8 checkpoint out: ``moe-train quantize``.

The scheme and the int8 modules are the int8 model format (``moe_train.inference.int8``);
this writes them as a weights-only checkpoint with ``quantization.pt`` and prints the
before/after table (``report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from moe_train.checkpoint.engine_format import split_state
from moe_train.checkpoint.state import TrainState
from moe_train.checkpoint.weights import QUANTIZATION_FILE, save_weights_checkpoint
from moe_train.config import config_to_dict
from moe_train.inference.int8 import SCHEME, tied_head, quantize_model, read_record
from moe_train.inference.load import load_for_inference
import moe_train.transform.report as report


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, dynamic: bool = False,
                        eval_batches: int = 0, data: Optional[str] = None,
                        log: Callable[[str], None] = print) -> dict:
    """``moe-train quantize``: loads ``checkpoint`` (one process, any ep it was trained at),
    quantizes it (module docstring), writes a weights-only checkpoint under ``out``
    (``out/step_N``, ``latest``) with ``quantization.pt``, reloads it as ``generate`` does
    and measures both sides.

    Returns:
        {"path", "before", "after" (``report.Snapshot``), "modules"}.
    """
    out = report.check_out_dir(out)
    loaded = report.with_data(load_for_inference(checkpoint), data)
    if read_record(loaded.path, loaded.meta) is not None:
        raise ValueError(f"{loaded.path} is already int8 (moe-train quantize); quantize the float checkpoint")
    log(f"# moe-train quantize: {loaded.path} (step {loaded.meta['step']}, {loaded.cfg.moe.num_experts} experts)")
    before = report.snapshot(loaded, loaded.path, eval_batches)
    model = loaded.model
    tied = tied_head(model) is not None
    names = quantize_model(model)
    unique = {kind: len({id(model.get_submodule(n)) for n in paths}) for kind, paths in names.items()}
    log(f"{SCHEME}: {unique['linears']} dense linears, {unique['experts']} expert sets, "
        f"{unique['shared']} shared experts; fp32: embeddings{' (tied head)' if tied else ''}, "
        f"norms, routers")
    if dynamic:
        log("--dynamic: the dense linears run as torch.ao.nn.quantized.dynamic.Linear (int8 GEMMs, CPU); "
            "torch.ao.quantization is deprecated in torch 2.13 (torchao replaces it) but works")
    dense, experts = split_state(model)
    config = config_to_dict(loaded.cfg)
    config["checkpoint"]["dir"] = str(out)
    record = {"format": 1, "scheme": SCHEME, "modules": names, "dynamic": dynamic, "source": str(loaded.path)}
    saved = loaded.meta.get("train_state", {})
    state = TrainState(**{k: saved[k] for k in ("step", "tokens_seen", "skipped_steps", "loader_states") if k in saved})
    path = save_weights_checkpoint(out, dense=dense, experts=experts, num_experts=loaded.cfg.moe.num_experts,
                                   config=config, state=state, origin=f"int8-quantized from {loaded.path}",
                                   extra_files={QUANTIZATION_FILE: record})
    after_loaded = report.with_data(load_for_inference(path), data)
    after = report.snapshot(after_loaded, path, eval_batches)
    after.weights, after.nonzero = report.weight_counts(model)  # the dynamic modules hide theirs
    log(f"wrote {path} (int8 + scales in the manifest; generate and evaluation load it, "
        f"train --resume refuses it)")
    for line in report.table(before, after):
        log(line)
    return {"path": path, "before": before, "after": after, "modules": names}
