"""Parallel equivalence: a layout's loss and gradients against the single-process run.

:func:`compare_layouts` runs the same global batch from the same weights once in one process and
once under each layout (TP+SP, EP, PP, PP+VPP ...) and reports, per layout, the relative loss error
and the worst relative gradient error over all parameters (each gradient resharded to a full tensor
by Megatron's distributed checkpoint), plus the expert-bias update.  ``pairs`` compare two layouts
with each other the same way (say a schedule with and without an option), under ``"a~b"``.
"""

from __future__ import annotations

import os

from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.testing import parallel
from megatron_dsv3.testing.distributed import run_distributed


def _run(workdir, name, layout, preset, tokens, micro_batch_size, extra_args, reference):
    parallel.init_parallel(layout, preset=preset)
    _, _, chunks = parallel.build_chunks(preset, layout, extra_args=extra_args)
    weights = os.path.join(workdir, "weights")
    if reference:
        parallel.save_weights(chunks, weights)
    else:
        parallel.load_weights(chunks, weights)
    step = parallel.train_step(chunks, chunks[0].config, tokens, micro_batch_size)
    parallel.save_gradients(chunks, os.path.join(workdir, f"grads-{name}"))
    parallel.save_weights(chunks, os.path.join(workdir, f"after-{name}"))
    return step


def _relative_errors(grads: dict, reference: dict) -> dict[str, float]:
    return {key: float((grads[key] - ref).norm() / ref.norm().clamp_min(1e-30)) for key, ref in reference.items()}


def _compare(workdir, names, preset, extra_args, pairs=()):
    layout = ParallelLayout()
    parallel.init_parallel(layout, preset=preset)
    _, _, chunks = parallel.build_chunks(preset, layout, extra_args=extra_args)
    reference = parallel.load_gradients(chunks, os.path.join(workdir, "grads-reference"))
    num_params = sum(1 for chunk in chunks for _ in parallel._unwrap(chunk).parameters())
    parallel.load_weights(chunks, os.path.join(workdir, "after-reference"))
    ref_bias = {n: b.clone() for n, b in chunks[0].module.named_buffers() if n.endswith("expert_bias")}
    report = {}
    for name in names:
        grads = parallel.load_gradients(chunks, os.path.join(workdir, f"grads-{name}"))
        errors = _relative_errors(grads, reference)
        worst_key = max(errors, key=errors.get)
        worst = errors[worst_key]
        parallel.load_weights(chunks, os.path.join(workdir, f"after-{name}"))
        bias = {n: b for n, b in chunks[0].module.named_buffers() if n.endswith("expert_bias")}
        bias_err = max((float((bias[n] - b).abs().max()) for n, b in ref_bias.items()), default=0.0)
        report[name] = {
            "max_grad_rel_err": worst,
            "worst_param": worst_key,
            "grad_rel_errs": errors,
            "num_grads": len(reference),
            "num_params": num_params,  # a gradient compared for every parameter of the model
            "expert_bias_max_abs_err": bias_err,
            "expert_bias_moved": max((float(b.abs().max()) for b in ref_bias.values()), default=0.0),
        }
    for a, b in pairs:
        errors = _relative_errors(parallel.load_gradients(chunks, os.path.join(workdir, f"grads-{a}")),
                                  parallel.load_gradients(chunks, os.path.join(workdir, f"grads-{b}")))
        worst_key = max(errors, key=errors.get)
        report[f"{a}~{b}"] = {"max_grad_rel_err": errors[worst_key], "worst_param": worst_key,
                              "num_grads": len(errors)}
    return report


def compare_layouts(
    workdir: str,
    layouts: dict[str, ParallelLayout],
    *,
    preset="dsv3-tiny",
    global_batch: int = 8,
    micro_batch_size: int = 2,
    seed: int = 0,
    extra_args: tuple[str, ...] = (),
    pairs: tuple[tuple[str, str], ...] = (),
) -> dict:
    """Loss and gradient errors of each layout against the single-process reference (and of each
    pair of layouts against each other)."""
    extra = tuple(extra_args)
    tokens = parallel.fixed_tokens(preset, global_batch, seed=seed)
    ref = run_distributed(_run, 1, workdir, "reference", ParallelLayout(), preset, tokens,
                          micro_batch_size, extra, True)[0]
    ref_loss = ref["loss_sum"] / ref["tokens"]
    losses = {}
    for name, layout in layouts.items():
        steps = run_distributed(_run, layout.world_size, workdir, name, layout, preset, tokens,
                                micro_batch_size, extra, False)
        loss = sum(s["loss_sum"] for s in steps) / sum(s["tokens"] for s in steps)
        losses[name] = loss
    report = run_distributed(_compare, 1, workdir, list(layouts), preset, extra, tuple(pairs))[0]
    for name in layouts:
        report[name]["loss"] = losses[name]
        report[name]["reference_loss"] = ref_loss
        report[name]["loss_rel_err"] = abs(losses[name] - ref_loss) / abs(ref_loss)
    for a, b in pairs:
        report[f"{a}~{b}"]["losses"] = (losses[a], losses[b])
    return report
