"""The Slurm batch script of a checked :class:`~megatron_dsv3.cluster.request.ClusterJob`.

What the script does, in order (each step a block of the script, commented):

1. ``srun`` one task that runs :mod:`megatron_dsv3.cluster.preflight` on the job's own machine:
   the allocation against the recipe (nodes, GPUs per node), then ``megatron-dsv3 check`` at world
   size nodes x GPUs with the GPU's own memory; a mismatch ends the job before training, with the
   fix; a run whose checkpoint already holds every step ends it as done.
2. ``srun`` one ``torchrun`` per node, rendezvous ``c10d`` on the first node (its ``NodeAddr``),
   each running ``megatron-dsv3 train RECIPE OVERRIDES -- --exit-signal-handler``: the recipe
   becomes Megatron's arguments on the job's machine (``auto`` is resolved there).
3. Stopping: Slurm sends the batch shell ``SIGUSR1`` ``--stop-minutes`` before the time limit
   (``--signal=B:USR1@...``); the script passes ``SIGTERM`` to the training steps, Megatron's
   ``--exit-signal-handler`` saves a checkpoint at the end of the step and exits, and the script
   requeues the job (``scontrol requeue``).  A preemption, ``scontrol requeue`` or ``scancel``
   sends ``SIGTERM`` itself: the same save, then Slurm requeues (``--requeue``) or ends the job.
   ``torchrun --shutdown-timeout`` gives the workers the same time to save before it kills them
   (Slurm's ``KillWait``, or a partition's ``GraceTime`` for preemption, must be at least as long).
   Every try resumes from the recipe's ``checkpoint.load`` and appends to one log, ``%x-%j.out``.
"""

from __future__ import annotations

import re
import shlex
import time

from megatron_dsv3.cluster.preflight import PREFLIGHT_DONE
from megatron_dsv3.cluster.request import ClusterJob
from megatron_dsv3.train.launcher import worker_environment


def sbatch_script(job: ClusterJob, command: list[str] | None = None) -> str:
    """The batch script; ``command`` (the ``megatron-dsv3 slurm`` command line) goes in its header."""
    recipe = job.recipe
    unit = "processes" if recipe.is_cpu else "GPUs"
    header = [
        "#!/bin/bash",
        f"# Recipe {recipe.name} on {job.nodes} node(s) x {job.per_node} {unit} (world size {job.world_size}),"
        f" written {time.strftime('%Y-%m-%d %H:%M')} by:",
        f"#   {shlex.join(command)}" if command else "#   megatron-dsv3 slurm",
        "# Submit with `sbatch FILE`. Every try (requeue, resubmission) resumes from"
        f" {job.run_dir}; log: %x-%j.out.",
    ]
    directives = [
        f"--job-name={_job_name(recipe.name)}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        *([] if recipe.is_cpu else [f"--gpus-per-node={job.per_node}", "--exclusive"]),
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        *([f"--time={job.time}"] if job.time else []),
        "--output=%x-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{job.stop_seconds}",
    ]
    container = []
    if job.container_image:
        container = [f"--container-image={shlex.quote(job.container_image)}",
                     '--container-mounts="$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR"',
                     '--container-workdir="$SLURM_SUBMIT_DIR"']
    env = worker_environment(recipe, f"{job.run_dir}/metrics.jsonl")
    exports = [f"export {k}=${{{k}:-{shlex.quote(v)}}}" if k == "TORCHDYNAMO_DISABLE" else f"export {k}={shlex.quote(v)}"
               for k, v in env.items()]
    body = f"""
set -uo pipefail

PYTHON=${{MEGATRON_DSV3_PYTHON:-{shlex.quote(job.python)}}}  # has megatron-dsv3 installed, on every node
RECIPE={shlex.quote(job.recipe_ref)}
OVERRIDES=({" ".join(shlex.quote(o) for o in job.overrides)})
NODES={job.nodes}
PER_NODE={job.per_node}  # {unit} per node
STOP_SECONDS={job.stop_seconds}
RUN_DIR={shlex.quote(job.run_dir)}
CONTAINER=({" ".join(container)})
{chr(10).join(exports)}

say() {{ echo "[megatron-dsv3] $(date +%T) $*"; }}
mkdir -p "$RUN_DIR"
say "job $SLURM_JOB_ID, try $((${{SLURM_RESTART_COUNT:-0}} + 1)), nodes $SLURM_JOB_NODELIST"

# 1. On the job's own machine: the allocation against the recipe, then `megatron-dsv3 check` at
#    world size NODES x PER_NODE (layout, memory against this GPU).
srun --nodes=1 --ntasks=1 "${{CONTAINER[@]}}" "$PYTHON" -m megatron_dsv3.cluster.preflight \\
  --nodes "$NODES" --per-node "$PER_NODE" "$RECIPE" "${{OVERRIDES[@]}}"
case $? in
  0) ;;
  {PREFLIGHT_DONE}) say "$RUN_DIR already holds the last step; nothing to train"; exit 0 ;;
  *) say "refused before training (see above)"; exit 1 ;;
esac

# 2. One torchrun per node, c10d rendezvous on the first node; Megatron saves and exits on SIGTERM.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')
PORT=$((29500 + SLURM_JOB_ID % 10000))
STOPPING=
on_usr1() {{
  STOPPING=time-limit
  say "the time limit is $STOP_SECONDS s away: the training saves a checkpoint and stops"
  scancel --signal=TERM "$SLURM_JOB_ID"  # the job steps (torchrun, its workers), not this shell
}}
on_term() {{
  STOPPING=slurm
  say "Slurm is stopping the job (preemption, requeue or scancel): the training saves a checkpoint and stops"
}}
trap on_usr1 USR1
trap on_term TERM
srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${{CONTAINER[@]}}" \\
  "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$PER_NODE" \\
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts=0 --shutdown-timeout="$STOP_SECONDS" \\
    -m megatron_dsv3.cli train "$RECIPE" "${{OVERRIDES[@]}}" -- --exit-signal-handler &
SRUN=$!
while :; do  # `wait` returns early when a trapped signal arrives
  wait "$SRUN"; CODE=$?
  kill -0 "$SRUN" 2>/dev/null || break
done

# 3. Requeue when stopped for the time limit; Slurm requeues a preempted job itself.
if [ "$STOPPING" = time-limit ]; then
  say "stopped before the time limit (exit $CODE); requeued: the next try resumes from $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [ -n "$STOPPING" ]; then
  say "stopped by Slurm (exit $CODE); a requeued or resubmitted job resumes from $RUN_DIR"
else
  say "training ended (exit $CODE)"
fi
exit "$CODE"
"""
    return "\n".join(header + [f"#SBATCH {d}" for d in directives]) + "\n" + body


def _job_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:64] or "megatron-dsv3"
