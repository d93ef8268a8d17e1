"""DualPipe's mirrored copies reduce their gradients inside Megatron DDP's buckets.

Under DualPipe rank r holds stage r and a copy of stage P-1-r, and rank P-1-r the other way round
(arXiv 2412.19437v2, section 3.2.1; :mod:`megatron_dsv3.parallel.deepseek_placements`): a stage's
gradient is the sum over both copies and over the data-parallel ranks.  So each chunk's buckets
reduce over one group, this rank's data-parallel group joined with its mirror partner's (2 x DP
ranks; the expert buckets over the two expert data-parallel groups), as one all-reduce: the sum over
the copies is part of the data-parallel reduction, overlaps the backward as every other bucket does
(``--overlap-grad-reduce``), and no exchange between the copies follows the step.  Each bucket
keeps Megatron's scaling (1/DP, before the sum), so both copies hold the stage's reduced gradient,
bit for bit the same; with the distributed optimizer each rank then reads its own shard of it, as
after Megatron's reduce-scatter.

Both copies of a stage are the virtual stage of one index on the two ranks (rank r's stage r and rank
P-1-r's copy of it are both virtual stage 0 for r < P/2), built from the same spec, so their buffers
match parameter for parameter; each is one bucket (Megatron buckets only pipeline rank 0's first
chunk, which would make the copies' buckets differ), checked when the chunk is wrapped.  Both ranks
run the same program (the engine's, by position on the V), so their buckets become ready, and start
their all-reduces, in the same order.  :mod:`megatron_dsv3.runtime.ddp_changes` makes DDP do this.
"""

from __future__ import annotations

import weakref

import torch

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.placement import placement_of

_GROUPS: dict[tuple[int, ...], object] = {}  # a mirror reduction group by its global ranks, on every rank
_OF_BUCKET_GROUP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def are_mirrored(config) -> bool:
    """Whether the chunks of ``config``'s model are DualPipe's mirrored copies."""
    return placement_of(config).schedule == "dualpipe"


def single_bucket_layout(layout, module, ddp_config):
    """The distributed optimizer's parameter layout of ``module`` as one bucket per buffer, sharded as
    ``layout`` is (Megatron computes it with buckets on pipeline rank 0's first chunk only)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    shards = {key.is_expert_parallel: buffer.num_optimizer_shards for key, buffer in layout.layouts.items()}
    dense = shards.get(False, shards.get(True))
    return DistributedOptimizer.compute_full_param_layout(
        [p for p in module.parameters() if p.requires_grad], None, dense, ddp_config,
        expert_data_parallel_world_size=shards.get(True, dense))


def check_ddp_settings(ddp_config) -> None:
    if ddp_config.average_in_collective:
        raise ConfigError("DualPipe with --ddp-average-in-collective: an averaging all-reduce over the mirrored"
                          " copies and their data-parallel ranks would halve the sum of the two copies' gradients",
                          fix="drop --ddp-average-in-collective (Megatron then scales by 1/DP before summing)",
                          key="--ddp-average-in-collective")


def join_mirror_reduction(ddp) -> None:
    """Make every bucket group of ``ddp`` (a wrapped DualPipe chunk) reduce over its data-parallel
    group joined with the mirror partner's (collective: every rank wraps its chunks together)."""
    ranks = torch.distributed.get_process_group_ranks(ddp.pp_group)
    pp_rank = ranks.index(torch.distributed.get_rank())
    partner = ranks[len(ranks) - 1 - pp_rank]
    dense, expert = _joined((ddp.intra_dp_cp_group, ddp.intra_expt_dp_group), partner)
    for bucket_group in ddp.bucket_groups:
        _OF_BUCKET_GROUP[bucket_group] = dense
    for bucket_group in ddp.expert_parallel_bucket_groups:
        _OF_BUCKET_GROUP[bucket_group] = expert
    _check_same_buckets(ddp, dense)


def mirror_group(bucket_group):
    """The group a DualPipe chunk's bucket group all-reduces over (None: not a mirrored chunk's)."""
    return _OF_BUCKET_GROUP.get(bucket_group)


def reduces_with_mirrors(chunk) -> bool:
    """Whether a model chunk's gradients reach its mirror copy through its DDP buckets."""
    groups = getattr(chunk, "bucket_groups", []) + getattr(chunk, "expert_parallel_bucket_groups", [])
    return bool(groups) and all(mirror_group(g) is not None for g in groups)


def _joined(groups, partner: int) -> list:
    """Each of ``groups`` (this rank's) joined with the same group of rank ``partner``.

    Every rank learns every rank's groups and creates every joined group in one order, as
    ``torch.distributed.new_group`` requires; groups already made are kept (a rank wraps two chunks)."""
    me = torch.distributed.get_rank()
    mine = (partner, [tuple(torch.distributed.get_process_group_ranks(g)) for g in groups])
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    joined_by_rank = [[tuple(sorted(set(own) | set(everyone[p][1][i]))) for i, own in enumerate(own_groups)]
                      for p, own_groups in everyone]
    for ranks in sorted({r for joined in joined_by_rank for r in joined} - set(_GROUPS)):
        _GROUPS[ranks] = torch.distributed.new_group(list(ranks))
    return [_GROUPS[ranks] for ranks in joined_by_rank[me]]


def _check_same_buckets(ddp, group) -> None:
    """Both copies' buffers must be laid out alike, or the all-reduce would add unrelated values."""
    mine = [[b.grad_data.numel() for b in g.buckets] for g in ddp.bucket_groups + ddp.expert_parallel_bucket_groups]
    theirs = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(theirs, mine, group=group)
    if any(t != mine for t in theirs):
        raise RuntimeError(f"DualPipe's mirrored copies have different gradient buckets ({theirs}): their"
                           " gradients cannot be summed in one all-reduce; the two copies of a stage must be"
                           " built alike (a bug in the placement or the builder)")
