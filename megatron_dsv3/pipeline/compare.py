"""``megatron-dsv3 schedule``: schedules side by side on the simulator, as a table, per-rank orders,
JSON or a picture."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES, SCHEDULE_NAMES
from megatron_dsv3.parallel.schedule_rules import check_microbatches
from megatron_dsv3.pipeline.simulator import SIMULATED, Costs, Timeline, simulate

NAMES = {**SCHEDULE_NAMES, "zb1p": "ZB1P (ZB-H1)", "combined_1f1b": "1F1B with EP overlap"}


@dataclass
class Result:
    schedule: str
    timeline: Timeline | None
    skipped: str | None = None  # why the schedule cannot run these sizes


def parse_schedules(text: str) -> list[str]:
    names = list(SIMULATED) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIMULATED]
    if unknown or not names:
        raise ConfigError(f"unknown schedule {unknown[0]!r}" if unknown else "no schedule given",
                          fix=f"use 'all' or a comma-separated list of: {', '.join(SIMULATED)}",
                          key="--schedule", value=text, choices=list(SIMULATED))
    return names


def compare(schedules: list[str], pp: int, num_microbatches: int, costs_for, *, vpp: int = 2,
            zero_bubble: bool = True) -> list[Result]:
    """``costs_for(schedule)`` gives each schedule's costs; a schedule that cannot run the sizes is
    kept with the reason (so a comparison over ``all`` still shows the others)."""
    results = []
    for name in schedules:
        try:
            if name in DEEPSEEK_SCHEDULES:
                check_microbatches(name, pp, num_microbatches)
            elif pp < 2 and name != "1f1b":
                raise ConfigError(f"{name} needs pp >= 2", fix="raise --pp")
            results.append(Result(name, simulate(name, pp, num_microbatches, costs_for(name), vpp=vpp,
                                                 zero_bubble=zero_bubble)))
        except ConfigError as err:
            if len(schedules) == 1:
                raise
            results.append(Result(name, None, skipped=err.problem))
    return results


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def render_table(results: list[Result], unit: str = "") -> str:
    base = next((r.timeline.step_time for r in results if r.timeline and r.schedule == "1f1b"), None)
    head = ["schedule", f"step{unit}", f"bubble{unit}", "bubble %", "vs 1F1B", "activations", "params"]
    rows = [[NAMES[r.schedule], _number(r.timeline.step_time), _number(r.timeline.bubble),
             f"{100 * r.timeline.bubble / r.timeline.step_time:.1f}",
             f"{base / r.timeline.step_time:.3f}x" if base else "-",
             f"{r.timeline.peak_activations} ({r.timeline.peak_activation_shares:g} shares)",
             f"{r.timeline.param_multiplier}x"] for r in results if r.timeline]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    widths[0] = max(len(NAMES[r.schedule]) for r in results + [Result("interleaved", None)])
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    full = iter(rows)
    for r in results:
        if r.timeline is None:
            lines.append(f"{NAMES[r.schedule].ljust(widths[0])}  skipped: {r.skipped}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(next(full), widths)).rstrip())
    lines.append("bubble: the most idle rank's idle time; activations: the most chunk forwards a rank holds"
                 " (shares: in units of a rank's 1F1B share); params: per rank, against 1F1B on as many ranks")
    return "\n".join(lines)


def render_orders(results: list[Result]) -> str:
    out = []
    for r in results:
        if r.timeline is None:
            continue
        out.append(f"{NAMES[r.schedule]}:")
        out += [f"  rank {i}: {' '.join(iv.op for iv in row)}" for i, row in enumerate(r.timeline.ranks)]
    return "\n".join(out)


_COLOURS = {"F": "#4c72b0", "B": "#55a868", "Bz": "#8fd19e", "W": "#c4ad66", "FB": "#8172b2"}


def plot(results: list[Result], path: str, title: str = "") -> None:
    """A Gantt chart per schedule, one row per rank, on one time axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ConfigError("--plot needs matplotlib, which is not installed",
                          fix="pip install 'megatron-dsv3[plot]' (or pip install matplotlib)") from err
    shown = [r for r in results if r.timeline is not None]
    end = max(r.timeline.step_time for r in shown)
    fig, axes = plt.subplots(len(shown), 1, figsize=(14, 1.0 + 0.45 * sum(r.timeline.pp for r in shown)),
                             squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], shown):
        t = r.timeline
        for rank, row in enumerate(t.ranks):
            for iv in row:
                ax.barh(rank, iv.end - iv.start, left=iv.start, color=_COLOURS[iv.kind], edgecolor="white",
                        linewidth=0.4)
                if iv.end - iv.start > end / 60:
                    ax.text((iv.start + iv.end) / 2, rank, iv.op.split(".")[-1].split("+")[0], ha="center",
                            va="center", fontsize=5, color="white")
        ax.set_yticks(range(t.pp), [f"rank {i}" for i in range(t.pp)], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{NAMES[r.schedule]}: step {t.step_time:.4g}, bubble {t.bubble:.4g}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in _COLOURS.items()], loc="upper right", ncol=5,
               fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def to_json(results: list[Result], extra: dict | None = None) -> dict:
    return {**(extra or {}), "schedules": [
        {"schedule": r.schedule, "skipped": r.skipped} if r.timeline is None else r.timeline.to_dict()
        for r in results]}


__all__ = ["Costs", "Result", "compare", "parse_schedules", "plot", "render_orders", "render_table", "to_json"]
