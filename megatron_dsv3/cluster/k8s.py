"""A Kubernetes JobSet manifest of a checked :class:`~megatron_dsv3.cluster.request.ClusterJob`.

One Indexed Job of ``nodes`` pods (a JobSet ``replicatedJob``), one ``torchrun`` per pod, static
rendezvous on pod 0 through the JobSet's headless service.  The pod runs what a Slurm job step
runs: the check on its own machine (:mod:`megatron_dsv3.cluster.preflight`), then ``megatron-dsv3
train RECIPE OVERRIDES -- --exit-signal-handler``.  Stopping: Kubernetes sends ``SIGTERM`` to a
pod it evicts or preempts and waits ``terminationGracePeriodSeconds`` (``--stop-minutes``);
``torchrun`` passes it on, Megatron saves a checkpoint and exits; the JobSet's failure policy then
restarts every pod (``maxRestarts``), and each resumes from the checkpoint on the shared volume.
A recipe file is carried in the manifest (the pods cannot see the machine that wrote it).

Written for JobSet ``v1alpha2`` (kubernetes-sigs/jobset) and the NVIDIA device plugin
(``nvidia.com/gpu``); not tested against a cluster here (the Slurm script is, tests/test_slurm.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from megatron_dsv3.cluster.preflight import PREFLIGHT_DONE
from megatron_dsv3.cluster.request import ClusterJob
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.train.launcher import worker_environment

PORT = 29500
RECIPE_IN_POD = "/tmp/megatron-dsv3-recipe.yaml"


def jobset_manifest(job: ClusterJob, *, namespace: str | None = None, queue: str | None = None,
                    volume: str | None = None, max_restarts: int = 100) -> str:
    """The manifest (YAML).  ``volume`` is ``CLAIM:/mount/path``: a PersistentVolumeClaim every pod
    mounts (the checkpoint folder must be on it); ``queue`` a Kueue LocalQueue."""
    if not job.container_image:
        raise ConfigError("a Kubernetes job needs --container-image (pods run in an image)", key="--container-image",
                          where="command line", fix="give the image that has megatron-dsv3 installed, e.g."
                          " --container-image registry.example.com/megatron-dsv3:0.1")
    name = _name(job.recipe.name)
    claim, mount = _volume(volume, job.run_dir)
    env = [{"name": k, "value": v} for k, v in worker_environment(job.recipe, f"{job.run_dir}/metrics.jsonl").items()]
    container = {
        "name": "trainer",
        "image": job.container_image,
        "command": ["bash", "-c", _pod_script(job, name)],
        "env": env,
        "ports": [{"containerPort": PORT}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "checkpoints", "mountPath": mount}],
    }
    if not job.recipe.is_cpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.per_node}}
    pod = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": job.stop_seconds,
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}],
    }
    manifest = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {}),
                     **({"labels": {"kueue.x-k8s.io/queue-name": queue}} if queue else {})},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "node",
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": job.nodes, "completions": job.nodes, "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": {"spec": pod},
                }},
            }],
        },
    }
    header = (f"# Recipe {job.recipe.name} on {job.nodes} pod(s) x {job.per_node}"
              f" {'processes' if job.recipe.is_cpu else 'GPUs'}; apply with `kubectl apply -f FILE`.\n"
              f"# Every restart resumes from {job.run_dir}.\n")
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the pod's script) as YAML literal blocks, readable in the manifest."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _pod_script(job: ClusterJob, name: str) -> str:
    recipe_ref, carry = job.recipe_ref, ""
    if Path(job.recipe_ref).is_file():
        recipe_ref = RECIPE_IN_POD
        carry = f"cat > {RECIPE_IN_POD} <<'MEGATRON_DSV3_RECIPE'\n{Path(job.recipe_ref).read_text()}\nMEGATRON_DSV3_RECIPE\n"
    recipe = " ".join(shlex.quote(a) for a in (recipe_ref, *job.overrides))
    head = f"{name}-node-0-0.{name}"  # pod 0 of the Indexed Job, through the JobSet's headless service
    return f"""set -uo pipefail
{carry}mkdir -p {shlex.quote(job.run_dir)}
echo "[megatron-dsv3] pod ${{JOB_COMPLETION_INDEX}} of {job.nodes}, restart ${{JOBSET_RESTART_ATTEMPT:-0}}"
{job.python} -m megatron_dsv3.cluster.preflight --nodes {job.nodes} --per-node {job.per_node} {recipe}
case $? in 0) ;; {PREFLIGHT_DONE}) echo "[megatron-dsv3] nothing left to train"; exit 0 ;; *) exit 1 ;; esac
exec {job.python} -m torch.distributed.run --nnodes={job.nodes} --nproc-per-node={job.per_node} \\
  --node-rank="$JOB_COMPLETION_INDEX" --master-addr={head} --master-port={PORT} \\
  --max-restarts=0 --shutdown-timeout={job.stop_seconds} \\
  -m megatron_dsv3.cli train {recipe} -- --exit-signal-handler
"""


def _volume(volume: str | None, run_dir: str) -> tuple[str, str]:
    if volume is None:
        raise ConfigError("a Kubernetes job needs --volume: a restarted pod resumes only from a checkpoint on a"
                          " volume every pod mounts", key="--volume", where="command line",
                          fix="give a PersistentVolumeClaim and its mount path, e.g. --volume checkpoints:/checkpoints,"
                          " with checkpoint.save=/checkpoints/RUN")
    claim, _, mount = volume.partition(":")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", claim) or not mount.startswith("/"):
        raise ConfigError(f"--volume {volume!r} is not CLAIM:/mount/path", key="--volume", where="command line",
                          fix="give a PersistentVolumeClaim's name and where pods mount it, e.g."
                          " --volume checkpoints:/checkpoints")
    if not Path(run_dir).is_absolute() or not (run_dir + "/").startswith(mount.rstrip("/") + "/"):
        raise ConfigError(f"checkpoint.save={run_dir} is not on the volume mounted at {mount}; a restarted pod"
                          " would not find its checkpoint", key="checkpoint.save", where="command line",
                          fix=f"add the overrides checkpoint.save={mount.rstrip('/')}/RUN checkpoint.load="
                          f"{mount.rstrip('/')}/RUN")
    return claim, mount


def _name(recipe_name: str) -> str:
    """A DNS-1035 label short enough for the pods' host names (JobSet adds -node-0-N)."""
    name = re.sub(r"[^a-z0-9-]", "-", recipe_name.lower()).strip("-")
    name = name if name and name[0].isalpha() else f"dsv3-{name}"
    return name[:40].rstrip("-")
