"""What a pipeline schedule requires of the pipeline sizes and the micro-batches, written once.

Three places ask: a recipe's layout check (:func:`megatron_dsv3.model.validation.validate_layout`,
keys named as recipe keys), the job's argument check (:mod:`megatron_dsv3.args.settings`, named as
Megatron's flags), and the DualPipe engine before it builds a rank's program
(:mod:`megatron_dsv3.pipeline.engine`).  DualPipe's and DualPipeV's requirements are those of DeepSeek's
reference (``deepseek-ai/DualPipe``: DualPipe needs an even rank count and an even number of at least
``2 * ranks`` micro-batches, DualPipeV at least ``2 * ranks``); Megatron's are those its
``get_forward_backward_func`` and ``validate_args`` enforce.  Which options belong to which schedule is
in :mod:`megatron_dsv3.pipeline.constraints`.
"""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES

# How each caller names the settings in its errors.
RECIPE_NAMES = {"schedule": "parallel.schedule", "pp": "parallel.pp", "vpp": "parallel.vpp",
                "layout": "parallel.layout", "zero_bubble": "parallel.zero_bubble",
                "fb_overlap": "parallel.fb_overlap", "microbatches": "training.global_batch_size"}
FLAG_NAMES = {"schedule": "--pipeline-schedule", "pp": "--pipeline-model-parallel-size",
              "vpp": "--num-virtual-stages-per-pipeline-rank", "layout": "--pipeline-model-parallel-layout",
              "zero_bubble": "--dualpipe-zero-bubble", "fb_overlap": "--dualpipe-fb-overlap",
              "microbatches": "--global-batch-size"}


def check_schedule(schedule: str, *, pp: int, vpp: int | None, has_layout: bool, options_given=(),
                   names: dict = RECIPE_NAMES) -> None:
    """``schedule`` on ``pp`` ranks with ``vpp`` virtual stages per rank (None: not set), a layout
    string or not, and the DualPipe options that were set (by their ``names`` keys)."""
    n = names

    def require(ok: bool, problem: str, fix: str, key: str) -> None:
        if not ok:
            raise ConfigError(problem, fix=fix, key=n[key])

    for option in options_given:
        require(schedule in DEEPSEEK_SCHEDULES,
                f"{n[option]} is an option of the dualpipe and dualpipev schedules (schedule is {schedule})",
                f"remove {n[option]}, or set {n['schedule']} dualpipev", option)
    if vpp is not None:
        require(pp > 1, f"{n['vpp']}={vpp} needs {n['pp']} > 1 (got {pp})", "remove vpp or raise pp", "vpp")
    if schedule in DEEPSEEK_SCHEDULES:
        require(vpp is None, f"{n['vpp']}={vpp} with {n['schedule']}={schedule}: the schedule places two chunks"
                " per rank itself", f"remove {n['vpp']}", "vpp")
        require(pp >= 2, f"{n['schedule']}={schedule} needs {n['pp']} >= 2 (got {pp})",
                "raise pp, or use the 1f1b schedule", "schedule")
        require(schedule != "dualpipe" or pp % 2 == 0,
                f"{n['schedule']}=dualpipe needs an even {n['pp']} (got {pp}): micro-batches enter from both"
                " ends and meet in the middle", "use an even pp, or dualpipev (any pp >= 2)", "schedule")
    elif schedule == "interleaved":
        require(pp > 1 and ((vpp or 1) > 1 or has_layout),
                f"{n['schedule']}=interleaved needs {n['pp']} > 1 and virtual stages (got pp={pp}, vpp={vpp})",
                f"set {n['vpp']} (virtual stages per rank, >= 2) or a layout with more stages than ranks",
                "schedule")
    else:
        require((vpp or 1) == 1, f"{n['schedule']}=1f1b with {n['vpp']}={vpp} virtual stages per rank",
                "use the interleaved schedule, or remove vpp", "schedule")


def check_microbatches(schedule: str, pp: int, num_microbatches: int, names: dict = RECIPE_NAMES) -> None:
    """DualPipe(V)'s micro-batch requirements (DeepSeek's reference), as errors that say the fix."""
    if schedule == "dualpipe" and pp % 2:
        raise ConfigError(f"dualpipe needs an even number of pipeline ranks, got pp={pp}",
                          fix="use an even pp, or dualpipev (any pp >= 2)", key=names["pp"])
    if pp < 2:
        raise ConfigError(f"{schedule} needs at least 2 pipeline ranks, got pp={pp}", fix="raise pp",
                          key=names["pp"])
    if num_microbatches < 2 * pp or (schedule == "dualpipe" and num_microbatches % 2):
        even = schedule == "dualpipe"
        raise ConfigError(
            f"{schedule} on pp={pp} needs {'an even' if even else 'a'} number of at least 2 x pp = {2 * pp}"
            f" micro-batches per step, got {num_microbatches}",
            fix=f"raise the global batch to at least {2 * pp} micro-batches per data-parallel rank"
            + (" in an even number" if even else ""),
            key=names["microbatches"],
        )
