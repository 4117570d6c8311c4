"""Error types of the data pipeline.

Every error a user can cause names what and where: the shard URL and tar member for a
bad shard, the file and line for bad text, the config field and value for a bad option.
"""
from __future__ import annotations

from typing import Optional


class DataError(RuntimeError):
    """A problem with the data itself (not with the config)."""


class ShardError(DataError):
    """A shard that cannot be read or holds an invalid sample.

    Args:
        shard: URL or path of the shard.
        member: tar member name, or None when the problem is with the whole shard.
        reason: what is wrong, in words a user can act on.
    """

    def __init__(self, shard: str, member: Optional[str], reason: str):
        self.shard = shard
        self.member = member
        self.reason = reason
        where = f"shard {shard!r}" + (f", member {member!r}" if member else "")
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # Picklable with its fields, so it survives a DataLoader worker boundary.
        return (ShardError, (self.shard, self.member, self.reason))


class TextError(DataError):
    """Input text that cannot be decoded or parsed at tokenize time.

    Args:
        path: input file.
        line: 1-based line number (0 when unknown).
        reason: what is wrong.
    """

    def __init__(self, path: str, line: int, reason: str):
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")

    def __reduce__(self):
        return (TextError, (self.path, self.line, self.reason))
