"""``DIR/results.jsonl``: the crash-safe, locked store of a sweep's finished points."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.store.fsio import OutputKind, fsync_dir, prepare_out

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".pareto.lock"


def is_store(path: Path) -> bool:
    """Whether ``path`` is a sweep folder lowbit made (it holds the store or its lock)."""
    return (path / RESULTS_FILE).is_file() or (path / LOCK_FILE).is_file()


PARETO_OUT = OutputKind("pareto sweep folder", is_store)


class ResultStore:
    """``DIR/results.jsonl``: one JSON object per finished point, appended atomically per line.

    Each line is written by one ``os.write`` on an ``O_APPEND`` descriptor and fsync'd. A last
    line without its newline (a kill during the write) is ignored by :meth:`read` and cut off by
    :meth:`repair` before new lines are appended. Use as a context manager: it holds an exclusive
    lock on ``DIR`` so that two sweeps never write the same store.

    Entering checks ``DIR`` first (:func:`lowbit.store.fsio.prepare_out`): an existing store is resumed,
    never replaced; a file, a non-empty folder that is not a store, an unwritable place or one
    overlapping ``inputs`` (the swept models) is refused before any work.
    """

    def __init__(self, folder: str | os.PathLike[str], inputs: tuple = ()):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS_FILE
        self.inputs = inputs
        self._lock_fd: int | None = None

    def __enter__(self) -> ResultStore:
        prepare_out(self.folder, PARETO_OUT, overwrite=True, inputs=self.inputs)  # a store is resumed
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LowbitError(
                f"another lowbit pareto sweep is writing {self.folder}: wait for it or use another --out"
            ) from exc
        self._lock_fd = fd
        self.repair()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def read(self) -> dict[str, dict]:
        """Finished points by key (the first occurrence wins); a torn or corrupt line is skipped."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if not data.endswith(b"\n"):
            lines = lines[:-1]  # torn last line: the point was not finished
        points: dict[str, dict] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
            except (ValueError, KeyError, TypeError):
                print(f"lowbit: warning: {self.path}:{number} is not a result line, skipped", file=sys.stderr)
                continue
            points.setdefault(key, record)
        return points

    def repair(self) -> int:
        """Cut a torn last line off the file; returns the number of bytes removed."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(data) - keep

    def append(self, record: dict) -> None:
        """Append ``record`` as one line (sorted keys), fsync'd; the folder too when the file is new."""
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.folder)
