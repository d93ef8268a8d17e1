"""Where Megatron's training loop reads a DualPipe(V) step's losses.

Megatron's ``train_step`` and ``evaluate`` reduce the loss reports on the last pipeline rank, and log
the MTP loss from its tracker there (``megatron/training/training.py``,
``MTPLossLoggingHelper``), where 1F1B computes both.  DualPipeV computes them on rank 0, DualPipe on
both end ranks (half the micro-batches each): the reports travel to the last rank, and the MTP
tracker is reduced over the pipeline group.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.pipeline.rank_step import RankStep, device


def pool_mtp_metrics(step: RankStep) -> None:
    """Every pipeline rank gets the MTP tracker's tensors, and Megatron's own reduction sums them over
    the pipeline group (then averages over data parallelism, as it always does)."""
    if step.forward_only or not step.config.mtp_num_layers:
        return
    tracker = MTPLossLoggingHelper.tracker
    for key in ("loss_values", "correct_values", "total_values"):
        if key not in tracker:
            tracker[key] = torch.zeros(step.config.mtp_num_layers, device=device())
    tracker["reduce_group"] = step.group
    tracker["avg_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)


def reports_for_megatron(step: RankStep, reports: dict) -> list:
    """``reports`` (global micro-batch -> what the loss function reported) of every loss rank, in
    micro-batch order on the last pipeline rank; an empty list elsewhere."""
    last = step.placement.pp - 1
    holders = [r for r in step.placement.loss_ranks if r != last]
    gathered = dict(reports) if step.rank == last else {}
    for holder in holders:
        if step.rank == holder:
            torch.distributed.send_object_list([_to(reports, torch.device("cpu"))], step.global_ranks[last],
                                               group=step.group)
        elif step.rank == last:
            received = [None]
            torch.distributed.recv_object_list(received, step.global_ranks[holder], group=step.group)
            gathered.update(_to(received[0], device()))
    return [gathered[m] for m in sorted(gathered)] if step.rank == last else []


def _to(value, where: torch.device):
    """Tensors in nested dicts and lists moved to ``where`` (loss reports cross ranks on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(where)
    if isinstance(value, dict):
        return {k: _to(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, where) for v in value)
    return value
