"""dsv3-proxy training steps on one GPU (bf16, local backend): tokens/s, model TFLOP/s and MFU.

For one H200 whenever a session has one (under 8 minutes).  The GPU machine has torch but neither
megatron-core nor Transformer Engine: carry the wheels (see docs/benchmarks.md) and run

    python benchmarks/gpu_step.py [--steps 10] [--seq 4096] [--micro-batch 1] [--micro-batches 4] [--verbose]

MFU is model FLOPs per second (training FLOPs per token from ``megatron_dsv3.accounting``,
MTP included, times tokens per second) over the bf16 matrix-multiply rate measured on the same GPU
in the same run (an 8192^3 ``torch.matmul``).  Target: MFU >= 45%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def gemm_tflops(size: int = 8192, repeats: int = 10) -> float:
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


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=10)
    cli.add_argument("--warmup", type=int, default=3)
    cli.add_argument("--seq", type=int, default=4096)
    cli.add_argument("--micro-batch", type=int, default=1)
    cli.add_argument("--micro-batches", type=int, default=4)
    cli.add_argument("--preset", default="dsv3-proxy")
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
        _, _, chunks = parallel.build_chunks(
            preset, layout, cpu=False, extra_args=("--bf16", "--micro-batch-size", str(opts.micro_batch)),
        )
        optimizer = parallel.build_optimizer(chunks, lr=1e-4, bf16=True)
    batch = opts.micro_batch * opts.micro_batches
    tokens = parallel.fixed_tokens(preset, batch, seed=0).cuda()
    times = []
    for step in range(opts.warmup + opts.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = parallel.train_step(chunks, chunks[0].config, tokens, opts.micro_batch, optimizer=optimizer)
        torch.cuda.synchronize()
        if step >= opts.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens_per_s = batch * opts.seq / step_time
    counts = count(preset)
    flops = counts.flops_per_token + counts.mtp_flops_per_token
    model_tflops = flops * tokens_per_s / 1e12
    print(f"{preset.name}: {counts.total_params / 1e9:.2f}B parameters, seq {opts.seq}, "
          f"{batch} sequences per step, bf16, local backend, {torch.cuda.get_device_name()}")
    print(f"{'measured bf16 GEMM':<28}{peak:>10.1f} TFLOP/s")
    print(f"{'median step':<28}{step_time * 1e3:>10.1f} ms")
    print(f"{'tokens/s':<28}{tokens_per_s:>10,.0f}")
    print(f"{'model TFLOP/s':<28}{model_tflops:>10.1f}")
    print(f"{'MFU (vs measured GEMM)':<28}{100 * model_tflops / peak:>9.1f} %   (target >= 45%)")
    print(f"{'final loss':<28}{result['loss_sum'] / max(result['tokens'], 1):>10.4f}")
    print(f"{'peak memory':<28}{torch.cuda.max_memory_allocated() / 2**30:>10.1f} GiB")


if __name__ == "__main__":
    main()
