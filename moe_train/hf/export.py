"""``moe-train export --format hf``: a checkpoint -> a transformers model directory.

    moe-train export --checkpoint runs/x/checkpoints --out runs/x/hf --format hf
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('runs/x/hf')"

Steps, all in one process, no model built:
  1. the checkpoint (a step directory, or a checkpoint.dir: its newest complete one) must
     pass ``verify_checkpoint`` (every file and tensor against the manifest): a failing or
     incomplete checkpoint is refused, naming the problem, never exported in part;
  2. the dense tensors and every expert, by global expert id, from EVERY expert-parallel
     rank's ``experts_ep{i}.pt``; an expert id no file holds is an error; names and shapes
     are compared with the model the config describes (built on the meta device);
  3. the plan (``mapping.plan_export``): the architecture, and each option with no exact
     counterpart refused by name (or, with ``--allow-inexact``, a warning naming it);
  4. ``config.json``, ``generation_config.json``, ``model.safetensors`` (safetensors only,
     no pickle) and the tokenizer files (``tokenizer.py``), into a temporary directory
     renamed to ``--out`` at the end;
  5. with ``--check``: transformers loads the result and its logits and greedy tokens are
     compared with ours (``check_export``), the difference printed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moe_train.checkpoint.state import CheckpointError, list_checkpoints, read_meta
from moe_train.checkpoint.verify import verify_checkpoint
from moe_train.config import Config, config_from_dict
from moe_train.data.tokenizer import tokenizer_kind
from moe_train.hf.mapping import NAMES, ExportPlan, hf_config, plan_export
from moe_train.hf.weights import model_mismatch, to_hf
from moe_train.inference.generate import load_run_tokenizer, sample_tokens
from moe_train.inference.load import load_for_inference, tokenizer_path
from moe_train.model.transformer import MoETransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportReport:
    checkpoint: Path
    out: Path
    plan: ExportPlan
    dtype: str
    num_tensors: int
    tokenizer_files: list[str] = field(default_factory=list)
    tokenizer_source: str = ""

    check: Optional[dict] = None

    def lines(self) -> list[str]:
        out = [f"exported {self.checkpoint} -> {self.out}",
               f"architecture: {NAMES[self.plan.arch]} ({self.plan.arch}), {self.num_tensors} tensors in "
               f"model.safetensors, {self.dtype}"]
        out += [f"note: {n}" for n in self.plan.notes]
        out += [f"WARNING: inexact (--allow-inexact): {d}" for d in self.plan.inexact]
        if self.tokenizer_files:
            lib = "tokenizers library's" if self.tokenizer_source.endswith(".json") else "SentencePiece"
            out.append(f"tokenizer: {', '.join(self.tokenizer_files)} from {self.tokenizer_source} "
                       f"(checked: encodes the probe texts to the {lib} ids)")
        else:
            out.append("tokenizer: none written (--no-tokenizer)")
        if self.check:
            c = self.check
            out.append(f"check (--check): transformers vs moe_train on {c['batch']} x {c['seq_len']} random tokens, "
                       f"fp32: max |logit difference| {c['max_abs_diff']:.3g} (max |logit| {c['max_abs_logit']:.3g}); "
                       f"greedy {c['new_tokens']} tokens {'equal' if c['greedy_equal'] else 'DIFFER'}")
        out.append(f"load: transformers.AutoModelForCausalLM.from_pretrained({str(self.out)!r})")
        return out


def resolve_strict(path: str | Path) -> Path:
    """The checkpoint to export: a step directory as given, or a checkpoint.dir's newest
    complete one, which must pass verification (an older one is never taken silently:
    name it)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--checkpoint {path}: no such directory")
    if not (path / "meta.json").is_file():
        complete = [p for p, _, ok in list_checkpoints(path) if ok]
        pointer = path / "latest"
        named = path / pointer.read_text().strip() if pointer.is_file() else None
        if not complete:
            raise CheckpointError(f"no complete checkpoint under {path}")
        path = named if named in complete else complete[-1]
    problems = verify_checkpoint(path)
    if problems:
        good = _newest_good(path.parent, path)
        hint = f"; {good} passes verification: export it by name" if good else ""
        more = f" (and {len(problems) - 1} more: moe-train ckpt verify {path})" if len(problems) > 1 else ""
        raise CheckpointError(f"{path} fails verification, refusing to export it: {problems[0]}{more}{hint}")
    return path


def _newest_good(root: Path, exclude: Path) -> Optional[Path]:
    for candidate, _, complete in reversed(list_checkpoints(root)):
        if complete and candidate != exclude and not verify_checkpoint(candidate):
            return candidate
    return None


def read_tensors(path: Path) -> tuple[dict, Config, dict]:
    """(meta, config, full state dict with experts stacked over all E) of a verified
    checkpoint, tensors in their stored dtype."""
    meta = read_meta(path)
    if "quantization.pt" in meta.get("files", {}):
        raise ValueError(f"{path} holds int8 weights for inference ({meta.get('origin')}); export the "
                         f"checkpoint it was quantized from")
    cfg = config_from_dict(meta["config"])
    E, ep = cfg.moe.num_experts, meta["topology"]["ep_size"]
    sd = dict(torch.load(path / "model_dense.pt", map_location="cpu", weights_only=True))
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for i in range(ep):  # every expert-parallel rank's file
        name = f"experts_ep{i:03d}.pt"
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing (saved at ep {ep}, its experts live there)")
        part = torch.load(path / name, map_location="cpu", weights_only=True)
        for tname, t in part["tensors"].items():
            for j in range(t.shape[0]):
                rows.setdefault(tname, {})[part["first_expert"] + j] = t[j]
    for tname, by_id in rows.items():
        missing = sorted(set(range(E)) - set(by_id))
        if missing or len(by_id) != E:
            raise CheckpointError(f"{path}: {tname} lacks experts {missing[:8]} of {E} in its experts_ep*.pt "
                                  f"files; the checkpoint is incomplete")
        sd[tname] = torch.stack([by_id[g] for g in range(E)])
    _check_names(sd, cfg, path)
    return meta, cfg, sd


