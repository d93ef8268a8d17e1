"""The ``megatron-dsv3 slurm`` and ``k8s`` subcommands: their parsers and handlers (registered by :mod:`megatron_dsv3.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_job_arguments(p, *, nodes: str, per_node: str) -> None:
    """What both job writers take: the recipe, its overrides, the nodes and the GPUs on each."""
    p.add_argument("recipe", help="a recipe YAML file or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--nodes", type=int, required=True, help=nodes)
    p.add_argument("--gpus-per-node", type=int, default=None, dest="per_node", help=per_node)


def add_slurm_parser(sub) -> None:
    p = sub.add_parser(
        "slurm", help="write a Slurm batch script for a recipe (torchrun per node, requeue, save before the time limit)",
        description="Checks the recipe at world size nodes x GPUs per node, then writes a batch script: a check"
        " on the job's own machine, one torchrun per node (c10d rendezvous on the first node), --requeue, and a"
        " SIGTERM to Megatron (--exit-signal-handler) --stop-minutes before the time limit, so that every try"
        " resumes from the recipe's checkpoint folder. docs/cluster.md shows the commands.")
    _add_job_arguments(p, nodes="nodes to run on", per_node="GPUs per node (default: the recipe's"
                       " hardware.gpus_per_node); CPU recipes: processes per node (default: parallel.world_size / nodes)")
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


def add_k8s_parser(sub) -> None:
    p = sub.add_parser(
        "k8s", help="write a Kubernetes JobSet manifest for a recipe (torchrun per pod, restart from checkpoints)",
        description="Checks the recipe as `slurm` does, then writes a JobSet (jobset.x-k8s.io/v1alpha2): an Indexed"
        " Job of one pod per node, one torchrun per pod, SIGTERM on eviction makes Megatron save, the JobSet"
        " restarts every pod, each resumes from the checkpoint volume. docs/cluster.md.")
    _add_job_arguments(p, nodes="pods (one per node)",
                       per_node="GPUs per pod (default: the recipe's hardware.gpus_per_node)")
    p.add_argument("--container-image", nargs="?", const="", default=None, help="the image with megatron-dsv3")
    p.add_argument("--volume", default=None, metavar="CLAIM:/PATH",
                   help="a PersistentVolumeClaim every pod mounts at PATH; checkpoint.save must be under it")
    p.add_argument("--namespace", default=None, help="Kubernetes namespace")
    p.add_argument("--queue", default=None, help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    p.add_argument("--stop-minutes", type=float, default=5.0,
                   help="grace period after SIGTERM for the checkpoint save (default 5)")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write the manifest here (default: stdout)")
    p.set_defaults(func=cmd_k8s)


def cmd_k8s(ns: argparse.Namespace) -> int:
    # lazy: every `megatron-dsv3` command builds this parser; the recipe check imports the model and torch.
    from megatron_dsv3.cluster.k8s import jobset_manifest
    from megatron_dsv3.cluster.request import ClusterRequest, plan_cluster_job

    request = ClusterRequest(nodes=ns.nodes, per_node=ns.per_node, container_image=ns.container_image,
                             stop_minutes=ns.stop_minutes)
    job = plan_cluster_job(ns.recipe, list(ns.overrides), request)
    manifest = jobset_manifest(job, namespace=ns.namespace, queue=ns.queue, volume=ns.volume)
    if ns.output is None:
        sys.stdout.write(manifest)
        return 0
    Path(ns.output).write_text(manifest)
    print(f"wrote {ns.output}: {job.recipe.name} on {job.nodes} pod(s) x {job.per_node}; apply with: kubectl apply"
          f" -f {ns.output}")
    return 0
