"""Which micro-batch forwards a pipeline rank holds activations for, at its most loaded moment.

Megatron's schedules follow ``get_pp_rank_microbatches`` and ``get_schedule_table`` in
``megatron/core/pipeline_parallel/schedules.py``: under 1F1B rank ``r`` runs ``pp - r - 1`` warmup
forwards and one more before its first backward; under the interleaved schedule it runs
``2 (pp - r - 1) + (vpp - 1) * pp`` warmup forwards (micro-batches taken ``pp`` at a time per chunk).
"""

from __future__ import annotations

from megatron_dsv3.parallel.placement import Placement


def forward_order(num_microbatches: int, vpp: int, group: int) -> list[int]:
    """The chunk of each forward pass in Megatron's interleaved order (``get_schedule_table``)."""
    order = []
    for start in range(0, num_microbatches, group):
        size = num_microbatches - start if start + group >= num_microbatches else group
        for chunk in range(vpp):
            order += [chunk] * size
    return order


def megatron_in_flight(pp: int, rank: int, vpp: int, num_microbatches: int) -> list[int]:
    """Chunks of the forward passes rank ``rank`` holds when its first backward starts."""
    if pp == 1:  # forward_backward_no_pipelining: one micro-batch at a time
        return [0]
    if vpp == 1:
        return [0] * min(pp - rank, num_microbatches)
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
    count = min(warmup + 1, num_microbatches * vpp)
    return forward_order(num_microbatches, vpp, pp)[:count]


def in_flight(placement: Placement, rank: int, num_microbatches: int) -> list[int]:
    """Chunks (``vp_stage``) of the forwards whose activations rank ``rank`` holds at its peak."""
    if placement.schedule in ("1f1b", "interleaved"):
        return megatron_in_flight(placement.pp, rank, placement.vpp, num_microbatches)
    raise NotImplementedError(f"in-flight micro-batches of the {placement.schedule} schedule")
