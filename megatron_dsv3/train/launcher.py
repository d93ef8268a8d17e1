"""``megatron-dsv3 train``: run a recipe on Megatron's own training loop, here, in N processes.

The recipe becomes the same argument list ``megatron-dsv3 args`` prints for ``pretrain_gpt.py``;
the worker processes (``python -m megatron_dsv3.train.worker``) run Megatron's ``pretrain`` with
it.  One process runs directly; more run under ``torch.distributed.run`` (torchrun), joined by
gloo on CPU.  When the command itself runs under torchrun, it becomes the worker.

The console shows the progress lines (``[megatron-dsv3] step ...``) and errors; Megatron's full
output goes to ``<run folder>/train.log`` and the per-step figures to ``metrics.jsonl`` beside it.
A second run of the same command resumes from the recipe's checkpoint folder.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_dsv3.args.compose import recipe_argv
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import SCHEDULE_NAMES
from megatron_dsv3.parallel.placement import default_schedule
from megatron_dsv3.recipe import load_recipe
from megatron_dsv3.recipe.sizes import parallel_layout
from megatron_dsv3.train.checkpoints import FolderLock, resume_step, step_folder
from megatron_dsv3.train.processes import die_with_parent, follow_parent, free_port

DEFAULT_RECIPE = "dsv3-tiny-cpu"
_ALWAYS_SHOWN = ("Traceback", "Error", "error:", "validation loss at", "test loss at")


@dataclass
class TrainPlan:
    recipe: object
    argv: list[str]
    nproc: int
    run_dir: Path
    train_iters: int | None
    resume_from: int | None


def plan(recipe_name: str | None, overrides: list[str], nproc: int | None, extra_args: list[str]) -> TrainPlan:
    """Load and check the recipe; decide the processes, the run folder and whether this resumes.

    ``nproc`` defaults to the recipe's ``parallel.world_size``.
    """
    import torch

    from megatron_dsv3.recipe.check import refuse_scheduler_flags  # lazy: as the two above (torch, at run time)

    overrides = list(overrides)
    if recipe_name is None and torch.cuda.is_available():
        # The default recipe is written for CPU; with a GPU the same model trains on it in bf16.
        overrides = ["hardware.device=cuda", "precision=bf16", "backend=auto"] + overrides
    recipe = load_recipe(recipe_name or DEFAULT_RECIPE, overrides)
    if recipe.is_cpu and torch.cuda.is_available():
        print("[megatron-dsv3] note: the recipe asks for CPU; the workers will not see the GPU")
    if not recipe.is_cpu and not torch.cuda.is_available():
        raise ConfigError(
            f"recipe '{recipe.name}' runs on GPUs (hardware.device: cuda) but this machine has none",
            fix="run it on a GPU machine, or add the override hardware.device=cpu (small models only)",
            key="hardware.device",
        )
    nproc = recipe.parallel.world_size if nproc is None else nproc
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be at least 1", fix="give the number of processes to start",
                          key="nproc", where="command line")
    refuse_scheduler_flags(extra_args, where="command line (after --)")
    argv = recipe_argv(recipe, nproc) + list(extra_args)
    checkpoints = recipe.checkpoint.save or recipe.checkpoint.load
    run_dir = Path(checkpoints) if checkpoints else Path("runs") / recipe.name
    return TrainPlan(
        recipe=recipe,
        argv=argv,
        nproc=nproc,
        run_dir=run_dir,
        train_iters=_last_value(argv, "--train-iters"),
        resume_from=resume_step(recipe.checkpoint.load),
    )


def _parallelism(p: TrainPlan) -> str:
    """`` (PP 2, DualPipeV, EP 2)``: the sizes above 1 and the pipeline schedule, if any."""
    lay = parallel_layout(p.recipe, p.nproc)
    parts = [f"{name} {size}" for name, size in (("TP", lay.tp), ("PP", lay.pp), ("EP", lay.ep), ("CP", lay.cp))
             if size > 1]
    if lay.pp > 1:
        schedule = lay.schedule or default_schedule(lay.pp, lay.vpp, lay.layout)
        parts.insert(parts.index(f"PP {lay.pp}") + 1,
                     SCHEDULE_NAMES[schedule])
    return f" ({', '.join(parts)})" if parts else ""


def _last_value(argv: list[str], flag: str) -> int | None:
    """The value of ``flag`` as Megatron will read it (the last occurrence wins)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return int(values[-1]) if values else None


def run(train_plan: TrainPlan, *, verbose: bool = False) -> int:
    """Launch the workers, stream their output, summarise the run; return the exit code.

    The run folder is locked for the run (a second trainer on it is refused), and the workers die
    with this process (a parent-death signal), however it ends.  A resumed run says first how its
    LR schedule and layout differ from the checkpoint's, or is refused (:mod:`.resume`).
    """
    p = train_plan
    if (p.resume_from is not None and p.train_iters is not None and p.resume_from >= p.train_iters
            and "--finetune" not in p.argv):
        done = "=" if p.resume_from == p.train_iters else ">"
        print(f"[megatron-dsv3] {p.run_dir} already holds the checkpoint of step {p.resume_from}"
              f" {done} training.train_iters={p.train_iters}; nothing to do. To train further, run again"
              f" with training.train_iters=N (N > {p.resume_from}); to start over, use another"
              f" checkpoint folder or delete {p.run_dir}.")
        return 0
    resume = _resume_plan(p)
    with FolderLock(p.run_dir):
        return _run_locked(p, verbose, resume)


