"""``moe-train import --from-hf``: a Qwen3-MoE / Mixtral / Qwen2-MoE directory -> a
moe_train weights-only checkpoint that ``train --resume`` continues.

    moe-train import --from-hf path/to/hf_model --out runs/imported --config my_training.yaml
    moe-train train --config runs/imported/config.yaml      # --resume auto: the imported weights

What is written under ``--out`` (the layout of ``moe-train upcycle``):
  step_00000000/, latest   a weights-only checkpoint (``checkpoint.save_weights_checkpoint``):
                           fp32 tensors (bf16/fp16 ones widened exactly), experts stacked
                           by global expert id, a manifest; the optimizer starts fresh
  config.yaml              the run's config: ``model`` and ``moe`` keys that shape or define
                           the function come from ``config.json``; every other key (data,
                           optim, train, parallel, logging, and training-only model/moe keys
                           such as moe.capacity_factor, moe.aux_loss_coef, model.dropout)
                           from ``--config`` and ``--set``, else the defaults;
                           ``checkpoint.dir`` is ``--out``
  tokenizer.model          the SentencePiece model, when the directory has one

The data section: a Hugging Face directory has no training data, so it comes from
``--config`` (or ``--set data.manifest=...``); without one, ``data.manifest`` is empty
and the command says to fill it in before training. ``moe.eval_capacity_factor`` is
null (Hugging Face routes every token); ``moe.capacity_factor`` (training) is yours.

Only safetensors is read (``model.safetensors`` or a sharded ``model.safetensors.index.json``),
never a pickle. Every tensor must find its place (a missing one, one left over, or a
non-zero attention bias is an error naming it), and the names and shapes are checked
against the model the config describes before anything is written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from moe_train.checkpoint.state import TrainState
from moe_train.checkpoint.weights import save_weights_checkpoint
from moe_train.config import (Config, ModelConfig, apply_overrides, config_from_dict, config_to_dict, dump_config,
                              parse_override)
from moe_train.hf.mapping import NAMES, config_from_hf
from moe_train.hf.weights import from_hf, model_mismatch, shared_kind
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.grads import is_expert_param


@dataclass
class ImportReport:
    source: Path
    out: Path
    arch: str
    checkpoint: Path
    config_path: Path
    cfg: Config
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"imported {NAMES[self.arch]} ({self.arch}) from {self.source}",
                 f"checkpoint: {self.checkpoint} (weights only; the optimizer starts fresh)",
                 f"config: {self.config_path} (checkpoint.dir = {self.cfg.checkpoint.dir})"]
        lines += [f"note: {n}" for n in self.notes]
        if not self.cfg.data.manifest:
            lines.append(f"next: set data.manifest (and data.seq_len, the training sections) in "
                         f"{self.config_path}, then: moe-train train --config {self.config_path}")
        else:
            lines.append(f"next: moe-train train --config {self.config_path}   (resumes from the imported weights)")
        return lines


def read_hf_dir(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) of a Hugging Face model directory; safetensors only."""
    from safetensors.torch import load_file

    if not (directory / "config.json").is_file():
        raise ValueError(f"--from-hf {directory}: no config.json (not a Hugging Face model directory)")
    config = json.loads((directory / "config.json").read_text())
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        raise ValueError(f"--from-hf {directory}: no model.safetensors (or its index)"
                         + (f"; {', '.join(pickles)} are pickles, which are never loaded: convert them to "
                            f"safetensors first" if pickles else ""))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise ValueError(f"--from-hf {directory}: {name}, listed in the index, is missing")
        tensors.update(load_file(str(directory / name)))
    return config, tensors


