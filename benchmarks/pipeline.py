"""Pipeline schedules: DualPipe and DualPipeV against 1F1B, simulated at 671B scale and measured on CPU.

1. **671B on 2,048 H800, simulated** (``deepseek-v3-671b-h800-2048``: PP 16, EP 64, 120
   micro-batches): the engine's programs and Megatron's orders timed by the simulator with the cost
   model of :mod:`megatron_dsv3.pipeline.costs` (compute at 40% of the H800's peak, all-to-all over
   50 GB/s InfiniBand; a model, not a measurement), against plain 1F1B, ZB1P and Megatron's own
   answer to DualPipe, 1F1B with the expert all-to-all overlapped (``combined_1f1b``, interleaved
   with two virtual stages), with the data-parallel gradient reduction after the step or overlapped
   with it (:mod:`megatron_dsv3.pipeline.dp_reduction`; DualPipe's includes its mirror sum).
2. **dsv3-tiny (8 layers) on 2 CPU processes, measured**: one training step's wall time under
   Megatron's 1F1B and under the DualPipe runner, next to the simulator's prediction from the
   operation times measured in the same runs (``runner.TRACE``).  Two processes on two cores cannot
   overlap communication with compute, so this checks the programs and the simulator, not the
   overlap gain.

    python benchmarks/pipeline.py [--steps 6] [--warmup 2] [--skip-measured] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
if "--verbose" not in sys.argv:  # also in the spawned workers, which import this file first
    from megatron_dsv3.testing.quiet import quiet_megatron

    quiet_megatron()

RECIPE = "deepseek-v3-671b-h800-2048"


SCHEDULES = ["1f1b", "combined_1f1b", "zb1p", "dualpipe", "dualpipev"]


def simulated_671b() -> None:
    from megatron_dsv3.pipeline import compare
    from megatron_dsv3.pipeline.dp_reduction import chunk_ms, step_with_reduction
    from megatron_dsv3.pipeline.simulator import PAIRS_OVERLAP
    from megatron_dsv3.recipe import load_recipe
    from megatron_dsv3.recipe.schedule import recipe_costs, recipe_reduction

    recipe = load_recipe(RECIPE)
    model, context = recipe_costs(recipe)
    reduction = recipe_reduction(recipe)
    pp, m = context["pp"], context["microbatches"]
    print(f"## 1. {RECIPE}, simulated: PP {pp}, EP {context['ep']}, {m} micro-batches per step")
    print(f"per micro-batch and rank share: forward {model.forward_compute:.1f} ms compute + {model.forward_a2a:.1f} ms"
          f" all-to-all, backward {model.backward_compute:.1f} + {model.backward_a2a:.1f} ms (weight part"
          f" {model.weight_compute:.1f}); {context['machine']['tflops']:g} TFLOP/s,"
          f" IB {context['machine']['ib_gbs']:g} GB/s")
    results = {}
    group = compare.compare(["combined_1f1b"], pp, m, model.costs)[0].timeline.group
    print(f"1F1B with EP overlap: Megatron's combined 1F1B (--overlap-moe-expert-parallel-comm), which needs virtual"
          f" stages: 2, micro-batches {group} at a time per stage (--microbatch-group-size-per-virtual-pipeline-stage)")
    for overlap in (True, False):
        results[overlap] = compare.compare(SCHEDULES, pp, m,
                                           lambda s: model.costs(overlap and s in PAIRS_OVERLAP))  # noqa: B023
        print(f"\nForward/backward pairs {'overlapped' if overlap else 'not overlapped'}"
              f" ({'1F1B with EP overlap and DualPipe(V)' if overlap else 'none; 1F1B with EP overlap needs it'}):")
        print(compare.render_table([r for r in results[overlap] if overlap or r.schedule != "combined_1f1b"], " ms"))
    print(f"\nWith the data-parallel gradient reduction (fp32, DP {reduction.dp}, expert DP {reduction.expert_dp},"
          f" {'reduce-scatter' if reduction.distributed_optimizer else 'all-reduce'}; DualPipe all-reduces each"
          f" stage over its two copies and their DP ranks), forward/backward pairs overlapped where the schedule"
          f" can; one share's reduction {reduction.share_ms('1f1b'):.0f} ms"
          f" (DualPipe {reduction.share_ms('dualpipe'):.0f}):")
    steps = {}
    print(f"{'schedule':<22}{'pipeline ms':>12}{'reduce ms/chunk':>17}{'+ reduce after':>16}{'+ overlapped':>14}")
    for r in results[True]:
        t = r.timeline
        steps[r.schedule] = (t.step_time, step_with_reduction(t, reduction, False),
                             step_with_reduction(t, reduction, True))
        print(f"{compare.NAMES[r.schedule]:<22}{t.step_time:>12,.0f}{chunk_ms(t, reduction):>17,.0f}"
              f"{steps[r.schedule][1]:>16,.0f}{steps[r.schedule][2]:>14,.0f}")
    for name in ("dualpipe", "dualpipev"):
        own = steps[name]
        against = ", ".join(f"{compare.NAMES[s]} {steps[s][1] / own[1]:.3f}x / {steps[s][2] / own[2]:.3f}x"
                            for s in SCHEDULES if s != name)
        print(f"{compare.NAMES[name]} throughput against (reduction after / overlapped): {against}")
    plain = {r.schedule: r.timeline.step_time for r in results[False]}
    print(f"Without the forward/backward overlap (the shipped recipe: its `moe` recompute rules out both overlaps):"
          f" DualPipe vs 1F1B {plain['1f1b'] / plain['dualpipe']:.3f}x,"
          f" vs ZB1P {plain['zb1p'] / plain['dualpipe']:.3f}x")


# ---- measured on CPU ----
def _worker(layout, steps: int, warmup: int, batch: int, verbose: bool) -> dict:
    import torch

    from megatron_dsv3.model.presets import get_preset
    from megatron_dsv3.pipeline import runner
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.quiet import silenced

    preset = get_preset("dsv3-tiny").with_overrides(num_layers=8)
    with silenced(verbose):
        parallel.init_parallel(layout, preset=preset)
        _, _, chunks = parallel.build_chunks(preset, layout)
    tokens = parallel.fixed_tokens(preset, batch, seed=0)
    times, ops = [], []
    for step in range(warmup + steps):
        runner.TRACE = [] if step >= warmup else None
        torch.distributed.barrier()
        start = time.perf_counter()
        parallel.train_step(chunks, chunks[0].config, tokens, 1)
        torch.distributed.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            ops += runner.TRACE
    runner.TRACE = None
    return {"step": statistics.mean(times), "ops": [(kind, end - start) for _, kind, start, end in ops]}


def _share_costs(ops: list[tuple[str, float]], fraction: float):
    """The simulator's costs (per rank share) from measured chunk operations (``fraction`` of a share each)."""
    from megatron_dsv3.pipeline.simulator import Costs

    mean = {k: statistics.mean(d for kind, d in ops if kind == k) * 1e3 / fraction
            for k in {kind for kind, _ in ops}}
    w = mean.get("W", 0.0)
    b = mean["Bz"] + w if "Bz" in mean else mean["B"]
    return Costs(F=mean["F"], B=b, W=w if "Bz" in mean else 0.0, FB=mean.get("FB"))


