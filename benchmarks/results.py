"""Results files shared by several scripts (docs/model_options.json has one section per
script): read-modify-write one top-level section under an exclusive file lock, so that
two scripts finishing at the same time do not clobber each other's sections."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def update_json_section(path: str | Path, section: str, value: Any) -> dict:
    """Sets ``data[section] = value`` in the JSON file at ``path`` (created if absent) and
    returns the whole document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        data[section] = value
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return data
