"""The safetensors file layout, read and written without unpickling anything.

A file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows; an
optional ``"__metadata__"`` of strings), then the tensors' bytes, back to back with no gaps
(https://github.com/huggingface/safetensors, "Format").  The reader checks headers itself so that a
bad checkpoint is refused before anything is converted; tensors are then read straight from their
byte ranges (:class:`~megatron_dsv3.convert.hf_reader.HFCheckpoint`), and written here so that a
shard is streamed one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dsv3.errors import ConfigError

# safetensors dtype names of the dtypes a DeepSeek checkpoint holds.
DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # the safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offsets into the file's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, Entry]:
    """The entries of ``path``, after checking that the header parses and that the file holds every
    tensor's bytes (a truncated download fails here, naming the file)."""
    fix = f"download {path.name} again (its size or header is not that of a complete safetensors file)"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{path.name} is {size} bytes, shorter than a safetensors header", fix=fix, where=str(path))
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConfigError(f"{path.name}: header length {n} does not fit in the file's {size} bytes", fix=fix,
                              where=str(path))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path.name}: the header is not JSON ({err})", fix=fix, where=str(path)) from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path.name}: the header is not a JSON object", fix=fix, where=str(path))
    data = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path.name}: tensor {name} has a malformed header entry {info!r}", fix=fix,
                              key=name, where=str(path)) from None
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ConfigError(f"{path.name}: tensor {name} ({dtype} {list(shape)}) has {end - begin} bytes of data",
                              fix=fix, key=name, where=str(path))
        if not 0 <= begin <= end or end > data:
            raise ConfigError(f"{path.name} is truncated: tensor {name} ends at byte {8 + n + end}, the file has"
                              f" {size}", fix=fix, key=name, where=str(path))
        entries[name] = Entry(name, dtype, shape, begin, end)
    return entries


def encode_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, list[Entry]]:
    """The header bytes (length prefix included, padded to 8 bytes as safetensors pads it) of a
    file holding ``entries`` in this order, and their :class:`Entry` records."""
    if sys.byteorder != "little":  # safetensors stores little-endian; tensors are written as they are in memory
        raise RuntimeError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": {"format": "pt"}}
    records, offset = [], 0
    for name, shape, dtype in entries:
        if dtype not in NAMES:
            raise ConfigError(f"tensor {name} has dtype {dtype}, which the HF checkpoint writer does not write",
                              fix=f"give one of {', '.join(str(d) for d in NAMES)}", key=name)
        nbytes = math.prod(shape) * dtype.itemsize
        records.append(Entry(name, NAMES[dtype], tuple(shape), offset, offset + nbytes))
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, records


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s bytes in memory order (no copy when ``t`` is contiguous on the CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
