"""What DualPipe(V)'s options combine with, checked before any model is built; each error says the fix.

Used twice, with the same rules: by ``megatron-dsv3 check`` on a recipe and, when the job starts, on
Megatron's parsed arguments (:mod:`megatron_dsv3.args.settings`).  What a schedule requires of the
pipeline sizes and micro-batches is :mod:`megatron_dsv3.parallel.schedule_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.megatron_layout import ScheduleOptions

_NAMES = {"zero_bubble": "zero bubble", "fb_overlap": "F&B overlap"}
_FLAGS = {"zero_bubble": "--dualpipe-zero-bubble", "fb_overlap": "--dualpipe-fb-overlap"}


@dataclass(frozen=True)
class ResolvedOptions:
    """The options a schedule runs with, and for each why it is on or off (``megatron-dsv3 check``)."""

    options: ScheduleOptions
    why: dict

    def describe(self) -> list[str]:
        return [f"{_NAMES[name]} {self.why[name]}" for name in _NAMES]


def resolve_options(schedule: str, **settings) -> ScheduleOptions:
    """:func:`decide_options`'s options alone."""
    return decide_options(schedule, **settings).options


def decide_options(schedule: str, *, ep: int, backend: str, zero_bubble: bool | None,
                   fb_overlap: bool | None, recompute_granularity: str | None,
                   recompute_modules: list[str] | None, mtp_num_layers: int,
                   overlap_grad_reduce: bool = False) -> ResolvedOptions:
    """The options a DeepSeek schedule runs with (None: the default), and why each is on or off.

    One rule for both options, default or explicit alike: each is on by default, and each has
    requirements (below).  An explicit ``true`` whose requirement fails is an error naming the fix;
    a default whose requirement fails resolves to off, naming the requirement.  The default never
    refuses a run the user did not ask anything of, and never silently drops what the user did ask
    for (a ``moe`` recompute, ``--overlap-grad-reduce``): the explicit setting wins over the default.

    * ``zero_bubble`` needs the local backend, whose linears queue their weight GEMMs
      (``megatron_dsv3/model/wgrad.py``); Transformer Engine's delay their own through
      ``delay_wgrad_compute``, which is not wired here.  It also needs Megatron's
      ``--overlap-grad-reduce`` off: a deferring backward leaves a queued weight's gradient
      undefined, yet its AccumulateGrad node still runs and fires Megatron DDP's grad-ready hook,
      which asserts ``param.grad`` is set when ``overlap_grad_reduce`` is on (measured: DualPipeV on
      pp 2 x dp 2 stops with that assertion at its first deferring backward).  Without the split the
      overlapped reduction matches the single-process gradients (``tests/test_dualpipe_equivalence.py``).
    * ``fb_overlap``: the pairs run through Megatron-Core's overlapped step, which needs a real
      all-to-all (with EP = 1 Megatron's dispatcher hands the MLP its own input, which the step then
      frees), no full or ``moe`` recompute (the plan calls the layer's pieces directly, so it would
      silently not recompute; Megatron's own ``overlap_moe_expert_parallel_comm`` refuses them too),
      and at most one MTP layer (Megatron's MTP plan node).
    """
    fb_fix = "turn the overlap off (--no-dualpipe-fb-overlap, parallel.fb_overlap: false) or meet the requirement"
    zb_unmet, fb_unmet = [], []
    if backend != "local":
        zb_unmet.append(_Unmet(
            "the local backend", f"the backend is {backend}, whose Transformer Engine linears defer their weight"
            " GEMMs through delay_wgrad_compute, which is not wired into the schedule", "parallel.zero_bubble",
            "use --no-dualpipe-zero-bubble (parallel.zero_bubble: false) or the local backend"))
    if overlap_grad_reduce:
        zb_unmet.append(_Unmet(
            "no --overlap-grad-reduce", "Megatron DDP's grad-ready hook fires for a weight whose gradient the"
            " split defers to its W and asserts the gradient is already there", "--overlap-grad-reduce",
            "add --no-dualpipe-zero-bubble (parallel.zero_bubble: false) to keep the overlapped gradient"
            " reduction, or drop --overlap-grad-reduce to keep the B/W split"))
    if ep <= 1:
        fb_unmet.append(_Unmet(
            "expert parallelism (ep > 1)", "with ep = 1 there is no all-to-all to hide, and Megatron's dispatcher"
            " then hands the MLP its own input, which the step frees", "parallel.fb_overlap", fb_fix))
    if recompute_granularity == "full" or "moe" in (recompute_modules or []):
        what = "full" if recompute_granularity == "full" else "`moe`"
        fb_unmet.append(_Unmet(
            f"no full or `moe` recompute (here {what})", "the overlapped step calls a layer's pieces directly and"
            " would not recompute them", "parallel.fb_overlap", fb_fix))
    if mtp_num_layers > 1:
        fb_unmet.append(_Unmet(f"at most one MTP layer (got {mtp_num_layers})",
                               "Megatron's overlapped step has one MTP node", "parallel.fb_overlap", fb_fix))
    on_zb, why_zb = _decide(schedule, "zero_bubble", zero_bubble, zb_unmet, "zero-bubble split")
    on_fb, why_fb = _decide(schedule, "fb_overlap", fb_overlap, fb_unmet, "forward/backward overlap")
    return ResolvedOptions(ScheduleOptions(zero_bubble=on_zb, fb_overlap=on_fb),
                           {"zero_bubble": why_zb, "fb_overlap": why_fb})


@dataclass(frozen=True)
class _Unmet:
    """A requirement an option has that the settings do not meet."""

    needs: str
    because: str
    key: str
    fix: str


def _decide(schedule: str, name: str, requested: bool | None, unmet: list[_Unmet], what: str) -> tuple[bool, str]:
    """``(on, why)`` for one option, by the rule of :func:`decide_options`."""
    if requested is None:
        if unmet:
            return False, "off (default: needs " + "; and ".join(u.needs for u in unmet) + ")"
        return True, "on (default)"
    if requested and unmet:
        raise ConfigError(f"{schedule}'s {what} needs " + "; and ".join(f"{u.needs}: {u.because}" for u in unmet),
                          fix=unmet[0].fix, key=unmet[0].key)
    flag = _FLAGS[name] if requested else "--no-" + _FLAGS[name][2:]
    return bool(requested), f"{'on' if requested else 'off'} (set: parallel.{name}: {str(requested).lower()}, {flag})"
