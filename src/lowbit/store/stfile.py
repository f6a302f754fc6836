"""safetensors without holding the file in memory: a memory-mapped reader and a tensor-by-tensor writer.

The format: an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``) padded with spaces, then the tensors'
raw little-endian bytes, back to back (offsets relative to the end of the header).

:class:`MappedSafetensors` maps a file copy-on-write (``MAP_PRIVATE``): :meth:`~MappedSafetensors.get`
returns tensors that are views of the mapping, so pages are read from disk when touched and the
kernel may drop them again (they never count as anonymous memory unless written to, which never
changes the file). :class:`Checkpoint` does the same for a Hugging Face folder, sharded
(``model.safetensors.index.json``) or not.

:class:`SafetensorsWriter` takes tensors one at a time: their bytes go to one spill file per
element size (8, 4, 2, 1 bytes), and :meth:`~SafetensorsWriter.finish` writes the header and then
the spill files largest elements first, so that every tensor is aligned to its element size as
``safetensors.torch.save_file`` aligns it, without ever holding more than one tensor in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit


class MappedSafetensors:
    """One safetensors file, its header parsed and checked, its data mapped on first :meth:`get`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or not 0 < n <= min(_MAX_HEADER, size - 8):
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise LowbitError(f"{self.path} is not a readable safetensors file ({exc}): re-download or re-save it") from exc
        if not isinstance(header, dict):
            raise LowbitError(f"{self.path} has a malformed safetensors header: re-download or re-save it")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e, size - self.data_start)
        self._map = None

    def _check_entry(self, name: str, e, data_bytes: int):
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LowbitError(f"{self.path}: tensor {name!r} has a malformed header entry ({exc}): re-save the file") from exc
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= data_bytes or end - begin != numel * dtype.itemsize:
            raise LowbitError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size (truncated?)")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype: a view of the copy-on-write mapping (no copy)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        raw = torch.from_numpy(self._map[self.data_start + begin : self.data_start + end])
        return raw.view(dtype).reshape(shape)


def drop_pages(t: torch.Tensor) -> int:
    """Give back the resident pages of ``t``, a view of a :class:`MappedSafetensors` mapping that
    will not be read again (e.g. packed bytes just converted to another layout): every whole page
    inside its bytes is ``madvise(MADV_DONTNEED)``-ed, so it stops counting in this process's
    resident memory (a later read would fault it in again from the file; pages shared with other
    tensors are left alone). Returns the bytes advised (0 where madvise is unavailable)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    first, last = -(-begin // page) * page, end // page * page
    if last <= first or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(mmap.MADV_DONTNEED))
    except (OSError, AttributeError):
        return 0
    return last - first if rc == 0 else 0


class Checkpoint:
    """The safetensors weights of a Hugging Face folder, mapped lazily: one ``model.safetensors``,
    the shards an index names, or every ``*.safetensors`` file of the folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LowbitError(f"{index} is not a valid safetensors index ({exc}): re-save the model") from exc
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise LowbitError(f"{self.folder} lacks the shard(s) {', '.join(missing[:3])} its index names: copy them")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            has_bin = any(self.folder.glob("*.bin"))
            raise LowbitError(
                f"{self.folder} has no safetensors weights{' (only .bin files)' if has_bin else ''}: streaming reads "
                "safetensors checkpoints; re-save the model with save_pretrained (safetensors) or drop --stream"
            )
        self.files = {name: MappedSafetensors(self.folder / name) for name in files}
        self.where: dict[str, MappedSafetensors] = {}
        for f in self.files.values():
            for key in f.keys():
                self.where.setdefault(key, f)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get(key)

    def unmap(self) -> None:
        """Drop the files' mappings (each is unmapped once no tensor read from it is alive), so that
        pages already read stop counting in this process's resident set; :meth:`get` maps again."""
        for f in self.files.values():
            f._map = None

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].entries[key][0]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor (see the module notes); ``work`` holds the spill files."""

    def __init__(self, path: str | os.PathLike, work: str | os.PathLike):
        self.path, self.work = Path(path), Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._spill: dict[int, object] = {}
        self._entries: list[tuple[str, str, list[int], int, int, int]] = []  # name, dtype, shape, size, at, bytes
        self._sizes: dict[int, int] = {}
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has a dtype safetensors cannot store ({tensor.dtype})")
        t = tensor.detach().cpu().contiguous()
        item = t.element_size()
        if item not in self._spill:
            self._spill[item] = open(self.work / f"spill-{item}.bin", "wb")  # noqa: SIM115 - closed in finish
            self._sizes[item] = 0
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        self._spill[item].write(data.data)
        self._entries.append((name, DTYPE_NAMES[t.dtype], list(t.shape), item, self._sizes[item], data.nbytes))
        self._sizes[item] += data.nbytes
        self._names.add(name)

    @property
    def data_bytes(self) -> int:
        return sum(self._sizes.values())

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        """Write the file: header, then the spill files in descending element size; remove the spill files."""
        for f in self._spill.values():
            f.close()
        order = sorted(self._sizes, reverse=True)
        base, start = {}, 0
        for item in order:
            base[item], start = start, start + self._sizes[item]
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        for name, dtype, shape, item, at, nbytes in sorted(self._entries, key=lambda e: (-e[3], e[4])):
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[item] + at, base[item] + at + nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        with open(self.path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for item in order:
                with open(self.work / f"spill-{item}.bin", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for item in order:
            (self.work / f"spill-{item}.bin").unlink()
