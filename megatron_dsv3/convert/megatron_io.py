"""The Megatron side of the converter: a distributed checkpoint written and read one tensor at a time.

What a converted checkpoint must hold is decided by Megatron itself: :class:`MetaModel` builds the
target model with the package's builder on PyTorch's ``meta`` device (shapes, no storage: the 671B
model costs only its Python objects) and asks it for its ``sharded_state_dict``, the keys, global
shapes and chunk offsets that ``pretrain_gpt.py --load`` will ask for.  The checkpoint is written
in Megatron's ``torch_dist`` format (``megatron/core/dist_checkpointing/strategies/torch.py``) with
two differences that bound the memory:

* :class:`_StreamingPlanner` resolves each chunk's data only when the writer reaches it (Megatron's
  own writers resolve every tensor of a rank before writing the first);
* :class:`_StreamingWriter` writes the chunks into files of about ``file_bytes`` each, from a few
  threads, dropping each tensor once written (PyTorch's ``FileSystemWriter`` keeps every tensor of
  a file alive until the file is closed, which is a whole rank's model with one file per rank).

Each chunk is stored as PyTorch's reader expects it (``torch.save`` of the tensor at a byte range
the metadata names), so Megatron and ``torch.distributed.checkpoint`` read the result unchanged and
reshard it to any TP/PP/EP layout.

Reading (:class:`MegatronCheckpoint`) goes the other way: a :class:`_BoxPlanner` asks PyTorch's
reader for one parameter's region of a global tensor, whatever layout the checkpoint was saved
under, so exporting never holds more than a parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_dsv3.convert.batching import split_by_bytes
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.presets import ModelPreset

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- one process of Megatron, for building the meta model -------------------------------------
@contextlib.contextmanager
def single_process():
    """CPU mode, the plugin active, a one-process gloo group and Megatron's parallel state (TP = PP =
    EP = 1): what building a model needs.  The group, the parallel state and CPU mode are undone on
    exit when this started them (the plugin stays active: its changes only matter to Megatron)."""
    from megatron.core import parallel_state

    from megatron_dsv3.cpu import disable_cpu_mode, enable_cpu_mode, is_cpu_mode
    from megatron_dsv3.runtime.activation import activate

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
    loading run's TP when it loads: the embedding and output layer allow a shape mismatch)."""
    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    extra = ["--make-vocab-size-divisible-by", "1"]
    extra += {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"], torch.float32: []}[dtype]
    return parse_megatron_args(megatron_argv(preset, backend="local", cpu=True, extra=extra))


# ---- the target model, on the meta device ------------------------------------------------------
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

        from megatron_dsv3.model.build import build_model_chunks

        self.preset = preset
        self.args = megatron_args(preset, dtype)
        from megatron_dsv3.runtime.cpu_changes import cuda_on

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


# ---- writing -----------------------------------------------------------------------------------
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
    uses: dict[str, int] = {}
    for piece in meta.pieces:
        uses[piece.name] = uses.get(piece.name, 0) + 1
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


# ---- reading -----------------------------------------------------------------------------------
class MegatronCheckpoint:
    """A Megatron ``torch_dist`` checkpoint (any TP/PP/EP/schedule it was saved under), read one
    parameter at a time.  ``path`` is a save folder (its tracker file names the step) or a step folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.step_dir = _step_folder(self.path)
        config = self.step_dir / "metadata.json"
        if not config.exists():
            raise ConfigError(f"{self.step_dir}: no metadata.json; this is not a distributed checkpoint",
                              fix="save with --ckpt-format torch_dist (the recipes' default) and convert that")
        backend = json.loads(config.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConfigError(f"{config}: sharded_backend is {backend!r}, the converter reads 'torch_dist'",
                              fix="save the checkpoint with --ckpt-format torch_dist")
        self.args = _load_args(self.step_dir)
        from torch.distributed.checkpoint import FileSystemReader

        self._reader_cls = FileSystemReader
        self.metadata = FileSystemReader(str(self.step_dir)).read_metadata()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.size) for k, v in self.metadata.state_dict_metadata.items() if hasattr(v, "size")}

    def read(self, requests: list[tuple[Piece, torch.Tensor]]) -> None:
        """Fill each parameter buffer's piece from the checkpoint, in one pass over the files."""
        from torch.distributed.checkpoint import load as dcp_load

        for piece, _ in requests:
            if piece.key not in self.metadata.state_dict_metadata:
                raise ConfigError(f"{self.step_dir}: the checkpoint has no tensor {piece.key}",
                                  fix="export with the model the checkpoint was trained as (its args decide it)")
        reader = self._reader_cls(str(self.step_dir))
        reader.read_metadata = lambda *a, **k: self.metadata  # parsed once, not once per call
        planner = _box_planner_class()(requests, self.metadata)
        try:
            dcp_load({}, storage_reader=reader, planner=planner)
        finally:
            planner.release()  # no view of the caller's buffers outlives the read


@functools.cache
def _box_planner_class():
    """Made once: a class made per read would sit in a reference cycle (as classes do) holding its
    closure's buffers until a garbage collection, so reads would pile up in memory."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BoxPlanner(DefaultLoadPlanner):
        """Reads region ``piece`` of each global tensor into ``piece.cut(buffer)``."""

        def __init__(self, requests, metadata):
            super().__init__(allow_partial_load=True)
            self.requests, self.checkpoint_metadata = requests, metadata
            self.targets = {}

        def create_local_plan(self):
            items = []
            for piece, buffer in self.requests:
                md = self.checkpoint_metadata.state_dict_metadata[piece.key]
                prepend = len(md.chunks[0].sizes) - len(piece.shape)
                sizes = torch.Size((1,) * prepend + piece.shape)
                self.targets[(piece.key, piece.offset)] = piece.cut(buffer).view(sizes)
                items += create_read_items_for_chunk_list(
                    piece.key, md, [ChunkStorageMetadata(offsets=torch.Size(piece.offset), sizes=sizes)])
            self.plan = LoadPlan(items)
            return self.plan

        def resolve_tensor(self, read_item):
            target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                target = target.narrow(dim, start, length)
            return target

        def commit_tensor(self, read_item, tensor):
            pass  # resolve_tensor handed out a view of the buffer: the data is already there

        def release(self) -> None:
            self.requests, self.targets = [], {}

    return BoxPlanner


def _step_folder(path: Path) -> Path:
    tracker = path / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        step = path / (RELEASE if text == RELEASE else f"iter_{int(text):07d}")
        if not step.is_dir():
            raise ConfigError(f"{tracker} names step {text!r} but {step} is missing",
                              fix="point at the step folder you want (iter_NNNNNNN) or fix the tracker file")
        return step
    if (path / "metadata.json").exists():
        return path
    raise ConfigError(f"{path}: neither a Megatron save folder ({TRACKER}) nor a step folder (metadata.json)",
                      fix="give the --save folder of a run, or one of its iter_NNNNNNN folders")


def _load_args(step_dir: Path) -> argparse.Namespace:
    """The run's arguments from the checkpoint's common state (Megatron's reader: ``weights_only``)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    try:
        state = load_common_state_dict(str(step_dir))
    except Exception as err:  # noqa: BLE001  (the reason is reported)
        raise ConfigError(f"{step_dir}: its common state cannot be read ({type(err).__name__}: {str(err)[:300]})",
                          fix="convert a complete checkpoint saved by Megatron-Core 0.19 (an interrupted save "
                              "is incomplete)") from None
    args = state.get("args") if isinstance(state, dict) else None
    if args is None:
        raise ConfigError(f"{step_dir}: the checkpoint records no 'args'",
                          fix="convert a checkpoint saved by Megatron's training loop")
    return args


def param_buffers(meta: MetaModel, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: torch.empty(meta.params[n].shape, dtype=meta.params[n].dtype) for n in names}


