"""A Megatron ``torch_dist`` checkpoint written one parameter at a time, whatever the model's size.

The format is Megatron's ``torch_dist`` (``megatron/core/dist_checkpointing/strategies/torch.py``:
same backend name and version, same key translation), written with two differences that bound the
memory:

* ``_StreamingPlanner`` resolves each chunk's data only when the writer reaches it (Megatron's
  own writers resolve every tensor of a rank before writing the first);
* ``_StreamingWriter`` writes the chunks into files of about ``file_bytes`` each, from a few
  threads, dropping each tensor once written (PyTorch's ``FileSystemWriter``,
  ``torch/distributed/checkpoint/filesystem.py``, keeps every tensor of a file alive until the file
  is closed, which is a whole rank's model with one file per rank).

Each chunk is stored as PyTorch's reader expects it (``torch.save`` of the tensor at a byte range
the metadata names), so Megatron and ``torch.distributed.checkpoint`` read the result unchanged and
reshard it to any TP/PP/EP layout.  What the chunks are comes from the meta model
(:class:`~megatron_dsv3.convert.meta_model.MetaModel`).  Megatron's and PyTorch's checkpointing
modules are imported when a checkpoint is written (they take seconds), so a conversion refused for
bad input answers without them.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from megatron_dsv3.convert.batching import split_by_bytes
from megatron_dsv3.convert.megatron_reader import RELEASE, TRACKER
from megatron_dsv3.convert.meta_model import MetaModel
from megatron_dsv3.errors import ConfigError


def _planner_classes():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class _StreamingPlanner(MCoreSavePlanner):
        """Megatron's save planner, with each chunk's data made when the writer asks for it."""

        def __init__(self, resolve: Callable[[object, torch.Tensor], torch.Tensor]):
            super().__init__(flatten_state_dict=False, can_run_decentralized_global_plan=False)
            self._resolve = resolve

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                return self._resolve(write_item.index, data)
            return data

    class _StreamingWriter(FileSystemWriter):
        """Chunks into files of about ``file_bytes``, ``threads`` files at a time, each tensor dropped
        once written."""

        def __init__(self, path, *, threads: int, file_bytes: int):
            super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=threads,
                             overwrite=False)
            self.file_bytes = file_bytes

        def write_data(self, plan, planner):
            prefix = plan.storage_data.prefix
            # Plan order is model order: a parameter's pieces mostly land in one file.
            groups = split_by_bytes(list(plan.items), _item_bytes, self.file_bytes)

            stop = threading.Event()

            def write_file(index: int, items: list) -> list:
                file_name = f"{prefix}{index}.distcp"
                results = []
                with open(Path(self.path) / file_name, "wb") as stream:
                    for item in items:
                        if stop.is_set():  # another file failed, or Ctrl-C: the checkpoint is abandoned
                            return results
                        data = planner.resolve_data(item)
                        offset = stream.tell()
                        if item.type == WriteItemType.BYTE_IO:
                            stream.write(data.getbuffer())
                        else:
                            tensor = data.detach().contiguous()
                            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                                tensor = tensor.clone()  # save the chunk, not the tensor it views
                            torch.save(tensor, stream)
                            del tensor
                        del data
                        length = stream.tell() - offset
                        results.append(WriteResult(index=item.index, size_in_bytes=length,
                                                   storage_data=_StorageInfo(file_name, offset, length)))
                    stream.flush()
                    os.fsync(stream.fileno())
                return results

            pool = ThreadPoolExecutor(max(1, self.thread_count))
            try:
                done = list(pool.map(write_file, range(len(groups)), groups))
            except BaseException:
                stop.set()  # the files being written stop at their next tensor, the others never start
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            future = torch.futures.Future()
            future.set_result([r for rs in done for r in rs])
            return future

    return _StreamingPlanner, _StreamingWriter


def _item_bytes(item) -> int:
    if item.tensor_data is None:
        return 1 << 10  # a serialised object (_extra_state): small
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _streaming_strategy(resolve, *, threads: int, file_bytes: int):
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    planner_cls, writer_cls = _planner_classes()

    class StreamingTorchDistStrategy(TorchDistSaveShardedStrategy):
        """Megatron's ``torch_dist`` (same backend name and version, same key translation), written
        by the streaming planner and writer."""

        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state = mcore_to_pyt_state_dict(state, False)
            dcp_save(pyt_state, storage_writer=writer_cls(checkpoint_dir, threads=threads, file_bytes=file_bytes),
                     planner=planner_cls(resolve))

    return StreamingTorchDistStrategy()


class _ParamCache:
    """Each parameter made once and kept only until its last piece is written (SwiGLU's gate and up
    halves are two pieces, possibly in two files written by two threads)."""

    def __init__(self, make: Callable[[str], torch.Tensor], uses: dict[str, int]):
        self._make = make
        self._uses = dict(uses)
        self._entries: dict[str, torch.Tensor] = {}
        self._making: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> torch.Tensor:
        with self._lock:
            lock = self._making.setdefault(name, threading.Lock())
        with lock:  # a second thread wanting the same parameter waits for the first to make it
            with self._lock:
                tensor = self._entries.get(name)
            if tensor is None:
                tensor = self._make(name)
            with self._lock:
                self._uses[name] -= 1
                if self._uses[name]:
                    self._entries[name] = tensor
                else:
                    self._entries.pop(name, None)
                    self._making.pop(name, None)
        return tensor


def write_checkpoint(
    meta: MetaModel,
    out_dir: Path,
    source: Callable[[str], torch.Tensor],
    *,
    threads: int = 2,
    file_bytes: int = 1 << 30,
    progress: Callable[[int], None] | None = None,
) -> None:
    """A Megatron ``torch_dist`` checkpoint of ``meta``'s model in ``out_dir`` (which must not exist),
    as a ``release`` (weights to start from: Megatron loads neither optimizer nor RNG state and
    starts at step 0).  ``source(name)`` makes parameter ``name`` (full shape); it is called once per
    parameter, from up to ``threads`` threads."""
    from megatron.core import dist_checkpointing

    pieces = meta.piece_at()
    uses = {name: len(of) for name, of in meta.pieces_of().items()}
    cache = _ParamCache(lambda name: _checked(name, source(name), meta.params[name]), uses)

    def resolve(index, like: torch.Tensor) -> torch.Tensor:
        piece = pieces[(index.fqn, tuple(index.offset))]
        # No copy here: the writer copies a view (a SwiGLU half) out of its parameter when it saves it.
        data = piece.cut(cache.get(piece.name)).reshape(like.shape).to(like.dtype)
        if progress:
            progress(piece.nbytes)
        return data

    release = out_dir / RELEASE
    release.mkdir(parents=True)
    state = {"model": meta.sharded_state_dict, "args": meta.args, "checkpoint_version": 3.0, "iteration": 0,
             "num_floating_point_operations_so_far": 0}
    try:
        dist_checkpointing.save(state, str(release),
                                sharded_strategy=_streaming_strategy(resolve, threads=threads, file_bytes=file_bytes))
    except BaseException as err:  # PyTorch's CheckpointException derives from BaseException
        raise _unwrapped(err) from None

    with open(out_dir / TRACKER, "w") as f:  # on disk before the folder is renamed into place
        f.write(RELEASE)
        f.flush()
        os.fsync(f.fileno())


def _unwrapped(err: BaseException) -> BaseException:
    """The error a tensor's source raised, out of PyTorch's ``CheckpointException`` (which holds
    each rank's failure as ``(exception, traceback summary)``), so a bad input reads as our own
    error and not as a checkpointing one."""
    for failure in (getattr(err, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return err


def _checked(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(like.shape):
        raise ConfigError(f"{name}: the source tensor has shape {tuple(tensor.shape)}, the model {tuple(like.shape)}",
                          fix="convert with the recipe (or preset) the checkpoint was made for")
    return tensor.contiguous()
