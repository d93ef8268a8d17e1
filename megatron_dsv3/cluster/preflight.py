"""Run inside a cluster job, before training: the allocation against the recipe, then ``check``.

``python -m megatron_dsv3.cluster.preflight --nodes N --per-node G RECIPE [KEY=VALUE ...]`` is
the first step of the batch script :mod:`megatron_dsv3.cluster.slurm` writes.  On the job's own
machine it compares what Slurm allocated (``SLURM_JOB_NUM_NODES``, the GPUs this node sees) with
what the script was written for, then prints ``megatron-dsv3 check`` at world size N x G, against
this GPU's memory.  Exit status: 0 train, 1 refused (a message says why and how to fix it),
:data:`PREFLIGHT_DONE` when the checkpoint already holds the last step.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.recipe import load_recipe, recipe_report
from megatron_dsv3.train.checkpoints import resume_step

PREFLIGHT_DONE = 3  # the exit status meaning "the checkpoint already holds the last step"


def allocation_problems(env: dict, nodes: int, per_node: int, *, cuda: bool, visible_gpus: int | None) -> list[str]:
    """What differs between the allocation (``env``: Slurm's variables; ``visible_gpus``: what this
    node sees) and the job the script was written for; each entry says the fix."""
    problems = []
    allocated = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if allocated is not None and int(allocated) != nodes:
        problems.append(
            f"the job has {allocated} node(s) but its script is written for {nodes} (the recipe's world size is"
            f" {nodes} x {per_node}). Fix: submit the script without overriding --nodes/-N, or write a new one"
            f" with `megatron-dsv3 slurm RECIPE --nodes {allocated}` (and parallel.world_size to match)")
    if cuda and (visible_gpus or 0) < per_node:
        problems.append(
            f"this node sees {visible_gpus or 0} GPU(s) but the job runs {per_node} processes per node, one per"
            f" GPU. Fix: submit the script as written (its #SBATCH --gpus-per-node={per_node}), or write one"
            f" for these nodes with --gpus-per-node {visible_gpus or 0} and hardware.gpus_per_node={visible_gpus or 0}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.cluster.preflight")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--per-node", type=int, required=True)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(argv)
    try:
        return _preflight(ns)
    except ConfigError as err:
        print(f"megatron-dsv3: error: {err}", file=sys.stderr)
        return 1


def _preflight(ns) -> int:
    recipe = load_recipe(ns.recipe, ns.overrides)
    cuda = not recipe.is_cpu
    visible, memory_gb = _gpus() if cuda else (None, None)
    problems = allocation_problems(dict(os.environ), ns.nodes, ns.per_node, cuda=cuda, visible_gpus=visible)
    world = ns.nodes * ns.per_node
    print(f"[megatron-dsv3] allocation: {ns.nodes} node(s) x {ns.per_node} {'GPUs' if cuda else 'processes'}"
          f" = world size {world}" + (f"; this node: {visible} GPU(s) of {memory_gb:.1f} GiB" if cuda else ""))
    for problem in problems:
        print(f"megatron-dsv3: error: {problem}", file=sys.stderr)
    report = recipe_report(recipe, world, memory_gb)
    print(report.render(), flush=True)
    if problems or not report.ok:
        return 1
    done = resume_step(recipe.checkpoint.load)
    if done is not None and recipe.training.train_iters is not None and done >= recipe.training.train_iters:
        return PREFLIGHT_DONE
    return 0


def _gpus() -> tuple[int, float | None]:
    import torch  # lazy: only a GPU recipe asks; the CPU check runs without initialising CUDA

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if count else None
    return count, memory


if __name__ == "__main__":
    sys.exit(main())
