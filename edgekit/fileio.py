"""Atomic file writes and output checks: a reader never sees a half-written artefact, and
nothing is left behind when a write fails or the run is interrupted.

Every artefact is written under a temporary sibling name and renamed into place; folders
of artefacts are built in a hidden staging folder and moved in when complete. Temporary
names are removed on any exception, including the KeyboardInterrupt that the CLI raises
for SIGINT and SIGTERM. Outputs are checked before work starts (:func:`check_output_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from edgekit.errors import EdgekitError

_UMASK = None


def _file_mode() -> int:
    """0666 less the process umask: what ``open()`` would give, for files that libraries
    create with tighter modes (safetensors writes 0600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


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
    make_dirs(path.parent)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
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
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_results(out: str | Path, stem: str, record: dict, text: str) -> list[Path]:
    """A benchmark's result pair, ``<stem>.json`` (the record) and ``<stem>.md`` (``text``),
    under ``out`` (made if missing), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [write_json_atomic(out / f"{stem}.json", record), write_text_atomic(out / f"{stem}.md", text)]


def read_json(path: str | Path, what: str, fix: str):
    """Parse a JSON file; a missing or corrupt file is one line: ``"{what} {path} ..., {fix}"``."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{what} {path} not found; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{what} {path} is not valid JSON ({str(exc)[:120]}); {fix}") from None


def make_dirs(folder: str | Path) -> Path:
    """``mkdir -p`` whose failure (a file in the way, no permission) is one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EdgekitError(f"cannot create folder {folder}: a file of that name is in the way; choose another "
                           f"output path") from None
    except NotADirectoryError:
        raise EdgekitError(f"cannot create folder {folder}: part of its path is a file; choose another output "
                           f"path") from None
    return folder


def check_output_dir(folder: str | Path, flag: str = "--out", *, min_free_mb: float = 0.0) -> Path:
    """Check before any work that ``folder`` can hold the stage's outputs: not a file, under
    a writable existing ancestor, with ``min_free_mb`` free where the stage knows its size.
    Creates nothing (a failed stage must not leave an empty folder behind)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EdgekitError(f"{flag} {folder} is a file, not a folder; choose a folder path")
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgekitError(f"{flag} {folder}: {ancestor} is a file, so the folder cannot be created; choose "
                           f"another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EdgekitError(f"{flag} {folder}: {ancestor} is not writable; choose a folder you can write to")
    if min_free_mb > 0:
        free = shutil.disk_usage(ancestor).free / 1e6
        if free < min_free_mb:
            raise EdgekitError(f"{flag} {folder}: only {free:.0f} MB free on its disk, the stage needs about "
                               f"{min_free_mb:.0f} MB; free some space or choose another disk")
    return folder


def check_output_file(path: str | Path, flag: str) -> Path:
    """:func:`check_output_dir` for a file target: its folder must be creatable, and the
    target itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise EdgekitError(f"{flag} {path} is a folder; pass a file path such as {path / 'out.json'}")
    check_output_dir(path.parent, flag)
    return path


@contextlib.contextmanager
def staging_folder(out: str | Path):
    """A hidden folder beside ``out`` to build artefacts in; removed whatever happens.
    Move finished files in with :func:`move_into`."""
    out = Path(out)
    make_dirs(out.parent)
    stage = out.parent / f".{out.name}.partial{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def move_into(stage: Path, out: Path) -> list[Path]:
    """Move every finished file from a staging folder into ``out`` (one rename each)."""
    make_dirs(out)
    moved = []
    for path in sorted(stage.iterdir()):
        os.replace(path, out / path.name)
        moved.append(out / path.name)
    return moved


def remove_if_empty(folder: str | Path) -> None:
    """Remove a folder a failed stage created but never wrote into."""
    with contextlib.suppress(OSError):
        Path(folder).rmdir()


def confined_path(root: str | Path, name: str, where: str) -> Path:
    """``root / name`` for a file name read from a data set, refused when it would point
    outside ``root`` (an absolute path, ``..``, a symlink out): a malicious data set must
    not pull in files from elsewhere on the machine."""
    root = Path(root)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
        raise EdgekitError(f"{where}: file name {name!r} must be a plain name relative to {root}")
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise EdgekitError(f"{where}: file name {name!r} points outside {root}; data set paths must stay inside it")
    return root / name


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error on a file: what, which file, how to fix."""
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    fixes = {errno.ENOSPC: "the disk is full; free some space or write elsewhere",
             errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
             errno.EACCES: "permission denied; choose a path you can write to",
             errno.EPERM: "operation not permitted; choose a path you can write to",
             errno.EROFS: "the file system is read-only; write elsewhere",
             errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
             errno.EISDIR: "a folder is in the way; pass a file path",
             errno.ENOENT: "no such file or folder; check the path",
             errno.ENAMETOOLONG: "the file name is too long; choose a shorter path",
             errno.EMFILE: "too many open files; raise the limit (ulimit -n) or process fewer files at once"}
    fix = fixes.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"cannot use{where}: {fix}"
