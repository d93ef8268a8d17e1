"""DeepSeek's placements (``dualpipe``, ``dualpipev``; arXiv 2412.19437v2 section 3.2.1 and DeepSeek's
``dualpipe/dualpipe.py``, ``dualpipev.py``): stages in model order from a layout string or an even split,
then placed in a V (DualPipeV: rank ``r`` holds stages ``r`` and ``2pp-1-r``) or twice, mirrored
(DualPipe: rank ``r`` holds stage ``r`` and a copy of stage ``pp-1-r``).  Each function returns what a
:class:`~megatron_dsv3.parallel.placement.Placement` is made of.
"""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.chunk import Chunk

Rows = tuple[tuple[Chunk, ...], ...]


def deepseek_stages(layout, pp, num_layers, mtp_num_layers, schedule) -> list[tuple[bool, int, int, bool]]:
    """``(embedding, decoders, mtp, loss)`` per stage, in model order."""
    count = 2 * pp if schedule == "dualpipev" else pp
    if layout is None:
        if num_layers % count:
            raise ConfigError(
                f"{schedule} on pp={pp} ranks has {count} stages, which do not divide model.num_layers={num_layers}",
                fix=f"give parallel.layout with {count} stages in model order (e.g. 'Et*3|t*4|...|t*2mL'), or"
                f" choose pp so that {'2 x ' if schedule == 'dualpipev' else ''}pp divides {num_layers}",
                key="parallel.layout",
            )
        per = num_layers // count
        return [(s == 0, per, mtp_num_layers if s == count - 1 else 0, s == count - 1) for s in range(count)]
    if not isinstance(layout, str):
        raise ConfigError(f"{schedule} takes its layout as a string of stages in model order",
                          fix="give parallel.layout as a string", key="parallel.layout")
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        parsed = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except (AssertionError, ValueError, KeyError) as err:
        raise _layout_error(layout, schedule, count, f"cannot be parsed ({err})") from None
    stages = []
    for kinds in parsed:
        names = [getattr(k, "name", k) for k in kinds]
        stages.append(("embedding" in names, names.count("decoder"), names.count("mtp"), "loss" in names))
    if len(stages) != count:
        raise _layout_error(layout, schedule, count, f"has {len(stages)} stages")
    flat = [name for kinds in parsed for name in (getattr(k, "name", k) for k in kinds)]
    checks = [
        (flat.count("embedding") == 1 and stages[0][0], "must start with the embedding E, once"),
        (flat.count("loss") == 1 and stages[-1][3], "must end with the loss L, once"),
        (flat.count("decoder") == num_layers, f"has {flat.count('decoder')} decoder layers t, the model {num_layers}"),
        (flat.count("mtp") == mtp_num_layers, f"has {flat.count('mtp')} MTP layers m, the model {mtp_num_layers}"),
        (all(s[2] == 0 for s in stages[:-1]), "must put the MTP layers m in the last stage, with the loss"),
        ("mtp" not in flat or flat.index("mtp") > max(i for i, n in enumerate(flat) if n == "decoder"),
         "must put the MTP layers after the last decoder layer"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _layout_error(layout, schedule, count, problem)
    return stages


def _layout_error(layout: str, schedule: str, count: int, problem: str) -> ConfigError:
    return ConfigError(
        f"parallel.layout={layout!r} {problem}; {schedule} needs {count} stages in model order",
        fix=f"write {count} stages separated by `|`, the first starting with E, the last ending with the MTP"
        " layers and L, e.g. 'Et*3|t*4|t*4|t*3mL' for 14 layers on 4 stages",
        key="parallel.layout",
    )


def deepseek_rows(stages, pp: int, schedule: str) -> Rows:
    starts, first = [], 0
    for _, n, _, _ in stages:
        starts.append(first)
        first += n

    def chunk(s: int, rank: int, vp: int, mirror: bool = False) -> Chunk:
        embedding, n, mtp, loss = stages[s]
        return Chunk(rank, vp, s, tuple(range(starts[s], starts[s] + n)), embedding=embedding, mtp=mtp,
                     loss=loss, mirror=mirror)

    if schedule == "dualpipev":
        rows = [(chunk(r, r, 0), chunk(2 * pp - 1 - r, r, 1)) for r in range(pp)]
    else:  # direction 0 is stage r, direction 1 the mirror of stage pp-1-r; the nearer start first
        rows = [(chunk(r, r, 0), chunk(pp - 1 - r, r, 1, mirror=True)) if r < pp // 2
                else (chunk(pp - 1 - r, r, 0, mirror=True), chunk(r, r, 1)) for r in range(pp)]
    return tuple(rows)
