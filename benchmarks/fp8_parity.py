"""FP8 training fidelity: the emulated ``deepseek`` recipe against the unquantised baseline.

DeepSeek-V3 reports a relative loss error below 0.25% for FP8 against BF16 training (section 3.3,
FACTS.md).  This trains ``dsv3-tiny`` (or any preset) on the embedded corpus three times from the
same seed and the same batches: the baseline (BF16 on a GPU; fp32 on CPU, where Megatron's BF16
path cannot run), FP8 with the emulated ``deepseek`` recipe (fp32 scales amax/448), and FP8 with
``te-blockwise``-style power-of-two scales.  It prints every step's losses, the relative error of
the mean loss over the last 20 steps (``--json`` key ``final_relative_loss_error``: deepseek vs the
baseline), and saves a plot of the curves and of the relative error.

    python benchmarks/fp8_parity.py [--steps 300] [--plot docs/fp8_parity.png] [--json out.json] [--verbose]

Each run is its own process (``megatron_dsv3.testing``'s harness, built as ``megatron-dsv3 train``
builds models), so initial weights are identical; the FP8 runs use the emulation, the reference
the tests use (``megatron_dsv3.fp8.emulation``).  matplotlib is needed only for ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

RUNS = {
    "baseline": (),
    "deepseek": ("--dsv3-fp8", "deepseek", "--dsv3-fp8-moments", "fp32", "--dsv3-fp8-backend", "emulated"),
    "te-blockwise": ("--dsv3-fp8", "te-blockwise", "--dsv3-fp8-backend", "emulated"),
}
LAST = 20


def corpus_batches(preset_name: str, steps: int, batch: int):
    """``steps`` batches of ``batch`` sequences of ``seq_length + 1`` tokens, consecutive in the
    embedded corpus (the same for every run)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_dsv3.data import prepare_dataset
    from megatron_dsv3.model.presets import get_preset

    length = get_preset(preset_name).seq_length + 1
    dataset = IndexedDataset(prepare_dataset())
    need, chunks = steps * batch * length, []
    for i in range(len(dataset)):
        chunks.append(torch.as_tensor(dataset[i].astype("int64")))
        if sum(c.numel() for c in chunks) >= need:
            break
    stream = torch.cat(chunks)
    if stream.numel() < need:
        raise SystemExit(f"the embedded corpus has {stream.numel()} tokens, fewer than {need}: lower --steps")
    return stream[:need].view(steps, batch, length)


def train(preset_name, extra, batches, lr: float, warmup: int, device: str, verbose: bool):
    """Per-step losses of one run (in its own process)."""
    import torch

    from megatron_dsv3.parallel.layout import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.quiet import quiet_megatron, silenced

    quiet_megatron(verbose)
    cpu = device == "cpu"
    layout = ParallelLayout()
    parallel.init_parallel(layout, seed=1234, cpu=cpu, preset=preset_name)
    precision = () if cpu else ("--bf16",)
    with silenced(verbose):
        config, _, chunks = parallel.build_chunks(preset_name, layout, extra_args=tuple(extra) + precision, cpu=cpu)
        optimizer = parallel.build_optimizer(chunks, lr=lr, weight_decay=0.1, clip_grad=1.0, bf16=not cpu)
    losses, seconds = [], []
    for step, tokens in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        start = time.perf_counter()
        with silenced(verbose):
            out = parallel.train_step(chunks, config, tokens.to("cpu" if cpu else "cuda"), 2, optimizer=optimizer)
        seconds.append(time.perf_counter() - start)
        losses.append(out["loss_sum"] / out["tokens"])
        if not torch.isfinite(torch.tensor(losses[-1])):
            break
    return {"losses": losses, "step_seconds": sum(seconds) / len(seconds)}


def _mean_last(losses: list[float]) -> float:
    tail = losses[-LAST:]
    return sum(tail) / len(tail)


def _relative(a: list[float], b: list[float]) -> float:
    return abs(_mean_last(a) - _mean_last(b)) / abs(_mean_last(b))


