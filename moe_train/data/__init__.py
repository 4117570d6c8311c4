"""Streaming data: sentencepiece tokenizer, packed webdataset shards, resumable loader.

Holds the ``data:`` config section (``config``), the tokenizer (``tokenizer``), shard
writing and reading (``build``, ``shards``, ``reader``), the arithmetic that splits an
epoch over ranks and workers (``plan``), the resumable loader (``loader``), synthetic
data for tests and the offline demo (``synthetic``) and the errors that name the file
(``errors``).

May import: ``moe_train.config_checks`` only (the bottom of the house, beside
``parallel``); no torch.distributed.

    from moe_train.data import DataConfig, build_train_loader, build_val_loader
"""
from moe_train.data.config import DataConfig
from moe_train.data.errors import DataError, ShardError, TextError
from moe_train.data.loader import StreamingLoader, build_train_loader, build_val_loader

__all__ = ["DataConfig", "DataError", "ShardError", "TextError", "StreamingLoader",
           "build_train_loader", "build_val_loader"]
