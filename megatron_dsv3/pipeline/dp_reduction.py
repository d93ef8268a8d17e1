"""The data-parallel gradient reduction on a simulated step: after the schedule, or overlapped with it.

Each rank reduces each of its chunks' gradients once per step (:class:`~megatron_dsv3.pipeline.costs.ReductionCosts`
gives the time of one rank share; a chunk is its fraction of a share, as in the simulator).  A rank's
reductions run one after another on its network link:

* **after the step** (no ``--overlap-grad-reduce``): all of them start when the rank's last operation
  ends, as Megatron's ``finalize_model_grads`` reduces every bucket then;
* **overlapped** (``--overlap-grad-reduce``): a chunk's reduction starts when its last gradient is
  computed on that rank (its last backward, or its last ``W`` under the zero-bubble split), as DDP's
  grad-ready hooks start a bucket once all its gradients are in, and runs while the rank computes.

A chunk is one bucket here: DualPipe's chunks are (the copies' buckets must match,
:mod:`megatron_dsv3.pipeline.mirrors`); Megatron splits pipeline rank 0's first chunk into smaller
buckets, which would start part of that chunk's reduction a little earlier than modelled.  The step
ends when the last reduction ends on the slowest rank.
"""

from __future__ import annotations

from megatron_dsv3.pipeline.costs import ReductionCosts
from megatron_dsv3.pipeline.simulator import Timeline


def chunk_ms(timeline: Timeline, reduction: ReductionCosts) -> float:
    """One chunk's reduction under the timeline's schedule (a chunk is ``pp / stages`` of a rank share)."""
    return reduction.share_ms(timeline.schedule) * timeline.pp / timeline.stages


def step_with_reduction(timeline: Timeline, reduction: ReductionCosts, overlap: bool) -> float:
    """The step time including the data-parallel reduction, after the schedule or overlapped with it."""
    each = chunk_ms(timeline, reduction)
    step = 0.0
    for row in timeline.ranks:
        busy_until = row[-1].end if row else 0.0
        last: dict[int, float] = {}
        for interval in row:
            if interval.grad_stage is not None:
                last[interval.grad_stage] = interval.end
        link = 0.0
        for ready in sorted(last.values()):
            link = max(link, ready if overlap else busy_until) + each
        step = max(step, busy_until, link)
    return step
