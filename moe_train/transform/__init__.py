"""Checkpoint in, checkpoint out: every command that turns one checkpoint into another.

  ``upcycle``   a dense checkpoint becomes a MoE one (sparse upcycling)
  ``prune``     drop the least-loaded experts; magnitude-prune dense weights
  ``quantize``  int8 weight-only copy (the format: ``moe_train.inference.int8``)
  ``convert``   an engine checkpoint's canonical checkpoint (``moe-train ckpt canonical``)
  ``report``    the before/after table prune and quantize print (weights, bytes, loss)

Each reads a verified checkpoint in one process (``convert``: the saved number of ranks)
and writes a new one through ``moe_train.checkpoint``; none changes its input.

May import: ``inference``, ``train`` (the engine and the evaluation), ``checkpoint``,
``config``, ``model``, ``moe``, ``data``, ``parallel``; never ``hf`` or ``commands``.

    from moe_train.transform import upcycle_checkpoint, prune_checkpoint, quantize_checkpoint, convert
"""

from moe_train.transform.convert import convert
from moe_train.transform.prune import prune_checkpoint
from moe_train.transform.quantize import quantize_checkpoint
from moe_train.transform.upcycle import upcycle_checkpoint

__all__ = ["convert", "prune_checkpoint", "quantize_checkpoint", "upcycle_checkpoint"]
