"""A Megatron ``torch_dist`` checkpoint of any TP/PP/EP layout, read one parameter's region at a time.

A save folder names its step in ``latest_checkpointed_iteration.txt`` (``release`` or an iteration:
``megatron/training/checkpointing.py``, ``get_checkpoint_tracker_filename`` and ``read_metadata``);
the step folder holds ``metadata.json`` (the sharded backend), the common state with the run's
arguments, and PyTorch's distributed checkpoint.  :class:`MegatronCheckpoint` asks PyTorch's reader
(``torch/distributed/checkpoint/state_dict_loader.py``) for one region of a global tensor, a
:class:`~megatron_dsv3.convert.meta_model.Piece`, through a load planner that reads it straight
into the caller's buffer, whatever layout the checkpoint was saved under; so exporting never holds
more than a few parameters.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch

from megatron_dsv3.convert.meta_model import Piece
from megatron_dsv3.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"


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
