"""Hugging Face export and import: ``moe-train export --format hf`` and ``moe-train import --from-hf``.

A moe_train model becomes a directory that ``transformers.AutoModelForCausalLM`` loads
with no custom code, in the transformers architecture that computes the same function:

  qwen3_moe  Qwen3-MoE: per-head q/k RMSNorm (``model.qk_norm``), no shared expert; dense
             blocks placed by ``decoder_sparse_step`` (= ``model.moe_every``) and
             ``mlp_only_layers`` (the first ``model.first_dense_layers``)
  mixtral    Mixtral: no qk norm, every block MoE, renormalised top-k, no shared expert
  qwen2_moe  Qwen2-MoE: no qk norm, a sigmoid-gated shared expert (``moe.shared_gate``),
             dense blocks as Qwen3-MoE; its q/k/v biases are written as zeros

Which of our options map where, and which are refused or exported only with
``--allow-inexact``: ``mapping.py`` (and docs/checkpoints.md). Tensor names and
layouts: ``weights.py``. The tokenizer (a ``tokenizer.json`` built from our
SentencePiece model, checked to encode like it): ``tokenizer.py``. The commands:
``export.py`` and ``importer.py``.

Only safetensors is written and read (never a pickle). ``transformers`` is needed for
the tokenizer files only (``pip install moe_train[hf]``); the import needs
``safetensors`` alone.

May import: ``inference`` (export's check loads the checkpoint as ``generate`` does),
``checkpoint``, ``config``, ``model``, ``moe``, ``parallel``; never ``transform`` or
``commands``.
"""

from moe_train.hf.mapping import ARCHS  # noqa: F401
