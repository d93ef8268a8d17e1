"""What DualPipe(V)'s options combine with, checked before any model is built; each error says the fix.

Used twice, with the same rules: by ``megatron-dsv3 check`` on a recipe and, when the job starts, on
Megatron's parsed arguments (:mod:`megatron_dsv3.args.settings`).  The micro-batch rules are the
engine's (:func:`megatron_dsv3.pipeline.engine.check_microbatches`).
"""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.placement import ScheduleOptions


def resolve_options(schedule: str, *, ep: int, backend: str, zero_bubble: bool | None,
                    fb_overlap: bool | None, recompute_granularity: str | None,
                    recompute_modules: list[str] | None, mtp_num_layers: int,
                    overlap_grad_reduce: bool = False) -> ScheduleOptions:
    """The options a DeepSeek schedule runs with; None means the default.

    * ``zero_bubble`` (default: on with the local backend): the local backend's linears queue their
      weight GEMMs (``megatron_dsv3/model/wgrad.py``); Transformer Engine's delay their own through
      ``delay_wgrad_compute``, which is not wired here, so the default there is off and an explicit
      request is refused rather than ignored.
    * ``fb_overlap`` (default: on with expert parallelism): the pairs run through Megatron-Core's
      overlapped step, which needs a real all-to-all (with EP = 1 Megatron's dispatcher hands the
      MLP its own input, which the step then frees), no full or ``moe`` recompute (the plan calls
      the layer's pieces directly, so it would silently not recompute), and at most one MTP layer
      (Megatron's MTP plan node).
    * ``overlap_grad_reduce`` (Megatron's ``--overlap-grad-reduce``) with the zero-bubble split is
      refused: a deferring backward leaves a queued weight's gradient undefined, yet its
      AccumulateGrad node still runs and fires Megatron DDP's grad-ready hook, which asserts
      ``param.grad`` is set when ``overlap_grad_reduce`` is on (measured: DualPipeV on pp 2 x dp 2
      stops with that assertion at its first deferring backward).  Without the split the overlapped
      reduction matches the single-process gradients (``tests/test_dualpipe_equivalence.py``).
    """
    if zero_bubble is None:
        zero_bubble = backend == "local"
    elif zero_bubble and backend != "local":
        raise ConfigError(
            f"{schedule}'s zero-bubble split with the {backend} backend is not available in this version"
            " (Transformer Engine's delay_wgrad_compute is not wired into the schedule)",
            fix="use --no-dualpipe-zero-bubble (parallel.zero_bubble: false) or the local backend",
            key="parallel.zero_bubble",
        )
    if zero_bubble and overlap_grad_reduce:
        raise ConfigError(
            f"--overlap-grad-reduce with {schedule}'s zero-bubble split cannot run: Megatron DDP's grad-ready"
            " hook fires for a weight whose gradient the split defers to its W and asserts the gradient is"
            " already there (the split is on by default with the local backend)",
            fix="add --no-dualpipe-zero-bubble (parallel.zero_bubble: false) to keep the overlapped gradient"
            " reduction, or drop --overlap-grad-reduce to keep the B/W split",
            key="--overlap-grad-reduce",
        )
    if fb_overlap is None:
        fb_overlap = ep > 1
    elif fb_overlap:
        problems = []
        if ep <= 1:
            problems.append("expert parallelism (ep > 1): with ep = 1 there is no all-to-all to hide, and"
                            " Megatron's dispatcher then hands the MLP its own input, which the step frees")
        if recompute_granularity == "full" or "moe" in (recompute_modules or []):
            problems.append("no full or `moe` recompute: the overlapped step calls a layer's pieces directly"
                            " and would not recompute them")
        if mtp_num_layers > 1:
            problems.append(f"at most one MTP layer (got {mtp_num_layers}): Megatron's overlapped step has one"
                            " MTP node")
        if problems:
            raise ConfigError(
                f"{schedule}'s forward/backward overlap needs " + "; ".join(problems),
                fix="turn the overlap off (--no-dualpipe-fb-overlap, parallel.fb_overlap: false) or meet the"
                " requirement",
                key="parallel.fb_overlap",
            )
    return ScheduleOptions(zero_bubble=bool(zero_bubble), fb_overlap=bool(fb_overlap))
