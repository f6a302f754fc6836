"""Crash-safe file output: the one way lowbit writes a file or a folder.

A file is written to a temporary sibling, flushed and fsync'd, renamed over the target, and the
parent folder is fsync'd, so a reader (or a run killed at any instant) sees the old file or the
new one, never a half-written one. A folder is built under a temporary sibling name and renamed
into place the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it survives a power loss (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: ``data`` is bytes, text (UTF-8) or a function writing to a binary file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def tmp_prefix(target: Path) -> str:
    """Name prefix of ``target``'s temporary siblings; the writer's pid follows it."""
    return f".{target.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(target: str | os.PathLike) -> int:
    """Remove temporary siblings of ``target`` left by writers that died (killed mid-write).

    Returns how many were removed. Those of live processes are left alone.
    """
    target = Path(target)
    prefix = tmp_prefix(target)
    removed = 0
    for entry in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block finishes without error.

    Every file in it is fsync'd before the rename; on error the temporary folder is removed.
    An existing ``target`` is replaced (``replace=True``) or kept, the new folder discarded
    (``replace=False``: for caches that another process may have filled meanwhile).
    Temporary folders of dead writers of the same ``target`` are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        tmp.chmod(0o755)
        old = None
        if target.exists():
            if not replace:
                return
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path for a writer that needs a path (not a file object); on success
    it is fsync'd and renamed over ``target``, on error removed."""
    target = Path(target)
    remove_stale_tmp(target)
    fd, name = tempfile.mkstemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
