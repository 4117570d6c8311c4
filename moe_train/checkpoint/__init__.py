"""Checkpoints: the formats, their manifests, atomic publishing, and which one a resume
loads and how.

  ``state``            errors, ``TrainState``, meta.json, listing, collective agreement,
                       atomic publish (``.tmp_step_N`` -> ``step_N`` -> ``latest``), provenance
  ``manifest``         every file and tensor with shape, dtype and CRC-32; checked on load
  ``engine_format``    what training writes: per-rank ZeRO partitions, experts by global id
  ``optimizer_state``  DeepSpeed's optimizer state: what the engine format stores, and
                       per-parameter masters and moments (``OptimizerView``)
  ``rng``              RNG states (saved, or re-derived from seed, step and rank)
  ``weights``          the weights-only format (upcycle, prune, quantize, HF import)
  ``canonical``        the whole state by parameter name, loadable at any layout (DCP)
  ``verify``           a checkpoint against its manifest, without a model
  ``resume``           which checkpoint ``--resume`` loads, and how; config compatibility

May import: ``moe_train.parallel`` (topology, groups, expert-parameter marks) and
``moe_train.config_checks``; never the model, the training loop or the config loader
(the resolved config travels as a plain dict). The full text: docs/checkpoints.md.

    from moe_train.checkpoint import CheckpointError, find_checkpoint, verify_checkpoint
"""

from moe_train.checkpoint.engine_format import load_model_weights, save_checkpoint, split_state
from moe_train.checkpoint.resume import find_checkpoint, resolve_checkpoint
from moe_train.checkpoint.state import (LATEST, CheckpointError, TrainState, is_complete, list_checkpoints, read_meta,
                                        step_dir_name)
from moe_train.checkpoint.verify import verify_checkpoint
from moe_train.checkpoint.weights import save_model_checkpoint, save_weights_checkpoint

__all__ = ["LATEST", "CheckpointError", "TrainState", "find_checkpoint", "is_complete", "list_checkpoints",
           "load_model_weights", "read_meta", "resolve_checkpoint", "save_checkpoint", "save_model_checkpoint",
           "save_weights_checkpoint", "split_state", "step_dir_name", "verify_checkpoint"]