def _check_names(sd: dict, cfg: Config, path: Path) -> None:
    """Names and shapes against the model the config describes (meta device: no memory)."""

    with torch.device("meta"):
        problem = model_mismatch(sd, MoETransformer(cfg.model, cfg.moe))
    if problem:
        raise CheckpointError(f"{path}: against the model of its config: {problem}")


def _selection_bias_is_zero(sd: dict) -> bool:
    biases = [t for n, t in sd.items() if n.endswith("router.expert_bias")]
    return bool(biases) and not any(bool(t.any()) for t in biases)


def _stored_dtype(sd: dict) -> str:
    t = sd["embed.weight"]
    return {v: k for k, v in DTYPES.items()}.get(t.dtype, "float32")


def _tokenizer_source(cfg: Config, path: Path, tokenizer: Optional[str]) -> tuple[str, bool]:
    """(SentencePiece .model or tokenizer.json path, add_bos): --tokenizer, else the one
    the training data manifest names, else a ``tokenizer.model`` / ``tokenizer.json``
    beside the checkpoint (``moe-train import`` copies one there)."""

    add_bos = False
    manifest = cfg.data.manifest
    if manifest and Path(manifest).is_file():
        add_bos = bool(json.loads(Path(manifest).read_text()).get("add_bos", False))
    beside = [p for p in (path.parent / "tokenizer.model", path.parent / "tokenizer.json") if p.is_file()]
    try:
        return tokenizer_path(cfg, tokenizer or ""), add_bos
    except ValueError as err:
        if beside and not tokenizer:
            return str(beside[0]), add_bos
        raise ValueError(f"{err}; or pass --no-tokenizer to export the model without one") from None


def export_hf(checkpoint: str | Path, out: str | Path, arch: str = "auto", allow_inexact: bool = False,
              dtype: str = "auto", tokenizer: Optional[str] = None, with_tokenizer: bool = True,
              check: bool = False) -> ExportReport:
    """Writes the Hugging Face directory ``out`` (module docstring); returns the report.

    Raises:
        CheckpointError: the checkpoint fails verification or is incomplete.
        ValueError: an option without a counterpart, ``out`` not empty, no tokenizer.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; give a new directory")
    path = resolve_strict(checkpoint)
    meta, cfg, sd = read_tensors(path)
    plan = plan_export(cfg.model, cfg.moe, arch, selection_bias_is_zero=_selection_bias_is_zero(sd))
    plan.check(allow_inexact)
    dtype = _stored_dtype(sd) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: must be auto or one of {', '.join(DTYPES)}")
    source, add_bos = _tokenizer_source(cfg, path, tokenizer) if with_tokenizer else ("", False)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer_files, special = [], {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if with_tokenizer and tokenizer_kind(source) == "tokenizers":  # copied as it is
            from moe_train.hf.tokenizer import write_tokenizer_json

            tok = load_run_tokenizer(cfg, source)
            special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
            tokenizer_files = write_tokenizer_json(tok, tmp, add_bos, cfg.model.max_seq_len)
        elif with_tokenizer:
            from moe_train.hf.tokenizer import special_ids, write_tokenizer

            import sentencepiece as spm
            special = special_ids(spm.SentencePieceProcessor(model_file=source))
            tokenizer_files = write_tokenizer(source, tmp, add_bos, cfg.model.max_seq_len)
        tensors = to_hf(sd, cfg.model, cfg.moe, plan, DTYPES[dtype])
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "moe_train_checkpoint": str(path), "moe_train_step": str(meta["step"])})
        config = hf_config(cfg.model, cfg.moe, plan, dtype, special)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in special.items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(path, out, plan, dtype, len(tensors), tokenizer_files, source)
    if check:
        report.check = check_export(path, out)
    return report


def check_export(checkpoint: Path, out: Path, seq_len: int = 32, batch: int = 2, new_tokens: int = 16,
                 seed: int = 0) -> dict:
    """Loads both sides in fp32 (ours with ``load_for_inference``, as the checkpoint
    configures it; theirs with ``AutoModelForCausalLM``) and compares the logits on a
    random batch and ``new_tokens`` greedy tokens (ours recomputes the context, theirs
    uses its KV cache)."""
    from transformers import AutoModelForCausalLM

    ours = load_for_inference(checkpoint).model.float()
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    seq_len = min(seq_len, ours.cfg.max_seq_len - new_tokens)
    x = torch.randint(0, ours.cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(x).logits_BSV, theirs(x).logits
        context = x[0, :max(1, seq_len // 2)].tolist()
        generated = theirs.generate(torch.tensor([context]), max_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(context):].tolist()
    return {"batch": batch, "seq_len": seq_len, "new_tokens": new_tokens,
            "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "greedy_equal": generated == sample_tokens(ours, context, new_tokens, temperature=0)}
