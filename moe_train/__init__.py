"""moe_train: Mixture-of-Experts pretraining with expert parallelism and DeepSpeed ZeRO."""

__version__ = "0.1.0"
