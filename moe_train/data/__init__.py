"""Streaming data: sentencepiece tokenizer, packed webdataset shards, resumable loader.

    from moe_train.data import DataConfig, build_train_loader, build_val_loader
"""
from moe_train.data.config import DataConfig
from moe_train.data.errors import DataError, ShardError, TextError
from moe_train.data.loader import StreamingLoader, build_train_loader, build_val_loader

__all__ = ["DataConfig", "DataError", "ShardError", "TextError", "StreamingLoader",
           "build_train_loader", "build_val_loader"]
