"""Atomic file writes: a reader never sees a half-written artefact."""

from __future__ import annotations

import json
import os
from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """A sibling temporary name, renamed over ``path`` once the write is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
