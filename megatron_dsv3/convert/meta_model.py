"""The Megatron model a converted checkpoint is for, built on the meta device in one process.

What a converted checkpoint must hold is decided by Megatron itself: :class:`MetaModel` builds the
target model with the package's builder on PyTorch's ``meta`` device (shapes, no storage: the 671B
model costs only its Python objects) and asks it for its ``sharded_state_dict``, the keys, global
shapes and chunk offsets that ``pretrain_gpt.py --load`` will ask for (the ``ShardedTensor``s of
``megatron/core/dist_checkpointing/mapping.py``).  Each chunk becomes a :class:`Piece`: which
region of which parameter it is, so the writer (:mod:`~megatron_dsv3.convert.megatron_writer`)
and the reader (:mod:`~megatron_dsv3.convert.megatron_reader`) move one parameter at a time.
Building needs a process group and Megatron's parallel state: :func:`single_process` gives a
one-process one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import tempfile

import torch

from megatron_dsv3.args.compose import megatron_argv
from megatron_dsv3.args.settings import parse_megatron_args
from megatron_dsv3.cpu import disable_cpu_mode, enable_cpu_mode, is_cpu_mode
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.runtime.activation import activate
from megatron_dsv3.runtime.cpu_changes import cuda_on

# The dtypes a converted checkpoint can hold (``--dtype``), and Megatron's flag for each.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_FLAGS = {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"], torch.float32: []}


@contextlib.contextmanager
def single_process():
    """CPU mode, the plugin active, a one-process gloo group and Megatron's parallel state (TP = PP =
    EP = 1): what building a model needs.  The group, the parallel state and CPU mode are undone on
    exit when this started them (the plugin stays active: its changes only matter to Megatron)."""
    from megatron.core import parallel_state  # Megatron-Core's import takes seconds: only when a model is built

    activate(source="converter")
    cpu_before = is_cpu_mode()
    enable_cpu_mode()
    started = not torch.distributed.is_initialized()
    with tempfile.TemporaryDirectory(prefix="megatron-dsv3-convert-") as store:
        if started:
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{store}/rendezvous", rank=0, world_size=1
            )
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        try:
            yield
        finally:
            if started:
                parallel_state.destroy_model_parallel()
                torch.distributed.destroy_process_group()
            if not cpu_before:  # PyTorch as it was (a library caller goes on in this process)
                disable_cpu_mode()


def megatron_args(preset: ModelPreset, dtype: torch.dtype) -> argparse.Namespace:
    """The parsed Megatron arguments a converted checkpoint records (Megatron checks the architecture
    ones against the run that loads it): the composer's for ``preset`` on one process, with the
    vocabulary unpadded so the embedding has exactly the checkpoint's rows (Megatron pads it to the
    loading run's TP when it loads: the embedding and output layer allow a shape mismatch).  The
    experts are ``SequentialMLP``'s, one parameter per expert and the names of
    :mod:`megatron_dsv3.model.hf_names`; grouped experts write and read the same checkpoint."""
    extra = ["--make-vocab-size-divisible-by", "1", *_DTYPE_FLAGS[dtype]]
    return parse_megatron_args(megatron_argv(preset, backend="local", cpu=True, extra=extra, experts="sequential"))


@dataclasses.dataclass(frozen=True)
class Piece:
    """One chunk of a checkpoint tensor: ``key`` at ``offset`` in the global tensor is the region
    ``(shape, stride, storage_offset)`` of the model parameter ``name``."""

    key: str
    offset: tuple[int, ...]
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def cut(self, param: torch.Tensor) -> torch.Tensor:
        return param.as_strided(self.shape, self.stride, self.storage_offset)


class MetaModel:
    """``preset`` built by the package's builder on the meta device, single process (call inside
    :func:`single_process`).  ``params`` are its parameters and buffers by Megatron name (the names
    of :mod:`megatron_dsv3.model.hf_names`), ``pieces`` every checkpoint chunk they become."""

    def __init__(self, preset: ModelPreset, dtype: torch.dtype):
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        from megatron_dsv3.model.build import build_model_chunks  # lazy: imports Megatron's model classes (seconds)

        self.preset = preset
        self.args = megatron_args(preset, dtype)
        with cuda_on("meta"):
            _, (chunk,) = build_model_chunks(self.args, wrap_with_ddp=False)
        if any(not t.is_meta for t in chunk.parameters()):
            raise RuntimeError("the converter's model was not built on the meta device")
        model = chunk
        while hasattr(model, "module"):  # Float16Module
            model = model.module
        self.model = model
        self.params: dict[str, torch.Tensor] = dict(model.named_parameters())
        self.params.update({n: b for n, b in model.named_buffers() if n.endswith("expert_bias")})
        by_id = {id(t): n for n, t in self.params.items()}
        self.sharded_state_dict = model.sharded_state_dict()
        apply_factories(self.sharded_state_dict)  # the SwiGLU fc1 becomes its gate and up halves
        self.pieces: list[Piece] = []
        for item in nested_values(self.sharded_state_dict):
            if not isinstance(item, ShardedTensor):
                continue  # _extra_state objects: saved as they are (None for the local backend)
            data = item.data
            base = data._base if data._base is not None else data
            self.pieces.append(Piece(
                key=item.key, offset=tuple(item.global_offset), name=by_id[id(base)],
                shape=tuple(data.shape), stride=tuple(data.stride()), storage_offset=data.storage_offset(),
                dtype=data.dtype,
            ))

    def piece_at(self) -> dict[tuple[str, tuple[int, ...]], Piece]:
        return {(p.key, p.offset): p for p in self.pieces}

    def pieces_of(self) -> dict[str, list[Piece]]:
        """Each parameter's pieces (a SwiGLU fc1 has two: its gate and up halves)."""
        out: dict[str, list[Piece]] = {}
        for piece in self.pieces:
            out.setdefault(piece.name, []).append(piece)
        return out
