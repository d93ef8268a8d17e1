"""Which micro-batch forwards a pipeline rank holds activations for, at its most loaded moment.

Megatron's schedules follow ``get_pp_rank_microbatches`` and ``get_schedule_table`` in
``megatron/core/pipeline_parallel/schedules.py``: under 1F1B rank ``r`` runs ``pp - r - 1`` warmup
forwards and one more before its first backward; under the interleaved schedule it runs
``2 (pp - r - 1) + (vpp - 1) * g`` warmup forwards (micro-batches taken ``g`` at a time per chunk,
``g`` = ``--microbatch-group-size-per-virtual-stage``, by default ``pp``), one more with the
expert-parallel overlap (``combined_1f1b``: the forward paired with the first backward).

DeepSeek's schedules are replayed from the engine's per-rank order: a forward's activations live from
its ``F`` until its backward is done (its ``B``; with the zero-bubble split, its ``W``, counted whole),
and the two micro-batches of an overlapped pair are both alive while it runs.  DualPipe's activation
memory of PP+1 (arXiv 2412.19437v2, Table 2) counts the same thing in stage-sized units.
"""

from __future__ import annotations

from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.placement import Placement
from megatron_dsv3.pipeline.engine import rank_ops


def forward_order(num_microbatches: int, vpp: int, group: int) -> list[int]:
    """The chunk of each forward pass in Megatron's interleaved order (``get_schedule_table``)."""
    order = []
    for start in range(0, num_microbatches, group):
        size = num_microbatches - start if start + group >= num_microbatches else group
        for chunk in range(vpp):
            order += [chunk] * size
    return order


def microbatch_group(pp: int, num_microbatches: int) -> int:
    """The smallest ``--microbatch-group-size-per-virtual-stage`` Megatron's interleaved schedule accepts
    for these sizes: at least ``pp``, and the last group empty or at least ``pp`` (``schedules.py``)."""
    for group in range(pp, num_microbatches + 1):
        if num_microbatches % group == 0 or num_microbatches % group >= pp:
            return group
    return num_microbatches


def megatron_in_flight(pp: int, rank: int, vpp: int, num_microbatches: int, ep_overlap: bool = False) -> list[int]:
    """Chunks of the forward passes rank ``rank`` holds when its first backward starts (``ep_overlap``:
    Megatron's combined 1F1B, one more warmup forward)."""
    if pp == 1:  # forward_backward_no_pipelining: one micro-batch at a time
        return [0]
    if vpp == 1:
        return [0] * min(pp - rank, num_microbatches)
    group = microbatch_group(pp, num_microbatches)
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * group + int(ep_overlap)
    count = min(warmup + 1, num_microbatches * vpp)
    return forward_order(num_microbatches, vpp, group)[:count]


def deepseek_in_flight(schedule: str, pp: int, rank: int, num_microbatches: int,
                       zero_bubble: bool = True) -> list[int]:
    """Engine chunks of the forwards alive on ``rank`` at its peak, replaying its program."""
    live: dict[tuple[int, int], int] = {}
    peak: list[int] = []
    for op in rank_ops(schedule, pp, num_microbatches, rank):
        if op.forward:
            live[op.forward] = op.forward[0]
        if len(live) > len(peak):
            peak = list(live.values())
        done = op.backward if op.kind == "FB" or (op.kind == "B" and not (op.zb and zero_bubble)) else None
        if op.kind == "W" and zero_bubble:
            done = (op.chunk, op.mb)
        if done:
            live.pop(done)
    return peak


def in_flight(placement: Placement, rank: int, num_microbatches: int, zero_bubble: bool = True) -> list[int]:
    """Chunks (``vp_stage``) of the forwards whose activations rank ``rank`` holds at its peak."""
    if placement.schedule not in DEEPSEEK_SCHEDULES:
        return megatron_in_flight(placement.pp, rank, placement.vpp, num_microbatches)
    row = placement.rows[rank]
    vp = {(c.direction if placement.schedule == "dualpipe" else c.vp_stage): c.vp_stage for c in row}
    return [vp[c] for c in deepseek_in_flight(placement.schedule, placement.pp, rank, num_microbatches, zero_bubble)]
