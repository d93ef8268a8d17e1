"""A recipe's pipeline schedule: the DualPipe(V) options it resolves to, and the simulator's costs for it.

``megatron-dsv3 check`` reports the options (:func:`schedule_options`, the one rule of
:func:`megatron_dsv3.pipeline.constraints.decide_options` applied to the recipe's keys), and
``megatron-dsv3 schedule --recipe`` and ``benchmarks/pipeline.py`` simulate the recipe's step with the
cost model of :mod:`megatron_dsv3.pipeline.costs` at the recipe's sizes (:func:`recipe_costs`,
:func:`recipe_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES, ParallelLayout
from megatron_dsv3.pipeline.constraints import ResolvedOptions, decide_options
from megatron_dsv3.pipeline.costs import Machine, ModelCosts, ReductionCosts, model_costs, reduction_costs
from megatron_dsv3.pipeline.simulator import PAIRS_OVERLAP
from megatron_dsv3.recipe.sizes import num_microbatches, parallel_layout


def schedule_options(recipe, layout: ParallelLayout, schedule: str | None) -> ResolvedOptions | None:
    """DualPipe(V)'s options as the job will resolve them, and why (None for Megatron's schedules)."""
    if schedule not in DEEPSEEK_SCHEDULES:
        return None
    rc = recipe.training.recompute
    backend = "local" if recipe.is_cpu or recipe.backend == "auto" else recipe.backend
    try:
        return decide_options(schedule, ep=layout.ep, backend=backend, zero_bubble=layout.zero_bubble,
                              fb_overlap=layout.fb_overlap, recompute_granularity=rc.granularity,
                              recompute_modules=rc.modules, mtp_num_layers=recipe.preset.mtp_num_layers)
    except ConfigError as err:
        raise recipe.locate(err) from None


def recipe_reduction(recipe, machine: Machine | None = None, world_size: int | None = None) -> ReductionCosts:
    """The data-parallel gradient reduction's cost model for ``recipe`` at its parallel sizes."""
    layout = parallel_layout(recipe, world_size)
    machine = machine or Machine.default(recipe.precision, recipe.hardware.gpus_per_node)
    expert_dp = layout.tp * layout.cp * layout.dp // (layout.ep * layout.etp)
    return reduction_costs(recipe.preset, pp=layout.pp, ep=layout.ep, etp=layout.etp, dp=layout.cp * layout.dp,
                           expert_dp=expert_dp, distributed_optimizer=recipe.training.use_distributed_optimizer,
                           machine=machine)


def recipe_costs(recipe, machine: Machine | None = None, world_size: int | None = None) -> tuple[ModelCosts, dict]:
    """The cost model for ``recipe`` at its parallel sizes, and the figures it used."""
    layout = parallel_layout(recipe, world_size)
    machine = machine or Machine.default(recipe.precision, recipe.hardware.gpus_per_node)
    costs = model_costs(recipe.preset, pp=layout.pp, ep=layout.ep,
                        micro_batch_size=recipe.training.micro_batch_size, precision=recipe.precision,
                        machine=machine)
    context = {"pp": layout.pp, "ep": layout.ep, "microbatches": num_microbatches(recipe, layout),
               "schedule": layout.schedule, "vpp": layout.vpp, "precision": recipe.precision,
               "machine": {"tflops": machine.tflops, "ib_gbs": machine.ib_gbs, "nvlink_gbs": machine.nvlink_gbs,
                           "gpus_per_node": machine.gpus_per_node}}
    return costs, context


@dataclass
class RecipeSchedule:
    """What ``megatron-dsv3 schedule --recipe`` simulates: sizes, per-schedule costs, and a summary."""

    pp: int
    microbatches: int
    vpp: int
    costs_for: Callable[[str], object]  # schedule name -> simulator costs (DualPipe(V) overlapped or not)
    context: dict
    summary: str


def recipe_schedule(recipe, *, tflops: float | None = None, ib_gbs: float | None = None,
                    nvlink_gbs: float | None = None, microbatches: int | None = None, vpp: int | None = None,
                    fb_overlap: bool | None = None) -> RecipeSchedule:
    """The recipe's step as the simulator sees it; each argument given overrides the recipe's figure
    (``fb_overlap`` None: as a DualPipe job of this recipe would resolve it)."""
    default = Machine.default(recipe.precision, recipe.hardware.gpus_per_node)
    machine = Machine(tflops=tflops or default.tflops, ib_gbs=ib_gbs or default.ib_gbs,
                      nvlink_gbs=nvlink_gbs or default.nvlink_gbs, gpus_per_node=default.gpus_per_node)
    model, context = recipe_costs(recipe, machine)
    if fb_overlap is None:
        resolved = schedule_options(recipe, parallel_layout(recipe), "dualpipe")
        fb_overlap, why = resolved.options.fb_overlap, f"; DualPipe(V): F&B overlap {resolved.why['fb_overlap']}"
    else:
        why = "; DualPipe(V) overlap their pairs" if fb_overlap else ""
    microbatches = microbatches or context["microbatches"]
    summary = (f"recipe {recipe.name}: pp {context['pp']}, ep {context['ep']}, {microbatches} micro-batches per step;"
               f" per micro-batch and rank share: forward {model.forward_compute:.1f} ms compute +"
               f" {model.forward_a2a:.1f} ms all-to-all, backward {model.backward_compute:.1f} +"
               f" {model.backward_a2a:.1f} ms (weight part {model.weight_compute:.1f}), stage transfer"
               f" {model.p2p:.2f} ms; {machine.tflops:g} TFLOP/s, IB {machine.ib_gbs:g} GB/s" + why)
    context = {"recipe": recipe.name, **context, "microbatches": microbatches, "model_ms": model.to_dict(),
               "fb_overlap": fb_overlap}
    return RecipeSchedule(pp=context["pp"], microbatches=microbatches, vpp=vpp or context["vpp"] or 2,
                          costs_for=lambda s: model.costs(fb_overlap and s in PAIRS_OVERLAP), context=context,
                          summary=summary)
