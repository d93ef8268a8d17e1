"""dsv3-proxy training steps on one GPU (local backend): tokens/s, model TFLOP/s and MFU, per variant.

A variant is a precision and an experts kind: ``bf16:grouped`` (the default: one ``grouped_mm`` per
projection), ``bf16:sequential`` (Megatron's ``SequentialMLP``), ``fp8:grouped``, ``fp8:sequential``
(block-wise FP8, DeepSeek's recipe, on ``torch._scaled_mm``).  All variants run in one process, one
after another, from the same seed.  The GPU machine has torch but neither megatron-core nor
Transformer Engine: ``benchmarks/gpu_proof.py`` carries the wheels and runs this; by hand:

    python benchmarks/gpu_step.py [--variants bf16:grouped bf16:sequential] [--steps 8] [--seq 4096]
                                  [--micro-batch 1] [--micro-batches 4] [--json out.json] [--verbose]

MFU is model FLOPs per second (training FLOPs per token from ``megatron_dsv3.model.accounting``,
MTP included, times tokens per second) over the bf16 matrix-multiply rate measured on the same GPU
in the same run (an 8192^3 ``torch.matmul``), for FP8 too.  Target: BF16 with grouped experts >= 45%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

VARIANTS = ("bf16:grouped", "bf16:sequential", "fp8:grouped", "fp8:sequential")


def gemm_tflops(size: int = 8192, repeats: int = 10) -> float:
    """The bf16 matrix-multiply rate of this GPU, measured now (TFLOP/s)."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def variant_args(variant: str, micro_batch: int) -> tuple[str, ...]:
    precision, experts = variant.split(":")
    extra = ["--bf16", "--micro-batch-size", str(micro_batch), "--dsv3-experts", experts]
    if precision == "fp8":  # fp32 moments: BF16 ones need Transformer Engine's FusedAdam
        extra += ["--dsv3-fp8", "deepseek", "--dsv3-fp8-backend", "pytorch", "--dsv3-fp8-moments", "fp32"]
    return tuple(extra)


def run_variant(preset, layout, variant: str, opts, tokens) -> dict:
    """Warm-up and timed steps of one variant; the model and optimizer are freed afterwards."""
    import torch

    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.quiet import silenced

    torch.manual_seed(0)
    with silenced(opts.verbose):
        _, _, chunks = parallel.build_chunks(preset, layout, cpu=False, extra_args=variant_args(variant, opts.micro_batch))
        optimizer = parallel.build_optimizer(chunks, lr=1e-4, bf16=True)
    torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for step in range(opts.warmup + opts.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = parallel.train_step(chunks, chunks[0].config, tokens, opts.micro_batch, optimizer=optimizer)
        torch.cuda.synchronize()
        if step >= opts.warmup:
            times.append(time.perf_counter() - start)
    out = {"variant": variant, "step_s": statistics.median(times), "loss": result["loss_sum"] / max(result["tokens"], 1),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    del chunks, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    cli.add_argument("--steps", type=int, default=8)
    cli.add_argument("--warmup", type=int, default=2)
    cli.add_argument("--seq", type=int, default=4096)
    cli.add_argument("--micro-batch", type=int, default=1)
    cli.add_argument("--micro-batches", type=int, default=4)
    cli.add_argument("--preset", default="dsv3-proxy")
    cli.add_argument("--json", default=None, help="also write the results here")
    cli.add_argument("--verbose", action="store_true", help="show Megatron's logging")
    opts = cli.parse_args()

    from megatron_dsv3.testing.quiet import quiet_megatron, silenced

    quiet_megatron(opts.verbose)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a GPU; on CPU use benchmarks/step_time.py")
    from megatron_dsv3.model.accounting import count
    from megatron_dsv3.model.presets import get_preset
    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.train.processes import free_port

    preset = get_preset(opts.preset).with_overrides(seq_length=opts.seq)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    layout = ParallelLayout()
    with silenced(opts.verbose):
        parallel.init_parallel(layout, cpu=False, preset=preset)
    peak = gemm_tflops()
    batch = opts.micro_batch * opts.micro_batches
    tokens = parallel.fixed_tokens(preset, batch, seed=0).cuda()
    counts = count(preset)
    flops = counts.flops_per_token + counts.mtp_flops_per_token
    print(f"{preset.name}: {counts.total_params / 1e9:.2f}B parameters, seq {opts.seq}, {batch} sequences per step,"
          f" local backend, {torch.cuda.get_device_name()}; measured bf16 GEMM {peak:.0f} TFLOP/s")
    print(f"{'variant':<18}{'step ms':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU %':>7}{'loss':>8}{'GiB':>6}")
    rows = []
    for variant in opts.variants:
        try:
            r = run_variant(preset, layout, variant, opts, tokens)
        except Exception as err:  # one variant failing (say, out of memory) still reports the others
            print(f"{variant:<18} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            rows.append({"variant": variant, "error": f"{type(err).__name__}: {err}"})
            gc.collect()
            torch.cuda.empty_cache()
            continue
        r["tokens_per_s"] = batch * opts.seq / r["step_s"]
        r["model_tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["model_tflops"] / peak
        rows.append(r)
        print(f"{variant:<18}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>11,.0f}{r['model_tflops']:>9.1f}"
              f"{100 * r['mfu']:>7.1f}{r['loss']:>8.3f}{r['peak_memory_gib']:>6.1f}")
    print("target: bf16:grouped MFU >= 45%")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": preset.name,
                       "seq": opts.seq, "sequences_per_step": batch, "bf16_gemm_tflops": peak,
                       "flops_per_token": flops, "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
