"""Command-line tools over moe_train.data (train_tokenizer, make_shards, inspect_shards)."""
