"""What one DualPipe(V) step on one pipeline rank works with: the named interface its parts share.

:class:`RankStep` is made from the keyword arguments Megatron's training loop passes to a
``forward_backward_func`` (``megatron/core/pipeline_parallel/schedules.py``) and read by the runner
(:mod:`megatron_dsv3.pipeline.runner`), the messages (:mod:`~megatron_dsv3.pipeline.messages`), the
gradient synchronisation (:mod:`~megatron_dsv3.pipeline.grad_sync`), the overlapped step
(:mod:`~megatron_dsv3.pipeline.overlap`), the copies (:mod:`~megatron_dsv3.pipeline.copies`) and the loss
reports (:mod:`~megatron_dsv3.pipeline.reports`).  Chunks are numbered as the engine numbers them:
DualPipeV's place on the V (its virtual stage), DualPipe's direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import check_first_val_step
from megatron.core.utils import get_model_config

from megatron_dsv3.model.wgrad import transformer_engine_deferring
from megatron_dsv3.parallel.megatron_layout import ScheduleOptions, schedule_options_of
from megatron_dsv3.parallel.placement import Chunk, Placement, placement_of
from megatron_dsv3.pipeline.engine import global_microbatch


def engine_chunk(placement: Placement, chunk: Chunk) -> int:
    """The engine's number for a chunk: DualPipe's direction, DualPipeV's place on the V."""
    return chunk.direction if placement.schedule == "dualpipe" else chunk.vp_stage


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class RankStep:
    model: list  # this rank's model chunks, by virtual stage
    iterators: list  # their data iterators, by virtual stage
    forward_step_func: object
    num_microbatches: int
    config: object  # the chunks' TransformerConfig
    placement: Placement
    options: ScheduleOptions
    rank: int  # pipeline rank
    group: object  # the pipeline group
    global_ranks: list[int]  # the pipeline group's ranks
    cp_size: int
    shape: tuple[int, int, int]  # an activation travelling between stages
    dtype: torch.dtype
    chunks: list[Chunk]  # this rank's chunks in engine order
    forward_only: bool = False
    collect_non_loss_data: bool = False
    first_val_step: bool | None = None
    force_all_reduce: bool = False
    pg_collection: object = None
    started: list[bool] = field(default_factory=list)  # a chunk's first forward has run, by engine chunk
    te_deferring: list[list] = field(default_factory=list)  # TE modules deferring weight GEMMs, by engine chunk

    @classmethod
    def from_megatron(cls, kwargs: dict) -> "RankStep":
        """From the keyword arguments of Megatron's ``forward_backward_func``."""
        model, iterators = kwargs["model"], kwargs["data_iterator"]
        model = model if isinstance(model, list) else [model]
        config = get_model_config(model[0])
        placement = placement_of(config)
        group = parallel_state.get_pipeline_model_parallel_group()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        cp_size = parallel_state.get_context_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq = kwargs["seq_length"] // (tp if config.sequence_parallel else 1) // cp_size
        chunks = sorted(placement.rows[rank], key=lambda c: engine_chunk(placement, c))
        return cls(
            model=model, iterators=iterators if isinstance(iterators, list) else [iterators] * len(model),
            forward_step_func=kwargs["forward_step_func"], num_microbatches=kwargs["num_microbatches"],
            config=config, placement=placement, options=schedule_options_of(config), rank=rank, group=group,
            global_ranks=torch.distributed.get_process_group_ranks(group), cp_size=cp_size,
            shape=(seq, kwargs["micro_batch_size"], config.hidden_size),
            dtype=config.pipeline_dtype or config.params_dtype, chunks=chunks,
            forward_only=kwargs.get("forward_only", False),
            collect_non_loss_data=kwargs.get("collect_non_loss_data", False),
            first_val_step=kwargs.get("first_val_step"), force_all_reduce=kwargs.get("force_all_reduce", False),
            pg_collection=kwargs.get("pg_collection"), started=[False] * len(chunks),
            te_deferring=[transformer_engine_deferring(model[c.vp_stage]) for c in chunks],
        )

    @property
    def schedule(self) -> str:
        return self.placement.schedule

    @property
    def overlap(self) -> bool:
        """Forwards and backwards run through Megatron's overlapped step (F&B overlap)."""
        return self.options.fb_overlap and not self.forward_only

    @property
    def split(self) -> bool:
        """Backwards marked ``z`` leave their weight GEMMs to a later W (zero bubble)."""
        return self.options.zero_bubble and not self.forward_only

    def vp(self, c: int) -> int:
        """Megatron's virtual stage of engine chunk ``c``: the index of its model chunk and iterator."""
        return self.chunks[c].vp_stage

    def global_mb(self, c: int, m: int) -> int:
        """The step's micro-batch number of chunk ``c``'s ``m``-th micro-batch."""
        return global_microbatch(self.schedule, c, m, self.num_microbatches)

    def first_microbatch(self, c: int) -> bool:
        return check_first_val_step(self.first_val_step, self.forward_only, not self.started[c])
