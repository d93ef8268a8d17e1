"""``megatron-dsv3 check``: a recipe validated at a world size, its memory estimate, and the report text.

:func:`recipe_report` never raises for a bad recipe: it collects the error and the memory estimate
into a :class:`CheckReport`, whose ``render()`` is the printed report (layout, experts, batch,
pipeline stages and memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.accounting import count
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.parallel.placement import placement_for
from megatron_dsv3.recipe.check import validate_recipe
from megatron_dsv3.recipe.memory import estimate_memory
from megatron_dsv3.recipe.schedule import schedule_options
from megatron_dsv3.recipe.sizes import global_batch, num_microbatches


def _b(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _table(rows: list[tuple], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@dataclass
class CheckReport:
    """The outcome of :func:`recipe_report`; ``render()`` is what ``megatron-dsv3 check`` prints."""

    recipe: object
    world_size: int
    gpu_memory_gb: float | None
    error: ConfigError | None = None
    layout: ParallelLayout | None = None
    memory: object = None
    notes: list[str] = field(default_factory=list)
    resume: list[str] = field(default_factory=list)  # what resuming checkpoint.load does (megatron_dsv3.train.resume)

    @property
    def fits(self) -> bool | None:
        """True/False against the GPU memory; None when there is nothing to compare with."""
        if self.memory is None or self.gpu_memory_gb is None or self.recipe.is_cpu:
            return None
        return self.memory.total <= self.gpu_memory_gb

    @property
    def ok(self) -> bool:
        return self.error is None and self.fits is not False

    def render(self) -> str:
        return render_report(self)


def recipe_report(recipe, world_size: int | None = None, gpu_memory_gb: float | None = None) -> CheckReport:
    """Validate ``recipe`` at ``world_size`` and estimate its memory against ``gpu_memory_gb``
    (default: the recipe's ``hardware.gpu_memory_gb``)."""
    ws = recipe.world_size(world_size)
    budget = gpu_memory_gb if gpu_memory_gb is not None else recipe.hardware.gpu_memory_gb
    report = CheckReport(recipe=recipe, world_size=ws, gpu_memory_gb=budget)
    try:
        report.layout = validate_recipe(recipe, world_size)
        report.memory = estimate_memory(recipe, world_size)
    except ConfigError as err:
        report.error = err
    return report


def render_report(report) -> str:
    recipe = report.recipe
    lines = [f"recipe     {recipe.name}: {recipe.description}".rstrip(": "), f"source     {recipe.source}"]
    try:
        lines += _model_lines(recipe)
    except ConfigError:  # a bad model override; the error itself is reported below
        pass
    if report.layout is not None:
        lines += _parallel_lines(report)
        lines += _batch_lines(recipe, report.layout)
        lines += _pipeline_lines(report)
    if report.memory is not None:
        lines += _memory_lines(report)
    lines += [f"{'resume' if i == 0 else '':<10} {line}" for i, line in enumerate(report.resume)]
    if report.error is not None:
        lines += [f"result     INVALID: {report.error}"]
    elif report.fits is False:
        lines += ["result     DOES NOT FIT: lower micro_batch_size, recompute more, or add GPUs"
                  " (more pp/ep shards parameters; a larger dp shards optimizer states)"]
    else:
        lines += ["result     OK"]
    return "\n".join(lines)


def _model_lines(recipe) -> list[str]:
    p = recipe.preset
    c = count(p)
    mtp = f" + {p.mtp_num_layers} MTP" if p.mtp_num_layers else ""
    return [f"model      {p.name}: {p.num_layers} layers ({p.first_k_dense} dense + {p.num_moe_layers} MoE){mtp};"
            f" {_b(c.total_params)} parameters (+{_b(c.mtp_params)} MTP), {_b(c.active_params)} activated;"
            f" seq {p.seq_length}"]


def _backend_text(recipe) -> str:
    backend = "local" if recipe.is_cpu else recipe.backend
    return "auto (chosen when the job starts; estimated as local)" if backend == "auto" else backend


def _parallel_lines(report) -> list[str]:
    recipe, lay, ws = report.recipe, report.layout, report.world_size
    hw = recipe.hardware
    gpu = hw.gpu or "GPU"
    if recipe.is_cpu:
        world = f"{ws} CPU process" + ("" if ws == 1 else "es")
    elif ws >= hw.gpus_per_node:
        world = f"{_n(ws, 'GPU')} ({_n(-(-ws // hw.gpus_per_node), 'node')} x {hw.gpus_per_node} {gpu})"
    else:
        world = f"{_n(ws, 'GPU')} ({gpu})"
    p = recipe.preset
    expert_dp = ws // (lay.pp * lay.ep * lay.etp)
    span = lay.ep * lay.etp  # Megatron's expert rank order (etp-ep-dp-pp): an EP group is consecutive ranks
    span_text = "" if recipe.is_cpu or lay.ep == 1 else (
        f"; an EP group spans {_n(span // hw.gpus_per_node, 'node')}" if span > hw.gpus_per_node
        else "; an EP group stays inside a node")
    split = f", each split over ETP {lay.etp}" if lay.etp > 1 else ""
    return [
        f"world      {world} = TP {lay.tp} x CP {lay.cp} x PP {lay.pp} x DP {lay.dp}"
        f"{' (sequence parallel)' if lay.sp else ''}; backend {_backend_text(recipe)}, {recipe.precision}",
        f"experts    {p.num_routed_experts} routed experts / EP {lay.ep} = {p.num_routed_experts // lay.ep}"
        f" per EP rank{split}{span_text}",
        f"DP sizes   dense parameters DP x CP = {lay.dp * lay.cp}; experts expert-DP = world / (PP x EP x ETP)"
        f" = {expert_dp}; optimizer states"
        f" {'sharded over them (distributed optimizer)' if recipe.training.use_distributed_optimizer else 'replicated'}",
    ]


def _batch_lines(recipe, lay) -> list[str]:
    t = recipe.training
    lines = [f"batch      global batch {global_batch(recipe, lay)} sequences = micro-batch {t.micro_batch_size}"
             f" x DP {lay.dp} x {num_microbatches(recipe, lay)} micro-batches per step"]
    if t.rampup_batch_size:
        start, incr, samples = t.rampup_batch_size
        steps = (t.global_batch_size - start) // incr
        lines.append(f"           ramp {start} -> {t.global_batch_size} (+{incr} every {_b(samples / steps)}"
                     f" sequences): {start // (t.micro_batch_size * lay.dp)} ->"
                     f" {num_microbatches(recipe, lay)} micro-batches per step")
    return lines


def _pipeline_lines(report) -> list[str]:
    recipe, lay = report.recipe, report.layout
    p = recipe.preset
    placement = placement_for(p, lay)
    chunks, vpp = placement.rows, placement.vpp
    schedule = {
        "1f1b": "no pipelining" if lay.pp == 1 else "1F1B",
        "interleaved": f"interleaved 1F1B, {vpp} virtual stages per rank",
        "dualpipe": "DualPipe: rank r holds stage r and a mirrored copy of stage pp-1-r",
        "dualpipev": "DualPipeV: rank r holds stages r and 2pp-1-r (a V)",
    }[placement.schedule]
    source = f"layout '{lay.layout}'" if lay.layout else "even split"
    lines = [f"pipeline   {schedule}; {_n(placement.num_stages, 'stage')} ({source})"]
    options = schedule_options(recipe, lay, placement.schedule)
    if options is not None:
        lines += [f"{'options' if i == 0 else '':<11}{line}" for i, line in enumerate(options.describe())]
    ranks = {r.pp_rank: r for r in report.memory.ranks} if report.memory is not None else {}
    rows = [("PP rank", "layers" if vpp == 1 else "layers per virtual stage", "params/rank", "in flight", "GiB")]
    for row in chunks:
        mem = ranks.get(row[0].pp_rank)
        rows.append((
            row[0].pp_rank, " | ".join(c.describe(p.first_k_dense) for c in row),
            _b(mem.dense_params + mem.expert_params) if mem else "", mem.in_flight if mem else "",
            f"{mem.total:.1f}" if mem else "",
        ))
    return lines + _table(rows)


def _memory_lines(report) -> list[str]:
    m = report.memory
    rank = next(r for r in m.ranks if r.pp_rank == m.pp_rank)
    lines = [f"memory     per rank, on the most loaded pipeline rank (PP rank {m.pp_rank}), GiB:"]
    notes = {"activations": f"{_n(rank.in_flight, 'micro-batch forward')} in flight",
             "parameters": f"{_b(rank.dense_params)} dense + {_b(rank.expert_params)} expert parameters"}
    rows = [(name, f"{gib:8.2f}", notes.get(name, "")) for name, gib in m.rows()[:-1]]
    if report.recipe.is_cpu:
        verdict = "CPU run: host memory, not compared with a GPU"
    elif report.gpu_memory_gb is None:
        verdict = "no GPU memory given (hardware.gpu_memory_gb or --gpu-memory-gb): not compared"
    elif report.fits:
        verdict = f"of {report.gpu_memory_gb:g} GiB: fits ({report.gpu_memory_gb - m.total:.1f} GiB spare)"
    else:
        verdict = f"of {report.gpu_memory_gb:g} GiB: DOES NOT FIT ({m.total - report.gpu_memory_gb:.1f} GiB over)"
    rows.append(("total", f"{m.total:8.2f}", verdict))
    return lines + _table(rows)
