"""The two checks every config section uses: one ``ValueError`` naming the key, the
value and what to do (``section.key = value: why``)."""

from __future__ import annotations

from typing import Any


def fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{key} = {value!r}: {why}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        fail(key, value, f"must be one of {', '.join(map(str, allowed))}")
