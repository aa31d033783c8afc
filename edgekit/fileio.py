"""Atomic file writes: a reader never sees a half-written artefact."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from edgekit.errors import EdgekitError


def temp_path(path: str | Path) -> Path:
    """A sibling temporary name, renamed over ``path`` once the write is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_target(path: str | Path):
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    The one place that does the write-then-rename dance, so that every writer refuses a
    directory target with one line and never leaves its temporary file behind on failure
    (``os.replace`` onto a directory would raise IsADirectoryError after the write).
    """
    path = Path(path)
    if path.is_dir():
        raise EdgekitError(f"{path} is a directory, not a file; pass a file path such as {path / 'out.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_target(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_target(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path, what: str, fix: str):
    """Parse a JSON file; a missing or corrupt file is one line: ``"{what} {path} ..., {fix}"``."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{what} {path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{what} {path} is not valid JSON ({exc}); {fix}") from None
