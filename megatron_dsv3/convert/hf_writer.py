"""Writing a HuggingFace DeepSeek-V3 checkpoint in the released layout, one tensor at a time.

The layout is DeepSeek's release (https://huggingface.co/deepseek-ai/DeepSeek-V3, as
:mod:`~megatron_dsv3.convert.hf_layout` checks it on import): per-expert names, shards
``model-00001-of-0000N.safetensors``, an index ``model.safetensors.index.json`` (``metadata.total_size``,
``weight_map``), the ``config.json`` of :func:`~megatron_dsv3.convert.hf_config.hf_config_from_preset`
with the token ids, and a ``generation_config.json`` (:mod:`megatron_dsv3.convert.hf_source`);
transformers' ``from_pretrained`` reads it (packing the experts itself).

Streaming: the caller gives the whole ``plan`` (name, shape, dtype, in the order the tensors will
come), so every shard's header is known before its first byte; each tensor is written as soon as
it arrives and then dropped, so memory holds one tensor, whatever the shard size.  The folder is
written into a temporary sibling and renamed at the end (:mod:`megatron_dsv3.convert.output_dir`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_dsv3.convert.batching import split_by_bytes
from megatron_dsv3.convert.hf_config import hf_config_from_preset
from megatron_dsv3.convert.hf_layout import INDEX
from megatron_dsv3.convert.hf_source import generation_config as generation_config_of
from megatron_dsv3.convert.output_dir import partial_output
from megatron_dsv3.convert.safetensors_format import encode_header, tensor_bytes
from megatron_dsv3.model.presets import ModelPreset

PlanItem = tuple[str, tuple[int, ...], torch.dtype]
DEFAULT_SHARD_BYTES = 5 * 10**9  # DeepSeek's release has shards of about 4.3 GB
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def shard_plan(plan: list[PlanItem], max_shard_bytes: int) -> list[list[PlanItem]]:
    """``plan`` cut, in order, into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    return split_by_bytes(plan, lambda item: math.prod(item[1]) * item[2].itemsize, max_shard_bytes)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_hf_checkpoint(out_dir, preset: ModelPreset, tensors: Iterable[tuple[str, torch.Tensor]], *,
                        plan: list[PlanItem], max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                        token_ids: dict | None = None, generation_config: dict | None = None,
                        progress: Callable[[int], None] | None = None) -> Path:
    """Write ``tensors`` (``(name, tensor)`` pairs, in ``plan`` order) as the HF checkpoint of
    ``preset`` in ``out_dir``; return ``out_dir``.  Each tensor must match its plan entry (name,
    shape, dtype).  ``token_ids`` (``bos/eos/pad_token_id``; None values left out) go into
    ``config.json``; ``generation_config`` (default: derived from the ids) is written as is.
    ``progress`` is called with each tensor's byte count once it is written.  An existing non-empty
    ``out_dir`` is refused unless ``overwrite``."""
    out_dir = Path(out_dir)
    names = [name for name, _, _ in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"the plan names {next(n for n in names if names.count(n) > 1)} twice")
    shards = shard_plan([(n, tuple(s), d) for n, s, d in plan], max_shard_bytes)
    dtype = _DTYPE_NAMES.get(_main_dtype(plan), "bfloat16")
    config = hf_config_from_preset(preset, dtype=dtype)  # refuses a model with no HF layout before any write
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    config.update(ids)
    generation = generation_config if generation_config is not None else generation_config_of(ids)
    with partial_output(out_dir, overwrite=overwrite) as tmp:
        stream = iter(tensors)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = shard_name(i, len(shards))
            total += _write_shard(tmp / file, shard, stream, progress)
            weight_map.update({name: file for name, _, _ in shard})
        extra = next(stream, None)
        if extra is not None:
            raise ValueError(f"the tensors go on past the plan's last entry: {extra[0]} is not in the plan")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_synced(tmp / INDEX, json.dumps(index, indent=2) + "\n")
        _write_synced(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _write_synced(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out_dir


def _main_dtype(plan: list[PlanItem]) -> torch.dtype | None:
    """The embedding's dtype (the checkpoint's, as the reader takes it)."""
    return next((d for n, _, d in plan if n == "model.embed_tokens.weight"), plan[0][2] if plan else None)


def _write_shard(path: Path, shard: list[PlanItem], stream, progress) -> int:
    header, records = encode_header(shard)
    with open(path, "wb") as f:
        f.write(header)
        for (name, shape, dtype), record in zip(shard, records):
            try:
                got_name, tensor = next(stream)
            except StopIteration:
                raise ValueError(f"the tensors ended before the plan: {name} and what follows never came") from None
            if got_name != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"expected {name} {list(shape)} {dtype} (the plan's next entry), got {got_name}"
                                 f" {list(tensor.shape)} {tensor.dtype}")
            f.write(tensor_bytes(tensor))
            del tensor
            if progress is not None:
                progress(record.nbytes)
        f.flush()
        os.fsync(f.fileno())  # on disk before the folder is renamed into place
    return records[-1].end if records else 0


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