def _resume_plan(p: TrainPlan):
    """What resuming does (None: nothing to resume, or a format not read ahead); refusals raise."""
    if p.resume_from is None:
        return None
    from megatron_dsv3.train.resume import plan_resume  # lazy: imports megatron.training (seconds), for resumes only

    return plan_resume(p.recipe, p.argv, p.nproc, p.resume_from)


def _run_locked(p: TrainPlan, verbose: bool, resume) -> int:
    log_path, metrics_path = p.run_dir / "train.log", p.run_dir / "metrics.jsonl"
    env = dict(os.environ)
    for name, value in worker_environment(p.recipe, str(metrics_path.resolve())).items():
        env[name] = env.get(name, value) if name == "TORCHDYNAMO_DISABLE" else value
    if p.nproc == 1:  # what torchrun would set for one process
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = _command(p)
    if p.resume_from is None:
        what = "from scratch"
    elif "--finetune" in p.argv or p.resume_from == 0:
        what = f"from the weights in {p.recipe.checkpoint.load}"
    else:
        what = f"resuming from step {p.resume_from}"
    print(f"[megatron-dsv3] training {p.recipe.name} ({p.recipe.preset.name}) on "
          f"{'CPU' if p.recipe.is_cpu else 'GPU'} with {p.nproc} process(es){_parallelism(p)}, {what}; "
          f"full log: {log_path}", flush=True)
    for line in (resume.schedule_line(), resume.layout_line()) if resume is not None else ():
        if line:
            print(f"[megatron-dsv3] {line}", flush=True)
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.ctime()} {shlex.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1, preexec_fn=die_with_parent())
        for line in proc.stdout:
            log.write(line)
            if not verbose and "[megatron-dsv3]" in line:
                line = line[line.index("[megatron-dsv3]"):]  # after Megatron text left without a newline
            if verbose or line.startswith("[megatron-dsv3]") or any(s in line for s in _ALWAYS_SHOWN):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        print(f"[megatron-dsv3] training failed (exit code {code}); from {log_path}:", file=sys.stderr)
        print(_first_traceback(log_path.read_text()), file=sys.stderr)
        return code
    _summary(p, metrics_path, since=started)
    return 0


def worker_environment(recipe, metrics_path: str) -> dict[str, str]:
    """What the workers' environment adds (here, and in a cluster job's script): the metrics file,
    no TorchDynamo (``TORCHDYNAMO_DISABLE``, which a user's own setting overrides), and no GPU for
    a CPU recipe, so CPU mode stays on where a GPU is visible."""
    env = {"MEGATRON_DSV3_METRICS": metrics_path, "TORCHDYNAMO_DISABLE": "1"}
    if recipe.is_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _first_traceback(log: str, context: int = 40) -> str:
    """The first worker traceback of the last run in ``log`` (torchrun's own report comes after it)."""
    lines = log[log.rfind("\n=== ") + 1 :].splitlines()
    start = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None)
    if start is None:
        return "\n".join(lines[-context:])
    return "\n".join(lines[start : start + context])


def _command(p: TrainPlan) -> list[str]:
    worker = ["-m", "megatron_dsv3.train.worker", *p.argv]
    if p.nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={p.nproc}", *worker]


def _summary(p: TrainPlan, metrics_path: Path, since: float) -> None:
    records = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("time", 0) >= since:
                records.append(record)
    if records:
        first, tail = records[0], records[-10:]
        mean = sum(r["lm_loss"] for r in tail) / len(tail)
        print(f"[megatron-dsv3] done: steps {first['iteration']}-{tail[-1]['iteration']} in"
              f" {time.time() - since:.0f} s; loss {first['lm_loss']:.3f} at step {first['iteration']},"
              f" {mean:.3f} averaged over the last {len(tail)} steps")
    saved = _saved_step(p.recipe.checkpoint.save)
    if saved is not None:
        print(f"[megatron-dsv3] checkpoint of step {saved} in {p.recipe.checkpoint.save}; run the same"
              " command with training.train_iters=N to continue from it")


def run_under_torchrun(train_plan: TrainPlan) -> None:
    """This process was started by torchrun: be one of the workers (refused here, before loading,
    where :func:`run` would refuse; rank 0 prints how the schedule and layout change)."""
    # lazy: the worker imports Megatron's training code; the launcher that only starts workers must not.
    from megatron_dsv3.train import worker

    follow_parent()  # a worker never outlives its torchrun
    resume = _resume_plan(train_plan)
    if resume is not None and os.environ.get("RANK") == "0":
        for line in (resume.schedule_line(), resume.layout_line()):
            if line:
                print(f"[megatron-dsv3] {line}", flush=True)
    worker.run(train_plan.argv)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def _saved_step(save_dir: str | None) -> int | None:
    """The step the run just saved (the tracker it wrote), if its folder is there."""
    try:
        step = resume_step(save_dir)
    except ConfigError:
        return None
    return step if step is not None and step_folder(Path(save_dir), step).is_dir() else None