def plot(path: str, results: dict, baseline_name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); pip install matplotlib")
        return
    base = results["baseline"]["losses"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, r in results.items():
        label = baseline_name if name == "baseline" else f"FP8 {name} (emulated)"
        top.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label, linewidth=1)
    top.set_ylabel("training loss")
    top.legend()
    window = 10
    for name, r in results.items():
        if name == "baseline":
            continue
        rel = [abs(a - b) / b * 100 for a, b in zip(r["losses"], base)]
        smooth = [sum(rel[max(0, i - window + 1):i + 1]) / len(rel[max(0, i - window + 1):i + 1]) for i in range(len(rel))]
        bottom.plot(range(1, len(rel) + 1), smooth, label=f"{name}: |FP8 - baseline| / baseline ({window}-step mean)")
    bottom.axhline(0.25, color="red", linestyle="--", linewidth=1, label="DeepSeek-V3's bar: 0.25%")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative loss error (%)")
    bottom.legend()
    fig.suptitle(f"FP8 block-wise (emulated) vs {baseline_name.split(' (')[0]}: same seed, same batches")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"plot: {path}")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--preset", default="dsv3-tiny")
    cli.add_argument("--steps", type=int, default=300)
    cli.add_argument("--batch", type=int, default=8, help="sequences per step (micro-batches of 2)")
    cli.add_argument("--lr", type=float, default=2e-3)
    cli.add_argument("--warmup", type=int, default=30)
    cli.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cli.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    cli.add_argument("--plot", default=None, help="save the curves here (PNG)")
    cli.add_argument("--json", default=None, help="write the results here")
    cli.add_argument("--verbose", action="store_true")
    opts = cli.parse_args()
    if "baseline" not in opts.runs:
        opts.runs.insert(0, "baseline")

    from megatron_dsv3.testing.distributed import run_distributed
    from megatron_dsv3.testing.quiet import quiet_megatron

    quiet_megatron(opts.verbose)
    batches = corpus_batches(opts.preset, opts.steps, opts.batch)
    baseline_name = "fp32 baseline (CPU: Megatron's BF16 needs a GPU)" if opts.device == "cpu" else "BF16 baseline"
    results = {}
    for name in opts.runs:
        results[name] = run_distributed(train, 1, opts.preset, RUNS[name], batches, opts.lr, opts.warmup,
                                        opts.device, opts.verbose, timeout=6 * 3600)[0]
    base = results["baseline"]["losses"]
    names = [n for n in opts.runs if n != "baseline"]
    print(f"{'step':>5} {'baseline':>9} " + " ".join(f"{n:>13} {'rel %':>7}" for n in names))
    for i, b in enumerate(base):
        cells = []
        for n in names:
            loss = results[n]["losses"][i] if i < len(results[n]["losses"]) else float("nan")
            cells.append(f"{loss:13.4f} {abs(loss - b) / b * 100:7.3f}")
        print(f"{i + 1:5d} {b:9.4f} " + " ".join(cells))
    summary = {"preset": opts.preset, "steps": opts.steps, "tokens_per_step": opts.batch * (batches.shape[-1] - 1),
               "baseline": baseline_name, "last_steps_averaged": LAST,
               "mean_loss_last": {n: _mean_last(r["losses"]) for n, r in results.items()},
               "step_seconds": {n: r["step_seconds"] for n, r in results.items()}}
    for n in names:
        summary[f"relative_loss_error_{n}"] = _relative(results[n]["losses"], base)
    if "deepseek" in names:
        summary["final_relative_loss_error"] = summary["relative_loss_error_deepseek"]
    if "deepseek" in names and "te-blockwise" in names:
        summary["relative_loss_error_pow2_vs_deepseek"] = _relative(results["te-blockwise"]["losses"],
                                                                    results["deepseek"]["losses"])
    print()
    print(f"mean loss over the last {LAST} steps: " + ", ".join(f"{n} {v:.4f}" for n, v in summary["mean_loss_last"].items()))
    for n in names:
        verdict = "below" if summary[f"relative_loss_error_{n}"] < 0.0025 else "ABOVE"
        print(f"relative loss error {n} vs {baseline_name}: {summary[f'relative_loss_error_{n}'] * 100:.3f}%"
              f" ({verdict} DeepSeek's 0.25%)")
    if "relative_loss_error_pow2_vs_deepseek" in summary:
        print(f"te-blockwise (power-of-two scales) vs deepseek: {summary['relative_loss_error_pow2_vs_deepseek'] * 100:.3f}%")
    print("seconds per step: " + ", ".join(f"{n} {v:.2f}" for n, v in summary["step_seconds"].items()))
    if opts.plot:
        plot(opts.plot, results, baseline_name)
    if opts.json:
        with open(opts.json + ".tmp", "w") as f:
            json.dump({"summary": summary, "losses": {n: r["losses"] for n, r in results.items()}}, f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)


if __name__ == "__main__":
    main()
