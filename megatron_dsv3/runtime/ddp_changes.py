"""Run-time changes to Megatron's data-parallel gradient reduction for DualPipe(V) (group ``launch``).

Applied with the ``launch`` group (:func:`megatron_dsv3.runtime.activation.activate`), before any
model is wrapped in ``DistributedDataParallel``: DDP makes its grad-ready hooks when it wraps a chunk.
"""

from __future__ import annotations

from megatron_dsv3.model.wgrad import WGRAD
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.placement import placement_of
from megatron_dsv3.pipeline import mirrors
from megatron_dsv3.runtime.registry import megatron_change, original, replace

_DDP = "megatron.core.distributed.distributed_data_parallel.DistributedDataParallel"


@megatron_change(
    targets=[f"{_DDP}._make_backward_post_hook"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="DDP's grad-ready hook learns of weight gradients deferred outside Transformer "
    "Engine (today only TE modules' register_wgrad_accumulation_and_reduce_hooks defer it)",
)
def deferred_weights_are_ready_at_their_w():
    """DDP counts a weight whose gradient the zero-bubble split deferred as ready at its ``W``, not its ``B``.

    Megatron DDP's grad-ready hook sits on each parameter's AccumulateGrad node.  A deferring backward
    (a DualPipe ``B``, :mod:`megatron_dsv3.model.wgrad`) returns no gradient for the weights whose GEMMs
    it queued, yet autograd still runs their AccumulateGrad node, so the hook fires with
    ``param.grad`` None: with ``--overlap-grad-reduce`` Megatron asserts there, and it would count the
    weight as ready before its gradient exists.  The changed hook does nothing for such a call
    (``WGRAD.withholds(param)``: inside a deferring backward and no gradient); the ``W`` later gives
    the weight its gradient through autograd, which fires the same hook with the gradient there, so
    DDP adds it to ``main_grad`` and counts it then, and each bucket starts reducing when its last
    ``W`` has run.  Every other call is Megatron's hook unchanged.
    """
    make_hook = original(f"{_DDP}._make_backward_post_hook")

    def _make_backward_post_hook(self, param):
        hook = make_hook(self, param)

        def hook_unless_withheld(*unused):
            if WGRAD.withholds(param):
                return None
            return hook(*unused)

        return hook_unless_withheld

    replace(f"{_DDP}._make_backward_post_hook", _make_backward_post_hook)


_BUCKET_GROUP = "megatron.core.distributed.param_and_grad_buffer._ParamAndGradBucketGroup"


@megatron_change(
    targets=[f"{_DDP}.__init__"],
    versions="megatron-core 0.19.x (no DualPipe in any release)",
    fixed_upstream_when="Megatron-Core has DualPipe, or DDP takes a reduction group per chunk and learns of "
    "weight gradients a schedule defers outside its own combined 1F1B",
)
def dualpipe_chunks_are_wrapped_for_their_schedule():
    """DDP wraps a DualPipe(V) chunk for what its schedule does to the chunk's gradients.

    * **DualPipe's mirrored copies**: each buffer is one bucket (so the two copies of a stage have
      the same buckets; Megatron buckets only pipeline rank 0's first chunk, finer), and every bucket
      group reduces over its data-parallel group joined with the mirror partner's
      (:mod:`megatron_dsv3.pipeline.mirrors`; the change
      ``dualpipe_mirrors_reduce_with_their_data_parallel_ranks`` runs the reduction).  With the
      distributed optimizer, its parameter layout is recomputed as one bucket per buffer, sharded
      as before.  ``--ddp-average-in-collective`` is refused: averaging over 2 x DP would halve the
      copies' sum.
    * **Transformer Engine's deferred weight GEMMs** (``delay_wgrad_compute``, which the zero-bubble
      split on TE sets): DDP puts its grad-ready hook on TE's wgrad hooks, as Megatron does for its own
      ``--delay-wgrad-compute`` (``ddp_config.delay_wgrad_compute``), so a deferred weight counts as
      ready when the schedule's ``W`` runs its GEMM (``backward_dw``).

    Other schedules' chunks are wrapped as Megatron wraps them.
    """
    ddp_init = original(f"{_DDP}.__init__")

    def __init__(self, config, ddp_config, module, disable_bucketing=False, pg_collection=None,
                 full_param_layout=None):
        if config.delay_wgrad_compute and placement_of(config).schedule in DEEPSEEK_SCHEDULES:
            ddp_config.delay_wgrad_compute = True
        mirrored = mirrors.are_mirrored(config)
        if mirrored:
            mirrors.check_ddp_settings(ddp_config)
            disable_bucketing = True
            if full_param_layout is not None:
                full_param_layout = mirrors.single_bucket_layout(full_param_layout, module, ddp_config)
        ddp_init(self, config, ddp_config, module, disable_bucketing=disable_bucketing,
                 pg_collection=pg_collection, full_param_layout=full_param_layout)
        if mirrored:
            mirrors.join_mirror_reduction(self)

    replace(f"{_DDP}.__init__", __init__)


@megatron_change(
    targets=[f"{_BUCKET_GROUP}.start_grad_sync"],
    versions="megatron-core 0.19.x (no DualPipe in any release)",
    fixed_upstream_when="Megatron-Core has DualPipe, or DDP takes a reduction group per chunk",
)
def dualpipe_mirrors_reduce_with_their_data_parallel_ranks():
    """DualPipe's two copies of a stage sum their gradients inside DDP's reduction, over 2 x DP ranks.

    Rank r holds stage r and a copy of stage P-1-r; a stage's gradient is the sum over both copies
    and the data-parallel ranks.  A bucket group of a DualPipe chunk (wrapped by
    ``dualpipe_chunks_are_wrapped_for_their_schedule``) reduces over its data-parallel group joined
    with the mirror partner's (:mod:`megatron_dsv3.pipeline.mirrors`): one all-reduce, also with the
    distributed optimizer (each rank then reads its shard of the result), after Megatron's 1/DP
    scaling.  With ``--overlap-grad-reduce`` it starts from the grad-ready hooks like any bucket, so
    the copies' sum overlaps the backward instead of following the step as a separate exchange.
    Other bucket groups reduce as Megatron's do.
    """
    start_grad_sync = original(f"{_BUCKET_GROUP}.start_grad_sync")

    def start_grad_sync_with_mirrors(self, force_all_reduce=False):
        group = mirrors.mirror_group(self)
        if group is None:
            return start_grad_sync(self, force_all_reduce=force_all_reduce)
        # The bucket group's collective group, for this call: the copies and their data-parallel ranks.
        name = ("intra_distributed_optimizer_instance_group" if self.ddp_config.use_distributed_optimizer
                else "data_parallel_group")
        own = getattr(self, name)
        setattr(self, name, group)
        try:
            return start_grad_sync(self, force_all_reduce=True)
        finally:
            setattr(self, name, own)

    replace(f"{_BUCKET_GROUP}.start_grad_sync", start_grad_sync_with_mirrors)
