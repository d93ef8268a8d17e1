"""The ``megatron-dsv3 slurm`` subcommand: its parser and handler (registered by ``cli.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_slurm_parser(sub) -> None:
    p = sub.add_parser(
        "slurm", help="write a Slurm batch script for a recipe (torchrun per node, requeue, save before the time limit)",
        description="Checks the recipe at world size nodes x GPUs per node, then writes a batch script: a check"
        " on the job's own machine, one torchrun per node (c10d rendezvous on the first node), --requeue, and a"
        " SIGTERM to Megatron (--exit-signal-handler) --stop-minutes before the time limit, so that every try"
        " resumes from the recipe's checkpoint folder. docs/cluster.md shows the commands.")
    p.add_argument("recipe", help="a recipe YAML file or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--nodes", type=int, required=True, help="nodes to run on")
    p.add_argument("--gpus-per-node", type=int, default=None, dest="per_node",
                   help="GPUs per node (default: the recipe's hardware.gpus_per_node); CPU recipes: processes"
                   " per node (default: parallel.world_size / nodes)")
    p.add_argument("--partition", default=None, help="Slurm partition (--partition)")
    p.add_argument("--account", default=None, help="Slurm account (--account)")
    p.add_argument("--time", default=None, help="time limit, Slurm syntax (e.g. 04:00:00 or 2-00:00:00)")
    # nargs="?": a missing value is refused by our check, which says what to write.
    p.add_argument("--container-image", nargs="?", const="", default=None,
                   help="run in this container image (enroot/pyxis: srun --container-image)")
    p.add_argument("--stop-minutes", type=float, default=5.0,
                   help="minutes before the time limit at which the training saves and stops (default 5)")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write the script here (default: stdout)")
    p.set_defaults(func=cmd_slurm)


def cmd_slurm(ns: argparse.Namespace) -> int:
    # lazy: every `megatron-dsv3` command builds this parser; the recipe check imports the model and torch.
    from megatron_dsv3.cluster.request import ClusterRequest, plan_cluster_job
    from megatron_dsv3.cluster.slurm import sbatch_script

    request = ClusterRequest(nodes=ns.nodes, per_node=ns.per_node, partition=ns.partition, account=ns.account,
                             time=ns.time, container_image=ns.container_image, stop_minutes=ns.stop_minutes)
    job = plan_cluster_job(ns.recipe, list(ns.overrides), request)
    script = sbatch_script(job, command=["megatron-dsv3", *sys.argv[1:]] if sys.argv[1:] else None)
    if ns.output is None:
        sys.stdout.write(script)
        return 0
    path = Path(ns.output)
    path.write_text(script)
    path.chmod(0o755)
    unit = "processes" if job.recipe.is_cpu else "GPUs"
    print(f"wrote {path}: {job.recipe.name} on {job.nodes} node(s) x {job.per_node} {unit}; checkpoints and"
          f" metrics in {job.run_dir}. Submit with: sbatch {path}")
    return 0
