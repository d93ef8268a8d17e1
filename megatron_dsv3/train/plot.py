"""``megatron-dsv3 plot RUN [RUN ...]``: one picture of one or several runs, from their ``metrics.jsonl``.

Top row: the language-model loss (solid) and the MTP loss (dashed) per step, every run on one chart
(e.g. FP8 against BF16); tokens/s; the learning rate.  Below, one heat map per run: the experts'
load spread per MoE layer over steps (MaxVio, ``max load / mean load - 1``, from the token counts
the expert-bias update uses; 0 is a perfect balance).  matplotlib is imported when drawing (the
``plot`` extra).  A step that appears twice (a resumed run that repeated it) counts once, the
later record.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.runtime.metrics_changes import layer_order

METRICS = "metrics.jsonl"


@dataclass
class Run:
    name: str
    records: list[dict]  # one per step, in step order

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key``, where it is present and not null."""
        pairs = [(r["iteration"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def mtp_keys(self) -> list[str]:
        return sorted({k for r in self.records for k in r if k.startswith("mtp_") and k.endswith("_loss")})

    def expert_load(self) -> tuple[list[int], list[str], list[list[float]]]:
        """(steps, layers, MaxVio[layer][step]); NaN where a step has no value for a layer."""
        rows = [r for r in self.records if r.get("expert_load_max_violation")]
        layers = sorted({k for r in rows for k in r["expert_load_max_violation"]}, key=layer_order)
        grid = [[r["expert_load_max_violation"].get(layer, float("nan")) for r in rows] for layer in layers]
        return [r["iteration"] for r in rows], layers, grid


def read_run(path: str | Path) -> Run:
    """A run folder (with ``metrics.jsonl``, as ``megatron-dsv3 train`` writes it) or the file itself."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path} has no {METRICS}", key="RUN", where="command line",
                          fix="give a run folder that `megatron-dsv3 train` wrote (its checkpoint.save folder,"
                          " or runs/<recipe>), or the path of a metrics.jsonl")
    by_step: dict[int, dict] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{file}:{number} is not a JSON line", key="RUN", where="command line",
                              fix="remove the damaged line (a run stopped mid-write leaves at most the last one)") from None
        by_step[record["iteration"]] = record
    if not by_step:
        raise ConfigError(f"{file} holds no step yet", key="RUN", where="command line",
                          fix="plot after the run has logged a step")
    name = (file.parent if file.name == METRICS else file).name
    return Run(name=name, records=[by_step[s] for s in sorted(by_step)])


def draw(runs: list[Run]):
    """The figure (matplotlib): three charts on top, a heat map per run below."""
    import matplotlib  # lazy: an optional extra (megatron-dsv3[plot])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 4.2 + 2.6 * len(runs)), layout="constrained")
    grid = fig.add_gridspec(1 + len(runs), 3, height_ratios=[1.6] + [1.0] * len(runs))
    loss, speed, lr = (fig.add_subplot(grid[0, i]) for i in range(3))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        marker = "o" if len(run.records) <= 30 else None
        loss.plot(*run.series("lm_loss"), color=colour, marker=marker, ms=3, lw=1.2, zorder=3,
                  label=f"{run.name}: LM loss")
        for key in run.mtp_keys():
            depth = key[len("mtp_"):-len("_loss")]
            loss.plot(*run.series(key), color=colour, ls="--", lw=0.9, alpha=0.55,
                      label=f"{run.name}: MTP loss (depth {depth})")
        speed.plot(*run.series("tokens_per_second"), color=colour, marker=marker, ms=3, label=run.name)
        lr.plot(*run.series("learning_rate"), color=colour, label=run.name)
    _label(loss, "Loss", "loss (nats per token)", legend=True)
    _label(speed, "Throughput", "tokens per second (global batch)", legend=len(runs) > 1)
    _label(lr, "Learning rate", "learning rate", legend=len(runs) > 1)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[1 + i, :])
        steps, layers, values = run.expert_load()
        if not steps:
            ax.text(0.5, 0.5, f"{run.name}: no expert load in its metrics (recorded for MoE layers with an"
                    " expert bias, by megatron-dsv3 train)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5))
        names = [f"MTP {layer[3:]}" if layer.startswith("mtp") else f"layer {layer}" for layer in layers]
        every = -(-len(names) // 16)  # at most 16 labels (DeepSeek-V3 has 58 MoE layers and an MTP module)
        ax.set_yticks(range(0, len(names), every), names[::every])
        _label(ax, f"{run.name}: expert load per MoE layer", "MoE layer")
        ax.grid(False)
        fig.colorbar(image, ax=ax, label="MaxVio (max / mean load - 1)", pad=0.01)
    return fig


def _label(ax, title: str, ylabel: str, *, legend: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator  # lazy: an optional extra

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlabel("step (optimizer iteration)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def plot(paths: list[str], out: str) -> Path:
    runs = [read_run(p) for p in paths]
    try:
        import matplotlib  # noqa: F401  # lazy: an optional extra, named in the error below
    except ImportError as err:
        raise ConfigError("`megatron-dsv3 plot` needs matplotlib, which is not installed",
                          fix="pip install 'megatron-dsv3[plot]' (or pip install matplotlib)") from err
    fig = draw(runs)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt  # lazy: an optional extra

    plt.close(fig)
    return Path(out)


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw loss, MTP loss, tokens/s, learning rate and expert load of runs",
                       description="Reads each run's metrics.jsonl (written by `megatron-dsv3 train`) and draws"
                       " the runs on one picture: loss and MTP loss, tokens/s, learning rate, and a heat map of"
                       " the expert load per MoE layer over steps per run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (its checkpoint.save) or a metrics.jsonl")
    p.add_argument("-o", "--output", default="run.png", metavar="FILE.png", help="the picture (default run.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(ns: argparse.Namespace) -> int:
    path = plot(ns.runs, ns.output)
    print(f"wrote {path}")
    return 0