def measured_cpu(steps: int, warmup: int, verbose: bool) -> None:
    from megatron_dsv3.parallel import ParallelLayout as L
    from megatron_dsv3.pipeline.simulator import simulate
    from megatron_dsv3.testing.distributed import run_distributed

    batch = 8
    runs = {
        "1f1b": (L(pp=2), "1f1b", True),
        "dualpipev": (L(pp=2, schedule="dualpipev"), "dualpipev", True),
        "dualpipev, no zero bubble": (L(pp=2, schedule="dualpipev", zero_bubble=False), "dualpipev", False),
        "dualpipe": (L(pp=2, schedule="dualpipe"), "dualpipe", True),
    }
    measured = {}
    for name, (layout, _, _) in runs.items():
        results = run_distributed(_worker, layout.world_size, layout, steps, warmup, batch, verbose)
        measured[name] = {"step": max(r["step"] for r in results), "ops": [r["ops"] for r in results],
                          "steps": steps}
    print(f"\n## 2. dsv3-tiny (8 layers), 2 CPU processes, {batch} micro-batches of 1 x 128 tokens, measured")
    print(f"{'schedule':<28}{'measured step ms':>18}{'busiest rank busy ms':>22}{'simulated ms':>14}"
          f"{'sim / measured':>16}")
    for name, (_, schedule, zero_bubble) in runs.items():
        step = measured[name]["step"] * 1e3
        if schedule == "1f1b":  # no trace of Megatron's own schedule: predicted from DualPipeV's operations
            ops, fraction = measured["dualpipev"]["ops"], 0.5
        else:
            ops, fraction = measured[name]["ops"], 0.5 if schedule == "dualpipev" else 1.0
        # Each rank's own operation costs, as if every rank were like it; the slowest rank sets the step.
        sims, busy = [], []
        for rank_ops in ops:
            sims.append(simulate(schedule, 2, batch, _share_costs(rank_ops, fraction), zero_bubble=zero_bubble).step_time)
            busy.append(sum(d for _, d in rank_ops) * 1e3 / measured[name]["steps"])
        sim = max(sims)
        busiest = "-" if schedule == "1f1b" else f"{max(busy):.1f}"
        print(f"{name:<28}{step:>18.1f}{busiest:>22}{sim:>14.1f}{sim / step:>16.2f}")
    print("simulated: each rank's measured mean operation costs for every rank, transfers free; the measured"
          " steps also hold gloo's point-to-point transfers, the loss reports and the gradient all-reduce")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=6)
    cli.add_argument("--warmup", type=int, default=2)
    cli.add_argument("--skip-measured", action="store_true", help="only the simulated 671B table")
    cli.add_argument("--verbose", action="store_true", help="show Megatron's logging")
    opts = cli.parse_args()
    simulated_671b()
    if not opts.skip_measured:
        measured_cpu(opts.steps, opts.warmup, opts.verbose)


if __name__ == "__main__":
    main()
