"""Forward/backward overlap through Megatron-Core's schedule plans (``combined_1f1b.py``).

Megatron-Core splits a model chunk's layers into nodes (attention, MoE dispatch, MLP, MoE combine,
MTP post-process; ``GPTModel.build_schedule_plan``) and ``combined_forward_backward_step`` runs one
micro-batch's forward with another's backward node by node, so that one side's all-to-all runs on a
communication stream while the other side computes.  DualPipe's ``F&B`` pairs are exactly such
pairs (any two chunks), so they run through it unchanged.

A micro-batch forwarded through a plan must be backwarded through it, so with overlap on every
forward, backward and pair goes through ``combined_forward_backward_step`` (a lone forward or
backward as a pair with one side empty).  The user's ``forward_step_func`` is called as Megatron's
own schedules call it; the model it receives builds a plan when called (:class:`_PlanningModel`),
so any ``forward_step_func`` works, stock ``pretrain_gpt.py``'s included, without Megatron's
``overlap_moe_expert_parallel_comm`` flag (whose config checks demand bf16 and would not let fp32
CPU runs prove the overlap exact).

Each step first sets up Megatron's communication stream (``set_streams``, as ``combined_1f1b.py``'s
schedules do): without it the dispatch and combine would run on the compute stream (no overlap) and
their backward's ``record_stream(None)`` would raise.

On a CPU the nodes run in the same interleaved order but nothing runs concurrently (gloo's
all-to-all inside Megatron's dispatcher is synchronous): CPU timings cannot show the overlap's gain.
CPU mode's streams keep CUDA's contract, so the CPU tests see which stream each node runs on.
"""

from __future__ import annotations

from megatron.core.pipeline_parallel.combined_1f1b import combined_forward_backward_step
from megatron.core.pipeline_parallel.utils import set_streams

from megatron_dsv3.pipeline.rank_step import RankStep


class _PlanningModel:
    """A model chunk whose call builds its schedule plan (``build_schedule_plan``) instead of running."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model.build_schedule_plan(*args, **kwargs)


def planning(forward_step_func):
    """``forward_step_func`` as ``combined_forward_backward_step`` calls it (``return_schedule_plan``)."""

    def plan_step(data_iterator, model, return_schedule_plan=False, *args, **kwargs):
        return forward_step_func(data_iterator, _PlanningModel(model), *args, **kwargs)

    return plan_step


def combined_step(step: RankStep, forward: tuple | None, backward: tuple | None):
    """Run ``forward = (chunk, mb, input)`` and/or ``backward = (chunk, input, output, output_grad)``
    (engine chunk numbers) through Megatron's overlapped step; ``(output, num_tokens, store, input_grad)``."""
    # As Megatron's own overlapped schedules do first: the dispatch and combine nodes run on the
    # stream ``get_comm_stream()`` returns, None until this makes it (once per process).
    set_streams(high_priority=step.config.high_priority_a2a_comm_stream)
    store: list = []
    f_chunk, f_mb, f_input = forward if forward else (None, None, None)
    b_chunk, b_input, b_output, b_output_grad = backward if backward else (None, None, None, None)
    f_vp = step.vp(f_chunk) if forward else None
    b_vp = step.vp(b_chunk) if backward else None
    output, num_tokens, input_grad = combined_forward_backward_step(
        planning(step.forward_step_func),
        step.iterators[f_vp] if forward else None,
        step.model[f_vp] if forward else None,
        step.num_microbatches,
        f_input,
        store,
        step.model[b_vp] if backward else None,
        b_input,
        b_output,
        b_output_grad,
        step.config,
        f_model_chunk_id=f_vp,
        is_first_microbatch=step.first_microbatch(f_chunk) if forward else False,
        current_microbatch=step.global_mb(f_chunk, f_mb) if forward else None,
    )
    return output, num_tokens, store, input_grad
