"""What a cluster job asks for, checked against the recipe before anything is written or submitted.

A bad input (nodes x processes per node other than the recipe's world size, a partition name with
a space, a flag without its value, a time limit shorter than the save warning) is a
:class:`~megatron_dsv3.errors.ConfigError` naming the flag and the fix, raised by
:func:`plan_cluster_job`; the recipe itself is checked as ``megatron-dsv3 check`` checks it, at
the job's world size.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.recipe import load_recipe, recipe_report
from megatron_dsv3.recipe.schema import Recipe

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


@dataclass(frozen=True)
class ClusterRequest:
    """The command line of ``megatron-dsv3 slurm`` (all but the recipe)."""

    nodes: int
    per_node: int | None = None  # GPUs per node (processes per node on CPU); None: the recipe's
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # Slurm's --time syntax
    container_image: str | None = None
    stop_minutes: float = 5.0  # the save-and-stop signal comes this long before the time limit


@dataclass(frozen=True)
class ClusterJob:
    """A checked job: the recipe (loaded with its overrides), where it comes from, and the allocation."""

    recipe: Recipe
    recipe_ref: str  # what the job loads: an absolute recipe path, or a shipped recipe's name
    overrides: tuple[str, ...]
    nodes: int
    per_node: int
    partition: str | None
    account: str | None
    time: str | None
    time_seconds: int | None
    container_image: str | None
    stop_seconds: int
    python: str  # the interpreter with megatron-dsv3 installed, on every node

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    @property
    def run_dir(self) -> str:
        return self.recipe.checkpoint.save


def plan_cluster_job(recipe_ref: str, overrides: list[str], request: ClusterRequest, *,
                     python: str | None = None) -> ClusterJob:
    """Check ``request`` and the recipe together; the job a batch script is written for."""
    _check_flags(request)
    time_seconds = parse_time(request.time) if request.time is not None else None
    recipe = load_recipe(recipe_ref, overrides)
    extended = _resume_from_save(recipe, list(overrides))
    if extended != list(overrides):
        overrides, recipe = extended, load_recipe(recipe_ref, extended)
    per_node = _per_node(recipe, request)
    world = request.nodes * per_node
    if world != recipe.parallel.world_size:
        unit = "processes" if recipe.is_cpu else "GPUs"
        fits = recipe.parallel.world_size // per_node if recipe.parallel.world_size % per_node == 0 else None
        raise _flag_error(
            "--nodes", f"--nodes {request.nodes} x {per_node} {unit} per node = {world}, but recipe"
            f" '{recipe.name}' is planned for parallel.world_size={recipe.parallel.world_size}",
            (f"use --nodes {fits}" if fits else f"choose nodes x {unit} per node ="
             f" {recipe.parallel.world_size}") + f", or add the override parallel.world_size={world}"
            " (the layout is checked again at that size)")
    _check_resumable(recipe)
    report = recipe_report(recipe, world)
    if report.error is not None:
        raise report.error
    if not report.ok:
        raise ConfigError(
            f"recipe '{recipe.name}' does not fit in {report.gpu_memory_gb:g} GiB per GPU at world size {world}"
            f" (estimate {report.memory.total:.1f} GiB)",
            fix="see `megatron-dsv3 check` for the breakdown; lower training.micro_batch_size, recompute more,"
            " or use more nodes", key="hardware.gpu_memory_gb", where=recipe.source)
    stop_seconds = int(round(request.stop_minutes * 60))
    if time_seconds is not None and stop_seconds >= time_seconds:
        raise _flag_error("--time", f"--time {request.time} is not longer than the save warning"
                          f" ({request.stop_minutes:g} min before the end, --stop-minutes)",
                          "give a longer --time, or a smaller --stop-minutes (the time a checkpoint"
                          " save needs, with a margin)")
    path = Path(recipe_ref)
    return ClusterJob(
        recipe=recipe, recipe_ref=str(path.resolve()) if path.is_file() else recipe_ref,
        overrides=tuple(overrides), nodes=request.nodes, per_node=per_node, partition=request.partition,
        account=request.account, time=request.time, time_seconds=time_seconds,
        container_image=request.container_image, stop_seconds=stop_seconds,
        python="python3" if request.container_image else (python or sys.executable),
    )


def parse_time(text: str) -> int:
    """Seconds in Slurm's ``--time`` syntax (minutes; MM:SS; HH:MM:SS; D-HH[:MM[:SS]])."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match or not text.strip():
        raise _flag_error("--time", f"--time {text!r} is not a Slurm time limit",
                          f"write it as {_TIME_FORMS}, e.g. --time 04:00:00")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = int(a), int(b), int(c)
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, int(a), int(b or 0)
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise _flag_error("--time", f"--time {text!r} is zero", "give the job's time limit, e.g. --time 04:00:00")
    return total


