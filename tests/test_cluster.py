"""``megatron-dsv3 slurm`` without a cluster: bad input refused with its fix before a script is
written, the script's requests and stop path, and the in-job allocation check.  The real Slurm run
is ``tests/test_slurm.py`` (``pytest -m slurm``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from megatron_dsv3.cli import main
from megatron_dsv3.cluster.preflight import allocation_problems

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

GPU_RECIPE = "deepseek-v2-lite-8gpu"  # 8 GPUs on one node, checkpoint.save set, no checkpoint.load


@pytest.mark.parametrize("argv, words", [
    ([GPU_RECIPE, "--nodes", "2"], "--nodes 2 x 8 GPUs per node = 16, but recipe 'deepseek-v2-lite-8gpu' is planned"
     " for parallel.world_size=8. Fix: use --nodes 1"),
    ([GPU_RECIPE, "--nodes", "1", "--gpus-per-node", "4"], "add the override hardware.gpus_per_node=4"),
    ([GPU_RECIPE, "--nodes", "1", "--partition", "gpu batch"], "is not a Slurm partition name"),
    ([GPU_RECIPE, "--nodes", "1", "--container-image"], "--container-image has no image. Fix: give the image"),
    ([GPU_RECIPE, "--nodes", "1", "--container-image", "-o", "OUT"], "--container-image has no image"),
    ([GPU_RECIPE, "--nodes", "1", "--time", "4:00"], "is not longer than the save warning"),
    ([GPU_RECIPE, "--nodes", "1", "--time", "four hours"], "is not a Slurm time limit. Fix: write it as"),
    ([GPU_RECIPE, "--nodes", "1", "checkpoint.load=/elsewhere"], "must save checkpoints where it loads them from"),
    ([GPU_RECIPE, "--nodes", "1", "parallel.ep=3"], "parallel.ep"),  # the recipe check, at the job's world size
])
def test_slurm_refuses_bad_cluster_input_with_its_fix_before_writing_a_script(argv, words, tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    argv = [str(out) if a == "OUT" else a for a in argv]
    code = main(["slurm", *argv, *([] if "-o" in argv else ["-o", str(out)])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and "Fix:" in err, err
    assert not out.exists()


def test_the_batch_script_asks_for_the_recipes_nodes_and_gpus_and_stops_megatron_before_the_limit(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    code = main(["slurm", GPU_RECIPE, "training.train_iters=5000", "--nodes", "1", "--partition", "batch",
                 "--account", "proj-1", "--time", "04:00:00", "--stop-minutes", "10",
                 "--container-image", "nvcr.io/nvidia/pytorch:25.04-py3", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    script = out.read_text()
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    for expected in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                     "--account=proj-1", "--time=04:00:00", "--requeue", "--signal=B:USR1@600"):
        assert expected in directives, directives
    assert "PER_NODE=8" in script and '--nproc-per-node="$PER_NODE"' in script
    assert "--rdzv-backend=c10d" in script and '--shutdown-timeout="$STOP_SECONDS"' in script
    assert "-- --exit-signal-handler" in script and "scontrol requeue" in script
    # The recipe saves to runs/deepseek-v2-lite without naming a load folder: every try resumes from it.
    assert "OVERRIDES=(training.train_iters=5000 checkpoint.load=runs/deepseek-v2-lite)" in script
    assert "--container-image=nvcr.io/nvidia/pytorch:25.04-py3" in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(out)]).returncode == 0


def test_the_job_names_an_allocation_other_than_its_scripts_before_training():
    assert allocation_problems({"SLURM_JOB_NUM_NODES": "2"}, 2, 8, cuda=True, visible_gpus=8) == []
    problems = allocation_problems({"SLURM_JOB_NUM_NODES": "1"}, 2, 8, cuda=True, visible_gpus=4)
    assert len(problems) == 2
    assert problems[0].startswith("the job has 1 node(s) but its script is written for 2") and "Fix:" in problems[0]
    assert problems[1].startswith("this node sees 4 GPU(s) but the job runs 8 processes per node")
    assert allocation_problems({"SLURM_JOB_NUM_NODES": "2"}, 2, 1, cuda=False, visible_gpus=None) == []


def test_the_k8s_manifest_runs_one_torchrun_per_pod_and_restarts_every_pod_from_the_checkpoint_volume(tmp_path, capsys):
    import yaml

    out = tmp_path / "job.yaml"
    code = main(["k8s", GPU_RECIPE, "training.train_iters=5000", "checkpoint.save=/ckpt/lite", "checkpoint.load=/ckpt/lite",
                 "--nodes", "1", "--container-image", "registry.example.com/dsv3:0.1", "--volume", "ckpt:/ckpt",
                 "--queue", "gpus", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = yaml.safe_load(out.read_text())
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "gpus"}
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] > 0  # any pod's failure restarts every pod
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (1, 1, "Indexed")
    pod = job["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "checkpoints", "mountPath": "/ckpt"} in container["volumeMounts"]
    script = container["command"][2]
    assert "--nproc-per-node=8" in script and '--node-rank="$JOB_COMPLETION_INDEX"' in script
    assert "--master-addr=deepseek-v2-lite-8gpu-node-0-0.deepseek-v2-lite-8gpu" in script
    assert "-- --exit-signal-handler" in script and "-m megatron_dsv3.cluster.preflight" in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


@pytest.mark.parametrize("argv, words", [
    (["--nodes", "1", "--volume", "ckpt:/ckpt"], "a Kubernetes job needs --container-image"),
    (["--nodes", "1", "--container-image", "img:1"], "a Kubernetes job needs --volume"),
    (["--nodes", "1", "--container-image", "img:1", "--volume", "ckpt:/other"], "is not on the volume mounted at /other"),
])
def test_k8s_refuses_a_job_that_could_not_resume_with_its_fix(argv, words, capsys):
    code = main(["k8s", GPU_RECIPE, "checkpoint.save=/ckpt/lite", "checkpoint.load=/ckpt/lite", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Fix:" in err, err
