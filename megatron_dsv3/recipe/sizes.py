"""A recipe's parallel sizes and batch arithmetic at a world size."""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import ParallelLayout


def fail(recipe, path: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, fix=fix, key=path, where=recipe.where(path))


def parallel_layout(recipe, world_size: int | None = None) -> ParallelLayout:
    """The recipe's parallel sizes at ``world_size``; dp = world_size / (tp * pp * cp)."""
    par, ws = recipe.parallel, recipe.world_size(world_size)
    given = "" if world_size is None else " (the number of processes asked for)"
    if not isinstance(ws, int) or ws < 1:
        raise fail(recipe, "parallel.world_size", f"parallel.world_size={ws!r}{given} must be a positive integer",
                    "set the number of GPUs")
    model_ranks = par.tp * par.pp * par.cp
    if model_ranks < 1 or ws % model_ranks:
        raise fail(
            recipe, "parallel.world_size",
            f"parallel.world_size={ws}{given} is not divisible by parallel.tp x pp x cp ="
            f" {par.tp} x {par.pp} x {par.cp} = {model_ranks}",
            f"use a multiple of {model_ranks} GPUs, or change tp, pp or cp")
    return ParallelLayout(tp=par.tp, pp=par.pp, vpp=par.vpp, ep=par.ep, etp=par.etp, cp=par.cp,
                          dp=ws // model_ranks, sp=par.sp, layout=par.layout, schedule=par.schedule,
                          zero_bubble=par.zero_bubble, fb_overlap=par.fb_overlap)


def global_batch(recipe, layout: ParallelLayout) -> int:
    t = recipe.training
    return t.global_batch_size or t.micro_batch_size * layout.dp


def num_microbatches(recipe, layout: ParallelLayout) -> int:
    """Micro-batches per step and data-parallel rank (at the final batch size)."""
    return global_batch(recipe, layout) // (recipe.training.micro_batch_size * layout.dp)
