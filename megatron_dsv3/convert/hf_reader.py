"""A HuggingFace DeepSeek-V3/V2 checkpoint read one tensor at a time, after it was checked whole.

:meth:`HFCheckpoint.open` runs :func:`~megatron_dsv3.convert.hf_layout.check_layout` (config,
index, shard headers, names, shapes, dtypes, FP8 scales, the recipe) before returning, so a
conversion writes nothing from bad input.  Tensors are then read by name (the released per-expert
names, also for transformers 5's packed experts) straight from their byte ranges with ``pread``:
no memory map, so nothing of a shard stays resident and threads share one descriptor per shard.
FP8 E4M3 weights are dequantised with their 128x128 block scales (DeepSeek-V3 paper, section 3.3).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
from pathlib import Path

import torch

from megatron_dsv3.convert.hf_config import FP8_BLOCK
from megatron_dsv3.convert.hf_layout import SCALE, Layout, check_layout, suggest
from megatron_dsv3.convert.safetensors_format import DTYPES, Entry
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.quantize import dequantize
from megatron_dsv3.model.presets import ModelPreset


class HFCheckpoint:
    """A checked HF checkpoint directory; see the module docstring.  Use :meth:`open`."""

    def __init__(self, path: Path, layout: Layout):
        self.path = path
        self.config = layout.config
        self.preset = layout.preset
        self.has_mtp = layout.has_mtp
        self._stored = layout.stored  # stored name -> (shard, header entry)
        self._sources = layout.sources  # released name -> (stored name, expert, half of gate_up or None)
        self.fp8 = any(entry.dtype == "F8_E4M3" for _, entry in self._stored.values())
        # The dtype of the unquantised weights: the embedding's (the router weight may be fp32
        # where the rest is bf16, as transformers keeps it, and the expert bias is fp32 in the release).
        self.dtype: torch.dtype = DTYPES[self._stored["model.embed_tokens.weight"][1].dtype]
        self._handles: dict[Path, int] = {}
        self._starts: dict[Path, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path, *, recipe_preset: ModelPreset | None = None) -> "HFCheckpoint":
        path = Path(path)
        return cls(path, check_layout(path, recipe_preset=recipe_preset))

    # ---- what is stored --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The released (per-expert) names of the tensors this checkpoint holds, scales excluded."""
        return list(self._sources)

    def shard_of(self, name: str) -> Path:
        return self._stored[self._source(name)[0]][0]

    def nbytes(self, name: str) -> int:
        """Bytes ``name`` occupies on disk, its FP8 block scales included."""
        stored, expert, half = self._source(name)
        entry = self._stored[stored][1]
        n = entry.nbytes // (entry.shape[0] if expert is not None else 1) // (2 if half is not None else 1)
        if stored + SCALE in self._stored:
            n += self._stored[stored + SCALE][1].nbytes
        return n

    def tensor(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (a released name) in its own memory.  FP8 weights are dequantised
        (``w * scale_inv`` per 128x128 block, partial edge blocks included) and cast to ``dtype``,
        by default :attr:`dtype`; other tensors come as stored."""
        stored, expert, half = self._source(name)
        shard, entry = self._stored[stored]
        t = self._read(shard, entry, expert, half)
        if t.dtype == torch.float8_e4m3fn:  # dequantising makes a new tensor
            scale_shard, scale_entry = self._stored[stored + SCALE]
            return dequantize_fp8(t, self._read(scale_shard, scale_entry, None, None), dtype or self.dtype)
        return t

    def _read(self, shard: Path, entry: Entry, expert: int | None, half: int | None) -> torch.Tensor:
        """The bytes of one tensor (or one expert of a packed tensor, or half of that) read straight
        into a new tensor: no memory map, so nothing of the file stays resident in this process and
        the tensor owns its memory (tests/test_convert_hf.py rewrites the file under a read)."""
        dtype = DTYPES[entry.dtype]
        shape, offset = tuple(entry.shape), entry.begin
        if expert is not None:
            shape = shape[1:]
            offset += expert * math.prod(shape) * dtype.itemsize
            if half is not None:
                shape = (shape[0] // 2, *shape[1:])
                offset += half * math.prod(shape) * dtype.itemsize
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, fd, start, done = memoryview(buffer.numpy()), self._handle(shard), self._data_start(shard), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], start + offset + done)
            if n <= 0:
                raise ConfigError(f"{shard.name}: tensor {entry.name} could not be read (the file changed or was "
                                  "truncated after it was checked)", fix=f"download {shard.name} again",
                                  key=entry.name, where=str(shard))
            done += n
        return buffer.view(dtype).reshape(shape)

    def _source(self, name: str):
        try:
            return self._sources[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}"
                           f"{suggest(name, list(self._sources))}") from None

    def _handle(self, shard: Path) -> int:
        """A read-only file descriptor per shard, shared by the threads (``pread`` has no file position)."""
        fd = self._handles.get(shard)
        if fd is None:
            with self._lock:
                fd = self._handles.get(shard)
                if fd is None:
                    fd = self._handles[shard] = os.open(shard, os.O_RDONLY)
        return fd

    def _data_start(self, shard: Path) -> int:
        start = self._starts.get(shard)
        if start is None:
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            start = self._starts[shard] = 8 + n
        return start

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A released FP8 weight times its 128x128 block scales (:func:`megatron_dsv3.fp8.quantize.dequantize`)."""
    return dequantize(w, scale_inv, FP8_BLOCK, dtype)
