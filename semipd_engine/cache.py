"""The project's calibration caches: one folder, JSON files of key -> measurement.

Everything measured once per machine (the dtype probe, SLO baselines, step-probe calibration, capacity) lives in
`$SEMIPD_CACHE` (default ~/.cache/semipd_engine); delete a file to measure again. Writes replace the file
atomically, so concurrent first runs never read half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("SEMIPD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "semipd_engine")))


def read(path: Path) -> dict[str, Any]:
    """The file's entries; {} when it is missing or unreadable (a cache is never worth failing a run)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def update(path: Path, key: str, value: Any) -> None:
    data = read(path)
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