def imported_config(base: str | None, overrides: list[str], model: dict, moe: dict, out: Path) -> tuple[dict, list]:
    """The raw config: ``base`` (a YAML file or nothing) with ``overrides`` applied, then
    the imported model/moe keys and checkpoint.dir. An override of an imported key fails."""
    raw: dict = {}
    if base:
        path = Path(base)
        if not path.is_file():
            raise ValueError(f"--config {base}: no such file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--config {base}: top level must be a mapping of sections")
    notes = []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "model" and keys[1] in model or keys[0] == "moe" and keys[1] in moe:
            raise ValueError(f"--set {text}: {'.'.join(keys)} comes from the Hugging Face config.json")
        if keys == ["checkpoint", "dir"]:
            raise ValueError(f"--set {text}: the checkpoint goes to --out ({out}); drop the override")
    raw = apply_overrides(raw, overrides)
    for section, values in (("model", model), ("moe", moe)):
        overwritten = sorted(k for k in values if k in (raw.get(section) or {}) and raw[section][k] != values[k])
        if overwritten:
            notes.append(f"--config's {', '.join(f'{section}.{k}' for k in overwritten)} replaced by the "
                         f"imported model's values")
        raw[section] = {**(raw.get(section) or {}), **values}
    raw.setdefault("checkpoint", {})["dir"] = str(out.resolve())
    data = raw.setdefault("data", {}) or {}
    raw["data"] = data
    if data.get("seq_len", 2048) > model["max_seq_len"]:
        if "seq_len" in data:
            raise ValueError(f"data.seq_len = {data['seq_len']}: longer than the imported model's "
                             f"max_position_embeddings ({model['max_seq_len']})")
        data["seq_len"] = model["max_seq_len"]
        notes.append(f"data.seq_len set to {model['max_seq_len']} (the model's max_position_embeddings)")
    return raw, notes


def _split(sd: dict, cfg: Config, where: str) -> tuple[dict, dict]:
    """(dense, experts) by the model's own marking, after checking every name and shape
    against the model the config describes (built on the meta device)."""

    with torch.device("meta"):
        model = MoETransformer(cfg.model, cfg.moe)
    problem = model_mismatch(sd, model)
    if problem:
        raise ValueError(f"{where}: the converted {problem} (inconsistent config.json?)")
    expert_names = {n for n, p in model.named_parameters(remove_duplicate=False) if is_expert_param(p)}
    dense = {n: t for n, t in sd.items() if n not in expert_names}
    return dense, {n: t for n, t in sd.items() if n in expert_names}


def _adds_bos(source: Path) -> bool:
    path = source / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("add_bos_token", False))


def import_hf(source: str | Path, out: str | Path, base_config: str | None = None,
              overrides: list[str] = ()) -> ImportReport:
    """Writes the checkpoint and config under ``out`` (module docstring).

    Raises:
        ValueError: a config value or tensor with no exact counterpart, a pickle-only
            directory, ``out`` not empty.
    """

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; give a new directory")
    hf, tensors = read_hf_dir(source)
    imp = config_from_hf(hf, str(source))
    notes = list(imp.notes)
    if imp.arch == "qwen2_moe":
        kind = shared_kind(tensors, ModelConfig(**imp.model))
        if kind == "zero":
            imp.moe.update(shared_d_ff=0, shared_gate="none")
            notes.append("the shared experts are all zero: imported without a shared expert (moe.shared_d_ff 0)")
        elif kind == "ungated":
            imp.moe["shared_gate"] = "none"
            notes.append("the shared expert gates are all zero (a constant 1/2): imported as moe.shared_gate none "
                         "with the down projections halved")
    raw, config_notes = imported_config(base_config, list(overrides), imp.model, imp.moe, out)
    notes += config_notes
    cfg = config_from_dict(raw)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    if dtypes != ["float32"]:
        notes.append(f"{'/'.join(dtypes)} tensors stored as float32 (exactly); export with --dtype "
                     f"{dtypes[0]} to get them back bit for bit")
    sd = from_hf(tensors, imp.arch, cfg.model, cfg.moe, str(source))
    dense, experts = _split(sd, cfg, str(source))
    origin = f"imported from Hugging Face {source} ({imp.arch})"
    path = save_weights_checkpoint(out, dense=dense, experts=experts, num_experts=cfg.moe.num_experts,
                                   config=config_to_dict(cfg), state=TrainState(), origin=origin)
    config_path = out / "config.yaml"
    config_path.write_text(f"# {origin}\n# model/moe keys from its config.json; data: fill in before training\n"
                           + dump_config(cfg))
    if (source / "tokenizer.model").is_file():
        shutil.copyfile(source / "tokenizer.model", out / "tokenizer.model")
        notes.append(f"tokenizer: {out / 'tokenizer.model'} (SentencePiece; give it to data_tools/make_shards.py"
                     + (" with --add-bos: this tokenizer puts BOS before a text)" if _adds_bos(source) else ")"))
    else:
        notes.append("tokenizer: the directory has no SentencePiece tokenizer.model; moe_train's data tools "
                     "need one to make shards")
    return ImportReport(source, out, imp.arch, path, config_path, cfg, notes)
