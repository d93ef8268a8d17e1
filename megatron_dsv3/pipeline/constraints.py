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
                   recompute_modules: list[str] | None, mtp_num_layers: int) -> ResolvedOptions:
    """The options a DeepSeek schedule runs with (None: the default), and why each is on or off.

    One rule for both options, default or explicit alike: each is on by default, and each has
    requirements (below).  An explicit ``true`` whose requirement fails is an error naming the fix;
    a default whose requirement fails resolves to off, naming the requirement.  The default never
    refuses a run the user did not ask anything of, and never silently drops what the user did ask
    for (a ``moe`` recompute): the explicit setting wins over the default.

    * ``zero_bubble``: the local backend's linears queue their weight GEMMs
      (``megatron_dsv3/model/wgrad.py``); Transformer Engine's defer theirs themselves
      (``delay_wgrad_compute``) and a ``W`` runs them (``backward_dw``), which needs the F&B overlap
      off on that backend: Megatron's overlapped step runs TE's deferred GEMMs inside the pair
      (``TransformerLayerSchedulePlan`` calls ``backward_dw``), leaving none for the schedule's ``W``.
      An explicit split on TE turns the overlap's default off; both asked for is an error.  It
      combines with ``--overlap-grad-reduce``: DDP counts a deferred weight as ready at its ``W``
      (``runtime/ddp_changes.py``; on TE through TE's own wgrad hooks; ``tests/test_dualpipe_equivalence.py``).
    * ``fb_overlap``: the pairs run through Megatron-Core's overlapped step, which needs a real
      all-to-all (with EP = 1 Megatron's dispatcher hands the MLP its own input, which the step then
      frees), no full or ``moe`` recompute (the plan calls the layer's pieces directly, so it would
      silently not recompute; Megatron's own ``overlap_moe_expert_parallel_comm`` refuses them too),
      and at most one MTP layer (Megatron's MTP plan node).
    """
    fb_fix = "turn the overlap off (--no-dualpipe-fb-overlap, parallel.fb_overlap: false) or meet the requirement"
    zb_unmet, fb_unmet = [], []
    te = backend == "transformer_engine"
    if backend not in ("local", "transformer_engine"):
        zb_unmet.append(_Unmet(
            "the local or Transformer Engine backend", f"the backend is {backend}, whose linears cannot defer their"
            " weight GEMMs", "parallel.zero_bubble", "use --no-dualpipe-zero-bubble (parallel.zero_bubble: false)"))
    in_pair = ("Megatron's overlapped step runs Transformer Engine's deferred weight GEMMs inside the pair"
               " (TransformerLayerSchedulePlan calls backward_dw), leaving none for the schedule's W")
    if te and zero_bubble:
        fb_unmet.append(_Unmet("no zero-bubble split on Transformer Engine (parallel.zero_bubble: true)", in_pair,
                               "parallel.fb_overlap", fb_fix))
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
    on_fb, why_fb = _decide(schedule, "fb_overlap", fb_overlap, fb_unmet, "forward/backward overlap")
    if te and on_fb:
        zb_unmet.append(_Unmet("no F&B overlap on Transformer Engine", in_pair, "parallel.zero_bubble",
                               "turn the split off (--no-dualpipe-zero-bubble, parallel.zero_bubble: false) or the"
                               " overlap (parallel.fb_overlap: false)"))
    on_zb, why_zb = _decide(schedule, "zero_bubble", zero_bubble, zb_unmet, "zero-bubble split")
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
