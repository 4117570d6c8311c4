"""Training: the loop and everything it drives.

  ``loop``          ``train(cfg)``: config -> distributed -> topology -> model -> engine ->
                    data -> loop -> close, read top to bottom
  ``step``          one optimizer step over the micro-batches (``train_step``)
  ``evaluate``      the one evaluation (training, ``moe-train eval``, prune/quantize)
  ``engine``        the DeepSpeed bridge: the only ``deepspeed.initialize``
  ``schedule``      the learning rate as a pure function of the step
  ``control``       stop requests from signals and the Slurm time limit; exit codes
  ``determinism``   ``train.deterministic``
  ``faults``        the one seam for test faults (empty in production)
  ``memory_probe``  the allocator's peak per training phase (``check --measure``,
                    ``benchmarks/memory.py``)
  ``metrics/``      TensorBoard writer, reductions, routing health, perf, console line

May import: everything below it (``config``, ``checkpoint``, ``model``, ``moe``,
``data``, ``parallel``); never ``inference``, ``transform``, ``hf`` or ``commands``.

    from moe_train.train import train, TrainResult

This file imports nothing eagerly: ``python -m moe_train train`` installs its stop
handlers from ``control`` before torch is imported (a signal during start-up is a stop
request, not a kill), so importing the package must stay cheap. ``train`` and
``TrainResult`` load ``loop`` on first use.
"""

__all__ = ["train", "TrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from moe_train.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
