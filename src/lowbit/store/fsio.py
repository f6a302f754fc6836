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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lowbit.errors import LowbitError


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


def old_prefix(target: Path) -> str:
    """Name prefix of the sibling an output being replaced is parked under; the writer's pid follows it."""
    return f".{target.name}.old-"


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is that of a temporary or parked sibling (``.NAME.tmp-PID-*``, ``.NAME.old-PID``)."""
    for mark in (".tmp-", ".old-"):
        head, sep, tail = name.rpartition(mark)
        if sep and head.startswith(".") and tail.split("-", 1)[0].isdigit():
            return True
    return False


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute without resolving links (so that ``.`` has a name and a parent)."""
    return Path(os.path.abspath(os.fspath(path)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _dead_writers(target: Path, prefix: str) -> Iterator[Path]:
    """Siblings of ``target`` named ``prefix + PID...`` whose process PID is gone."""
    for entry in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            yield entry


def remove_stale_tmp(target: str | os.PathLike) -> int:
    """Remove temporary siblings of ``target`` left by writers that died (killed mid-write).

    A previous output parked aside by a writer killed between its two renames
    (``.NAME.old-PID``) is put back when ``target`` is missing, else removed.
    Returns how many were removed or restored. Those of live processes are left alone.
    """
    target = absolute(target)
    if not target.parent.is_dir():
        return 0
    count = 0
    for entry in _dead_writers(target, old_prefix(target)):
        if not target.exists() and not target.is_symlink():
            os.rename(entry, target)
        else:
            _remove(entry)
        count += 1
    for entry in _dead_writers(target, tmp_prefix(target)):
        _remove(entry)
        count += 1
    return count


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
    target = absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
                file.chmod(0o644)  # as atomic_path: readable like any other output (mkstemp-like writers use 0600)
        tmp.chmod(0o755)
        if target.exists() and not replace:
            return
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``; an existing ``target`` is parked aside first and
    removed after, or put back when the second rename fails (a kill in between is undone by
    :func:`remove_stale_tmp`)."""
    old = None
    if target.exists():
        old = target.with_name(f"{old_prefix(target)}{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, staging: str, last: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a staging folder ``folder/staging``; when the block finishes, its files move up into the
    existing ``folder`` (each fsync'd, then renamed over any old copy), the names in ``last`` last,
    with their old copies removed before anything moves. A reader that trusts ``folder`` only when
    the ``last`` files are there sees the old files or the whole new set, never a mix; on error the
    staging folder is removed and ``folder`` keeps what it had."""
    folder, last = absolute(folder), list(last)
    stage = folder / staging
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        for name in last:
            (folder / name).unlink(missing_ok=True)
        fsync_dir(folder)
        names = sorted(p.name for p in stage.iterdir())
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(stage / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path for a writer that needs a path (not a file object); on success
    it is fsync'd and renamed over ``target``, on error removed."""
    target = absolute(target)
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


def sampled_sha256(paths: Iterable[str | os.PathLike], blocks: int = 256, block: int = 4096) -> str:
    """Hex SHA-256 of the sizes and ``blocks`` evenly spaced ``block``-byte pieces of each file
    (the whole file when it is no larger): a cheap fingerprint of large weight files."""
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{size}\n".encode())
        with open(path, "rb") as f:
            if size <= blocks * block:
                h.update(f.read())
                continue
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                h.update(f.read(block))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# where an output may go

# Pseudo file systems: nothing lowbit writes belongs there.
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class OutputKind:
    """What a writer puts at ``out``: a ``name`` for messages, a file or a folder, and ``ours``,
    which tells a previous lowbit output of this kind (the only thing ``overwrite`` may replace)."""

    name: str
    ours: Callable[[Path], bool]
    file: bool = False
    example: str = "out"


def prepare_out(
    out: str | os.PathLike,
    kind: OutputKind,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Check, before any work, that a writer may put ``kind`` at ``out``; returns ``out`` made absolute.

    Refused with a one-line :class:`LowbitError`, nothing changed: ``out`` equal to, inside or
    containing one of ``inputs`` (those that exist) or the current folder; a place that cannot be
    written (probed by creating a file); an existing file or non-empty folder, unless
    ``overwrite`` and ``kind.ours`` says it is a previous lowbit output of the same kind (a
    foreign one is refused even then). Temporary siblings left by killed writers are removed.
    """
    target = absolute(out)
    real = Path(os.path.realpath(target))
    if any(real == Path(r) or Path(r) in real.parents for r in _SYSTEM_ROOTS):
        raise LowbitError(f"--out {out} is inside {real.parts[0]}{real.parts[1]}, a system folder: choose a folder of yours")
    if target.exists() and kind.file == target.is_dir():
        raise LowbitError(
            f"--out {out} is a folder: give a file name such as {target / kind.example}"
            if kind.file
            else f"--out {out} is a file, not a folder: choose a new or empty folder (nothing was changed)"
        )
    _check_inputs(out, real, inputs)
    _check_writable(out, target, kind)
    remove_stale_tmp(target)
    _check_existing(out, target, kind, overwrite)
    return target


def _check_inputs(out, real: Path, inputs: Iterable) -> None:
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        raise LowbitError(
            f"--out {out} is the current folder or holds it: lowbit writes --out as a whole, "
            "name a new folder such as ./quantized (nothing was changed)"
        )
    for spec in inputs:
        if spec is None or not os.path.exists(spec):
            continue
        inp = Path(os.path.realpath(spec))
        if real == inp or inp in real.parents or real in inp.parents:
            relation = "is" if real == inp else "is inside" if inp in real.parents else "contains"
            raise LowbitError(f"--out {out} {relation} the input {spec}: choose a place outside it (nothing was changed)")


def _check_writable(out, target: Path, kind: OutputKind) -> None:
    """Probe the folder that will receive ``target`` by creating (and removing) a temporary file."""
    if kind.file and not target.parent.is_dir():
        raise LowbitError(f"the folder of --out {out} does not exist: create {target.parent} first")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise LowbitError(f"--out {out} cannot be created: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LowbitError(
            f"--out {out} cannot be written ({exc.strerror or exc} in {folder}): choose a writable place"
        ) from exc


def _check_existing(out, target: Path, kind: OutputKind, overwrite: bool) -> None:
    if not target.exists():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    what = "is a file" if kind.file else "holds files"
    if not kind.ours(target):
        raise LowbitError(
            f"--out {out} {what} lowbit did not write (not a lowbit {kind.name}): choose "
            f"{'a new file name' if kind.file else 'an empty or new folder'} (nothing was changed)"
        )
    if not overwrite:
        raise LowbitError(
            f"--out {out} holds a previous lowbit {kind.name}: pass --overwrite to replace it, "
            "or choose another name (nothing was changed)"
        )