def _check_flags(request: ClusterRequest) -> None:
    if request.nodes < 1:
        raise _flag_error("--nodes", f"--nodes {request.nodes} must be at least 1", "give the number of nodes")
    if request.per_node is not None and request.per_node < 1:
        raise _flag_error("--gpus-per-node", f"--gpus-per-node {request.per_node} must be at least 1",
                          "give the GPUs (CPU: processes) per node")
    if request.partition is not None and not all(_NAME.fullmatch(p) for p in request.partition.split(",")):
        raise _flag_error("--partition", f"--partition {request.partition!r} is not a Slurm partition name"
                          " (letters, digits, '_', '.', '-'; several separated by commas, no spaces)",
                          "give the name as `sinfo -s` lists it, e.g. --partition batch")
    if request.account is not None and not _NAME.fullmatch(request.account):
        raise _flag_error("--account", f"--account {request.account!r} is not a Slurm account name"
                          " (letters, digits, '_', '.', '-', no spaces)",
                          "give the account as `sacctmgr show assoc user=$USER` lists it")
    image = request.container_image
    if image is not None and (not image.strip() or any(c.isspace() for c in image) or image.startswith("-")):
        raise _flag_error("--container-image", "--container-image has no image" if not image.strip()
                          else f"--container-image {image!r} is not an image name",
                          "give the image after the flag, e.g. --container-image nvcr.io/nvidia/pytorch:25.04-py3"
                          " (enroot/pyxis syntax), or leave the flag out to run without a container")
    if request.stop_minutes <= 0:
        raise _flag_error("--stop-minutes", f"--stop-minutes {request.stop_minutes:g} must be positive",
                          "give the minutes a checkpoint save needs, with a margin (default 5)")


def _per_node(recipe: Recipe, request: ClusterRequest) -> int:
    """GPUs per node (the recipe's ``hardware.gpus_per_node`` unless given); on CPU, processes per node
    (the recipe's world size spread evenly over the nodes unless given)."""
    if recipe.is_cpu:
        if request.per_node is not None:
            return request.per_node
        if recipe.parallel.world_size % request.nodes:
            raise _flag_error("--nodes", f"--nodes {request.nodes} does not divide parallel.world_size="
                              f"{recipe.parallel.world_size} of CPU recipe '{recipe.name}'",
                              "give --gpus-per-node (processes per node on CPU) or another --nodes")
        return recipe.parallel.world_size // request.nodes
    planned = recipe.hardware.gpus_per_node
    if request.per_node is not None and request.per_node != planned:
        raise _flag_error("--gpus-per-node", f"--gpus-per-node {request.per_node} differs from the recipe's"
                          f" hardware.gpus_per_node={planned} (which the layout report plans for)",
                          f"add the override hardware.gpus_per_node={request.per_node}, or drop --gpus-per-node")
    return planned


def _resume_from_save(recipe: Recipe, overrides: list[str]) -> list[str]:
    """A recipe that saves but names no folder to load from resumes from where it saves: the job's
    overrides gain ``checkpoint.load=<save>`` (the script shows it)."""
    c = recipe.checkpoint
    if c.save and c.load is None:
        return overrides + [f"checkpoint.load={c.save}"]
    return overrides


def _check_resumable(recipe: Recipe) -> None:
    """A requeued job resumes only from the folder it saves to."""
    c = recipe.checkpoint
    if not c.save or c.load != c.save:
        raise ConfigError(
            "a cluster job must save checkpoints where it loads them from, so that a requeued or resubmitted"
            f" job resumes (checkpoint.save={c.save!r}, checkpoint.load={c.load!r})",
            fix="set checkpoint.save and checkpoint.load to the same folder on a file system every node sees,"
            " e.g. checkpoint.save=/shared/runs/NAME checkpoint.load=/shared/runs/NAME",
            key="checkpoint.save", where=recipe.where("checkpoint.save"))


def _flag_error(flag: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, fix=fix, key=flag, where="command line")
