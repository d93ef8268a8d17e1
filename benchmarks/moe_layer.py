"""One DeepSeek-V3-shaped MoE layer, forward and backward: sequential against grouped experts, BF16 and FP8.

The layer is the ``dsv3`` spec's own (Megatron's ``MoELayer``: sigmoid group-limited router with
expert bias, all-to-all dispatcher, shared expert, routed experts), at DeepSeek-V3's proportions
scaled to one machine: by default 64 routed experts, top-6, hidden 1024, expert width 256 (V3: 256,
top-8, 7168, 2048).  Each variant is built from the same seed (so both expert kinds hold the same
weights) and runs the same tokens; the table gives, per variant, the median forward+backward time
of the routed experts alone and of the whole layer, tokens/s of the layer, the grouped / sequential
speed ratio and the largest difference between the two (layer output, input gradient, expert
weight gradients).  FP8 is the ``deepseek`` recipe (with BF16 parameters), emulated on CPU and
``torch._scaled_mm`` on a GPU; on CPU fp32 is timed too, the precision CPU runs train in.
Targets: on CPU grouped is no slower than sequential (ratio >= 0.9); on a GPU grouped >= 3x at 64 experts.

    python benchmarks/moe_layer.py [--tokens 4096] [--experts 64] [--topk 6] [--hidden 1024] [--ffn 256]
                                   [--repeats 5] [--precisions fp32 bf16 fp8] [--json out.json]
                                   [--train dsv3-tiny-cpu [--train-steps 30] [--skip-layer]]

``--train`` also times ``megatron-dsv3 train`` on a recipe (the embedded default is ``dsv3-tiny-cpu``)
with both kinds of experts, runs alternating, and prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

EXPERTS = ("sequential", "grouped")


def layer_preset(opts):
    from megatron_dsv3.model.presets import get_preset

    return get_preset("dsv3-tiny").with_overrides(
        num_layers=1, first_k_dense=0, mtp_num_layers=0, hidden_size=opts.hidden, ffn_hidden_size=4 * opts.hidden,
        num_routed_experts=opts.experts, moe_router_topk=opts.topk, moe_ffn_hidden_size=opts.ffn,
        num_groups=8, group_topk=4, seq_length=opts.tokens)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds of each of ``steps`` (name -> function), the steps taking turns so that a
    machine shared with other work slows all of them alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_layer(preset, experts: str, precision: str, on_cpu: bool):
    """This variant's MoE layer (Megatron's ``MoELayer`` from the ``dsv3`` spec), from seed 0."""
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    extra = ["--dsv3-experts", experts] + (["--bf16"] if precision != "fp32" else [])
    if precision == "fp8":
        extra += ["--dsv3-fp8", "deepseek", "--dsv3-fp8-moments", "fp32",
                  "--dsv3-fp8-backend", "emulated" if on_cpu else "pytorch"]
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    _, _, (chunk,) = build_chunks(preset, ParallelLayout(), ddp=False, cpu=on_cpu, extra_args=tuple(extra))
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk.decoder.layers[0].mlp


def prepare_variant(layer, hidden, grad) -> tuple[dict, dict]:
    """The layer's outputs and gradients to compare, and its two timed steps: the whole layer, and
    its routed experts alone on the tokens the layer dispatched."""
    import torch

    device = hidden.device
    seen = {}
    hook = layer.experts.register_forward_pre_hook(
        lambda module, args: seen.setdefault("args", tuple(a.detach() for a in args)))

    def layer_step():
        x = hidden.detach().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(grad)
        return out, x

    out, x = layer_step()
    hook.remove()
    tokens, counts, probs = seen["args"]
    result = {"out": out.detach().float(), "dx": x.grad.float(), "routed_tokens": int(counts.sum()),
              "empty_experts": int((counts == 0).sum()),
              "dw": {n: p.grad.float() for n, p in layer.experts.named_parameters()}}
    expert_grad = torch.randn(tokens.shape, dtype=tokens.dtype, device=device,
                              generator=torch.Generator(device=device).manual_seed(1))

    def experts_step():
        y, _ = layer.experts(tokens.detach().requires_grad_(), counts, probs)
        y.backward(expert_grad)

    return result, {"layer": layer_step, "experts": experts_step}


def _stack_sequential(dw: dict) -> dict:
    """SequentialMLP's per-expert weight gradients stacked as the grouped experts hold them."""
    out = {}
    for fc in ("linear_fc1", "linear_fc2"):
        names = sorted((n for n in dw if n.endswith(f"{fc}.weight")), key=lambda n: int(n.split(".")[1]))
        out[f"{fc}.weight"] = __import__("torch").stack([dw[n] for n in names])
    return out


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference of output, input gradient and expert weight gradients."""
    dw_a = a["dw"] if "linear_fc1.weight" in a["dw"] else _stack_sequential(a["dw"])
    dw_b = b["dw"] if "linear_fc1.weight" in b["dw"] else _stack_sequential(b["dw"])
    diffs = [float((a[k] - b[k]).abs().max()) for k in ("out", "dx")]
    diffs += [float((dw_a[k] - dw_b[k]).abs().max()) for k in dw_a]
    return max(diffs)


def measure(opts) -> dict:
    """Every (precision, experts) variant; the grouped / sequential ratios and differences."""
    import torch

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.quiet import silenced
    from megatron_dsv3.train.processes import free_port

    on_cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if on_cpu else "cuda")
    preset = layer_preset(opts)
    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        with silenced(opts.verbose):
            parallel.init_parallel(ParallelLayout(), cpu=on_cpu, preset=preset)
    g = torch.Generator(device=device).manual_seed(0)
    hidden32 = torch.randn(opts.tokens, 1, opts.hidden, device=device, generator=g)
    grad32 = torch.randn(hidden32.shape, device=device, generator=g)
    report = {"device": torch.cuda.get_device_name() if not on_cpu else f"CPU ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "shape": {k: getattr(opts, k) for k in ("tokens", "experts", "topk", "hidden", "ffn")},
              "variants": [], "ratios": {}}
    flops = 3 * 2 * 3 * opts.tokens * opts.topk * opts.hidden * opts.ffn  # fwd + bwd, three GEMMs, gate+up+down
    precisions = opts.precisions or (["bf16", "fp8"] if not on_cpu else ["fp32", "bf16", "fp8"])
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        hidden, grad = hidden32.to(dtype), grad32.to(dtype)
        results, steps = {}, {}
        for experts in EXPERTS:
            with silenced(opts.verbose):
                layer = build_layer(preset, experts, precision, on_cpu)
            results[experts], fns = prepare_variant(layer, hidden, grad)
            steps.update({(experts, kind): fn for kind, fn in fns.items()})
        times = _interleaved(steps, device, opts.warmup, opts.repeats)
        for experts in EXPERTS:
            r = results[experts]
            r["layer_s"], r["experts_s"] = times[(experts, "layer")], times[(experts, "experts")]
            report["variants"].append({
                "precision": precision + (" (emulated)" if precision == "fp8" and on_cpu else ""), "experts": experts,
                "experts_ms": r["experts_s"] * 1e3, "layer_ms": r["layer_s"] * 1e3,
                "tokens_per_s": opts.tokens / r["layer_s"], "experts_tflops": flops / r["experts_s"] / 1e12,
                "routed_tokens": r["routed_tokens"], "empty_experts": r["empty_experts"]})
        del steps
        if not on_cpu:
            torch.cuda.empty_cache()
        s, gr = results["sequential"], results["grouped"]
        report["ratios"][precision] = {"experts_speedup": s["experts_s"] / gr["experts_s"],
                                       "layer_speedup": s["layer_s"] / gr["layer_s"],
                                       "max_abs_difference": max_difference(gr, s)}
    report["target"] = "experts_speedup >= 0.9 on CPU" if on_cpu else "experts_speedup >= 3 at 64 experts"
    return report


def print_report(report: dict) -> None:
    shape = report["shape"]
    print(f"MoE layer: {shape['experts']} experts, top-{shape['topk']}, hidden {shape['hidden']}, expert width"
          f" {shape['ffn']}, {shape['tokens']} tokens; {report['device']}, torch {report['torch']}")
    print(f"{'precision':<16}{'experts':<12}{'experts ms':>11}{'layer ms':>10}{'tokens/s':>11}{'TFLOP/s':>9}")
    for v in report["variants"]:
        print(f"{v['precision']:<16}{v['experts']:<12}{v['experts_ms']:>11.1f}{v['layer_ms']:>10.1f}"
              f"{v['tokens_per_s']:>11,.0f}{v['experts_tflops']:>9.2f}")
    for precision, r in report["ratios"].items():
        print(f"{precision}: grouped / sequential speed, experts {r['experts_speedup']:.2f}x, layer"
              f" {r['layer_speedup']:.2f}x; max |grouped - sequential| {r['max_abs_difference']:.3g}")
    print(f"target: {report['target']}")


def train_throughput(recipe: str, steps: int, rounds: int) -> dict:
    """``megatron-dsv3 train RECIPE`` with sequential and with grouped experts, alternating, ``rounds``
    runs each of ``steps`` steps: the median tokens/s its progress lines report (from step 3 on)."""
    import re
    import subprocess
    import sys
    import tempfile

    rates = {experts: [] for experts in EXPERTS}
    for _ in range(rounds):
        for experts in EXPERTS:
            with tempfile.TemporaryDirectory(prefix="moe-layer-train-") as run:
                done = subprocess.run(
                    [sys.executable, "-m", "megatron_dsv3.cli", "train", recipe, f"model.experts={experts}",
                     f"training.train_iters={steps}", f"checkpoint.save={run}", f"checkpoint.load={run}",
                     f"checkpoint.save_interval={10 * steps}"],
                    capture_output=True, text=True, check=True)
            for line in done.stdout.splitlines():
                match = re.search(r"step (\d+)/\d+ \| loss \S+ \| ([\d,]+) tokens/s", line)
                if match and int(match.group(1)) >= 3:
                    rates[experts].append(float(match.group(2).replace(",", "")))
    medians = {experts: statistics.median(r) for experts, r in rates.items()}
    return {"recipe": recipe, "steps": steps, "rounds": rounds, "tokens_per_s": medians,
            "grouped_over_sequential": medians["grouped"] / medians["sequential"]}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tokens", type=int, default=4096)
    cli.add_argument("--experts", type=int, default=64)
    cli.add_argument("--topk", type=int, default=6)
    cli.add_argument("--hidden", type=int, default=1024)
    cli.add_argument("--ffn", type=int, default=256)
    cli.add_argument("--warmup", type=int, default=1)
    cli.add_argument("--repeats", type=int, default=5)
    cli.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp8"), default=None,
                     help="default: bf16 and fp8 on a GPU; fp32 (what CPU runs train in), bf16 and fp8 on CPU")
    cli.add_argument("--train", default=None, metavar="RECIPE",
                     help="also time `megatron-dsv3 train RECIPE` (e.g. dsv3-tiny-cpu, the default one) with"
                     " sequential and grouped experts, alternating, and print the ratio")
    cli.add_argument("--train-steps", type=int, default=30)
    cli.add_argument("--train-rounds", type=int, default=2)
    cli.add_argument("--skip-layer", action="store_true", help="only the --train comparison")
    cli.add_argument("--json", default=None, help="also write the report here")
    cli.add_argument("--verbose", action="store_true", help="show Megatron's logging")
    opts = cli.parse_args()

    from megatron_dsv3.testing.quiet import quiet_megatron

    quiet_megatron(opts.verbose)
    report = {} if opts.skip_layer else measure(opts)
    if report:
        print_report(report)
    if opts.train:
        report["train"] = t = train_throughput(opts.train, opts.train_steps, opts.train_rounds)
        print(f"megatron-dsv3 train {t['recipe']} ({t['steps']} steps, {t['rounds']} alternating runs each):"
              f" sequential {t['tokens_per_s']['sequential']:,.0f} tokens/s, grouped {t['tokens_per_s']['grouped']:,.0f}"
              f" tokens/s; grouped / sequential = {t['grouped_over_sequential']:.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
