"""A pipeline simulator: each rank's operations in order, timed with given costs (``megatron-dsv3 schedule``).

Every schedule is a list of operations per rank: DualPipe and DualPipeV from the engine
(:mod:`megatron_dsv3.pipeline.engine`, the same list the real run executes), 1F1B and interleaved in
Megatron-Core's order (``schedules.py``: warm-up forwards, one forward one backward, cool-down),
``combined_1f1b``, Megatron's own answer to DualPipe (``--overlap-moe-expert-parallel-comm``,
``combined_1f1b.py``): the interleaved order with one more warm-up forward and each steady-state
forward and backward run as one overlapped pair, each hiding the other's all-to-all (Megatron
requires virtual stages for it when pp > 1), and ZB1P, ZeroBubble's handcrafted ZB-H1 (Qi et al.,
2023): 1F1B with each backward split into its input-gradient part and a weight-gradient part, rank r
keeping its last r weight gradients for the cool-down.  The interleaved orders take micro-batches
``g`` at a time per chunk, the smallest group Megatron accepts for the sizes (``in_flight.microbatch_group``).

Costs, per micro-batch for one rank's share of the model (its layers under 1F1B on as many ranks):
``F`` a forward, ``B`` a whole backward, ``W`` its weight-gradient part (so an input-gradient backward
costs ``B - W``), ``FB`` an overlapped forward and backward pair (default ``F + B``: no overlap gain),
``C`` a point-to-point transfer between ranks.  A schedule that cuts a rank's share into smaller
chunks runs each chunk in its fraction of these costs: interleaved ``1/vpp``, DualPipeV ``1/2``
(DualPipe's chunks are whole shares, one per direction).  An operation starts when its rank is free and its inputs have arrived: a forward after the
previous stage's forward of that micro-batch, a backward after the next stage's backward (and its
own forward).  The figures:

* ``step_time``: when the last rank finishes;
* ``bubble``: the largest per-rank idle time within the step (step time minus the rank's busy time);
* ``peak_activations``: the most chunk forwards a rank holds at once (as
  :mod:`megatron_dsv3.pipeline.in_flight`), and ``peak_activation_shares`` the same in shares (a
  DualPipeV or interleaved chunk is a fraction of one);
* ``param_multiplier``: parameters per rank against 1F1B on as many ranks (DualPipe holds every
  stage twice: 2; the others 1).

With ``C = 0`` the bubbles equal the paper's Table 2 (arXiv 2412.19437v2, section 3.2.1; DualPipeV's
row from the ``deepseek-ai/DualPipe`` README): 1F1B ``(P-1)(F+B)``, interleaved
``(P-1)(F+B)/vpp``, ZB1P ``(P-1)(F+B-2W)``, DualPipe ``(P/2-1)(FB+B-3W)`` and DualPipeV
``(P-1)(FB+B-3W)/2`` (its chunks are half shares), the DeepSeek ones exact when ``F = B - W`` (a
forward costs what an input-gradient backward does) and ``FB >= B`` (an overlapped pair takes at least
as long as its backward alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.placement import place
from megatron_dsv3.pipeline.engine import Op, global_microbatch, rank_ops
from megatron_dsv3.pipeline.in_flight import deepseek_in_flight, forward_order, megatron_in_flight, microbatch_group

SIMULATED = ("1f1b", "interleaved", "combined_1f1b", "zb1p", "dualpipe", "dualpipev")
PAIRS_OVERLAP = ("combined_1f1b", *DEEPSEEK_SCHEDULES)  # run forward-and-backward pairs overlapped (FB)


@dataclass(frozen=True)
class Costs:
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # default F + B
    C: float = 0.0

    @property
    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB


@dataclass(frozen=True)
class Interval:
    op: str
    start: float
    end: float
    kind: str  # F, B, Bz, W, FB
    grad_stage: int | None = None  # the stage whose gradients it computes (a backward or a W)


@dataclass
class Timeline:
    schedule: str
    pp: int
    num_microbatches: int
    costs: Costs
    ranks: list[list[Interval]] = field(default_factory=list)
    stages: int = 0
    vpp: int = 1
    group: int | None = None  # interleaved orders: micro-batches per virtual stage at a time

    @property
    def step_time(self) -> float:
        return max((row[-1].end for row in self.ranks if row), default=0.0)

    def idle(self, rank: int) -> float:
        return self.step_time - sum(i.end - i.start for i in self.ranks[rank])

    @property
    def bubble(self) -> float:
        return max(self.idle(r) for r in range(self.pp))

    @property
    def param_multiplier(self) -> int:
        return 2 if self.schedule == "dualpipe" else 1

    @property
    def peak_activations(self) -> int:
        if self.schedule in DEEPSEEK_SCHEDULES:
            return max(len(deepseek_in_flight(self.schedule, self.pp, r, self.num_microbatches))
                       for r in range(self.pp))
        if self.schedule == "zb1p":
            return max(_zb1p_peak(row) for row in self.ranks)
        return max(len(megatron_in_flight(self.pp, r, self.vpp, self.num_microbatches,
                                          ep_overlap=self.schedule == "combined_1f1b")) for r in range(self.pp))

    @property
    def peak_activation_shares(self) -> float:
        return self.peak_activations * self.pp / self.stages

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule, "pp": self.pp, "stages": self.stages, "microbatches": self.num_microbatches,
            "costs": {"F": self.costs.F, "B": self.costs.B, "W": self.costs.W, "FB": self.costs.pair,
                      "C": self.costs.C},
            "step_time": self.step_time, "bubble": self.bubble, "peak_activations": self.peak_activations,
            "peak_activation_shares": self.peak_activation_shares,
            "param_multiplier": self.param_multiplier, "microbatch_group": self.group,
            "idle": [self.idle(r) for r in range(self.pp)],
            "ranks": [[i.op for i in row] for row in self.ranks],
        }


def _zb1p_peak(row: list[Interval]) -> int:
    live, peak = set(), 0
    for i in row:
        if i.kind == "F":
            live.add(i.op[1:])
        peak = max(peak, len(live))
        if i.kind == "W":
            live.discard(i.op[1:])
    return peak


# ---- operation lists ----
@dataclass(frozen=True)
class _Task:
    """One timed operation: which (stage, micro-batch) forward and/or backward it runs."""

    name: str
    kind: str
    forward: tuple[int, int] | None = None  # (stage, global micro-batch)
    backward: tuple[int, int] | None = None
    weight: tuple[int, int] | None = None


def _megatron_tasks(schedule: str, pp: int, num_microbatches: int, vpp: int) -> list[list[_Task]]:
    rows, group = [], microbatch_group(pp, num_microbatches)
    for r in range(pp):
        if vpp == 1:
            fwd = [(0, m) for m in range(num_microbatches)]
            bwd = list(fwd)
            warmup = min(pp - r - 1, num_microbatches)
        else:
            chunks = forward_order(num_microbatches, vpp, group)
            seen = [0] * vpp
            fwd = []
            for c in chunks:
                fwd.append((c, seen[c]))
                seen[c] += 1
            seen = [0] * vpp
            bwd = []
            for c in chunks:  # backwards run the chunks in reverse, in the same groups
                rc = vpp - 1 - c
                bwd.append((rc, seen[rc]))
                seen[rc] += 1
            warmup = 2 * (pp - r - 1) + (vpp - 1) * group + (schedule == "combined_1f1b")
            warmup = min(warmup, num_microbatches * vpp)
        stage = lambda c: c * pp + r  # noqa: E731
        f = [_Task(f"F{c}.{m}", "F", forward=(stage(c), m)) for c, m in fwd]
        b = [_Task(f"B{c}.{m}", "B", backward=(stage(c), m)) for c, m in bwd]
        order = f[:warmup]
        for i in range(len(f) - warmup):
            if schedule == "combined_1f1b":  # one overlapped pair (combined_forward_backward_step)
                order.append(_Task(f"{f[warmup + i].name}&{b[i].name}", "FB", forward=f[warmup + i].forward,
                                   backward=b[i].backward))
            else:
                order += [f[warmup + i], b[i]]
        order += b[len(f) - warmup:]
        rows.append(order)
    return rows


def _zb1p_tasks(pp: int, num_microbatches: int) -> list[list[_Task]]:
    """ZB-H1: 1F1B's order with each backward split, rank r keeping its last r weight gradients
    waiting until the cool-down (where they fill the waits for the later backwards)."""
    rows = []
    for r in range(pp):
        warmup = min(pp - r - 1, num_microbatches)
        f = [_Task(f"F0.{m}", "F", forward=(r, m)) for m in range(num_microbatches)]
        order, waiting = f[:warmup], []

        def backward(m: int) -> None:
            order.append(_Task(f"B0.{m}z", "Bz", backward=(r, m)))
            waiting.append(_Task(f"W0.{m}", "W", weight=(r, m)))
            if len(waiting) > r:
                order.append(waiting.pop(0))

        for i in range(num_microbatches - warmup):
            order.append(f[warmup + i])
            backward(i)
        for m in range(num_microbatches - warmup, num_microbatches):
            backward(m)
        rows.append(order + waiting)
    return rows


def _deepseek_tasks(schedule: str, pp: int, num_microbatches: int, zero_bubble: bool) -> list[list[_Task]]:
    """Each rank's operations from the engine, keyed by (model stage, step micro-batch): a DualPipe
    micro-batch entering at the last rank runs the stages 0, 1, ... on ranks pp-1, pp-2, ...
    Without ``zero_bubble`` every backward is whole (the engine's weight-gradient steps drop out)."""
    placement = place(_stages(schedule, pp), 0, pp, schedule=schedule)
    rows = []
    for r in range(pp):
        row = {(c.direction if schedule == "dualpipe" else c.vp_stage): c for c in placement.rows[r]}

        def key(c: int, m: int) -> tuple[int, int]:
            return row[c].stage, global_microbatch(schedule, c, m, num_microbatches)

        tasks = [_deepseek_task(op, key) for op in rank_ops(schedule, pp, num_microbatches, r)]
        if not zero_bubble:
            tasks = [_Task(t.name.removesuffix("z"), "B", backward=t.backward) if t.kind == "Bz" else t
                     for t in tasks if t.kind != "W"]
        rows.append(tasks)
    return rows


def _stages(schedule: str, pp: int) -> int:
    return 2 * pp if schedule == "dualpipev" else pp


def _deepseek_task(op: Op, key) -> _Task:
    if op.kind == "F":
        return _Task(str(op), "F", forward=key(op.chunk, op.mb))
    if op.kind == "B":
        return _Task(str(op), "Bz" if op.zb else "B", backward=key(op.chunk, op.mb))
    if op.kind == "W":
        return _Task(str(op), "W", weight=key(op.chunk, op.mb))
    return _Task(str(op), "FB", forward=key(op.chunk, op.mb), backward=key(op.b_chunk, op.b_mb))


# ---- the simulation ----
def _durations(costs: Costs, fraction: float) -> dict[str, float]:
    whole = {"F": costs.F, "B": costs.B, "Bz": costs.B - costs.W, "W": costs.W, "FB": costs.pair}
    return {k: v * fraction for k, v in whole.items()}


def _simulate(rows: list[list[_Task]], stages: int, costs: Costs) -> list[list[Interval]]:
    """Each rank runs its tasks in order as soon as their inputs are there; a chunk is
    ``len(rows) / stages`` of a rank's share."""
    durations = _durations(costs, len(rows) / stages)
    rank_of: dict[tuple[str, tuple[int, int]], int] = {}
    for r, row in enumerate(rows):
        for t in row:
            if t.forward:
                rank_of["F", t.forward] = r
            if t.backward:
                rank_of["B", t.backward] = r
    done: dict[tuple[str, tuple[int, int]], float] = {}
    clock = [0.0] * len(rows)
    position = [0] * len(rows)
    timeline: list[list[Interval]] = [[] for _ in rows]
    remaining = sum(len(row) for row in rows)
    while remaining:
        progressed = False
        for r, row in enumerate(rows):
            while position[r] < len(row):
                task = row[position[r]]
                ready = _ready_time(task, r, stages, done, rank_of, costs)
                if ready is None:
                    break
                start = max(clock[r], ready)
                end = start + durations[task.kind]
                grad = task.backward or task.weight
                timeline[r].append(Interval(task.name, start, end, task.kind, grad[0] if grad else None))
                if task.forward:
                    done["F", task.forward] = end
                if task.backward:
                    done["B", task.backward] = end
                clock[r] = end
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks: some operation waits for one that never runs")
    return timeline


def _ready_time(task: _Task, rank: int, stages: int, done, rank_of, costs: Costs) -> float | None:
    """When ``task``'s inputs are there, or None if some has not been computed yet."""
    times = []
    if task.forward:
        s, m = task.forward
        if s > 0:
            if ("F", (s - 1, m)) not in done:
                return None
            times.append(done["F", (s - 1, m)] + (costs.C if rank_of["F", (s - 1, m)] != rank else 0.0))
    if task.backward:
        s, m = task.backward
        if ("F", (s, m)) not in done:
            return None
        times.append(done["F", (s, m)])
        if s < stages - 1:
            if ("B", (s + 1, m)) not in done:
                return None
            times.append(done["B", (s + 1, m)] + (costs.C if rank_of["B", (s + 1, m)] != rank else 0.0))
    if task.weight and ("B", task.weight) not in done:
        return None
    return max(times, default=0.0)


def simulate(schedule: str, pp: int, num_microbatches: int, costs: Costs | None = None, vpp: int = 2,
             zero_bubble: bool = True) -> Timeline:
    """The timeline of one step of ``schedule`` on ``pp`` ranks (``vpp``: interleaved's chunks per rank;
    ``zero_bubble``: DualPipe(V)'s split backward)."""
    costs = costs or Costs()
    if schedule not in SIMULATED:
        raise ConfigError(f"unknown schedule '{schedule}'", fix=f"use one of: {', '.join(SIMULATED)}",
                          key="--schedule", value=schedule, choices=list(SIMULATED))
    if costs.W > costs.B or min(costs.F, costs.B, costs.W, costs.pair, costs.C) < 0:
        raise ConfigError(f"costs F={costs.F}, B={costs.B}, W={costs.W} must be >= 0 with W <= B (W is part of"
                          " the backward)", fix="give the whole backward as --b and its weight part as --w",
                          key="--w")
    timeline = Timeline(schedule, pp, num_microbatches, costs)
    if schedule in DEEPSEEK_SCHEDULES:
        timeline.stages, timeline.vpp = _stages(schedule, pp), 2
        timeline.ranks = _simulate(_deepseek_tasks(schedule, pp, num_microbatches, zero_bubble),
                                    timeline.stages, costs)
    elif schedule == "zb1p":
        timeline.stages = pp
        timeline.ranks = _simulate(_zb1p_tasks(pp, num_microbatches), pp, costs)
    else:
        v = 1 if schedule == "1f1b" else vpp
        if schedule != "1f1b" and (v < 2 or num_microbatches < pp):
            raise ConfigError(f"{schedule} needs vpp >= 2 and at least pp={pp} micro-batches",
                              fix="give --vpp 2 or more and --microbatches >= pp", key="--microbatches")
        timeline.stages, timeline.vpp = pp * v, v
        timeline.group = microbatch_group(pp, num_microbatches) if v > 1 else None
        timeline.ranks = _simulate(_megatron_tasks(schedule, pp, num_microbatches, v), pp * v, costs)
    return timeline
