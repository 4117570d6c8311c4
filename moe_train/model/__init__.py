"""The transformer around the MoE layers.

Holds the ``model:`` config section (``config``), attention patterns and kernels
(``attention``), the dense layers (``layers``), the transformer (``transformer``), its
sizes (``sizing``: parameters, FLOPs, memory) and how a run builds it (``build``).

May import: ``moe_train.config_checks``, ``moe_train.parallel`` (process groups are
passed in, never looked up) and ``moe_train.moe``.
"""
