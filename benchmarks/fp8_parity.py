"""FP8 training fidelity: emulated block-wise FP8 against BF16 training, over several seeds.

DeepSeek-V3 reports a relative loss error below 0.25% for FP8 against BF16 training (arXiv
2412.19437v2, section 3.3).  This trains ``dsv3-tiny`` (or any preset) on the embedded corpus with Megatron's BF16
path (bf16 parameters and activations, fp32 gradients and master weights; on CPU too, through CPU
mode) and with FP8 on top of it: the emulated ``deepseek`` recipe (fp32 scales ``amax / 448``)
and, with ``--runs``, ``te-blockwise`` (power-of-two scales).  Every variant runs once per seed;
a seed sets the initial weights, and all runs see the same batches in the same order, so that two
runs can be compared step by step.

Per FP8 variant and seed it reports the relative error against BF16 of the same seed: of the mean
loss over the last 20 steps (``final``), and the largest at any single step (``per_step_max``).
Next to them the seed-to-seed spread of BF16 itself, the same two measures between BF16 runs of
different seeds: an FP8 gap inside that spread is within what a different initialisation moves.
``--plot`` draws the mean curves with their min-max band over seeds, and the relative errors
with theirs.

    python benchmarks/fp8_parity.py [--steps 120] [--batch 4] [--seeds 3] [--runs deepseek ...] [--jobs 2]
                                    [--plot docs/fp8_parity.png] [--json out.json]

AdamW moments: the ``deepseek`` recipe keeps them in BF16 through Megatron's precision-aware
optimizer, which needs Transformer Engine's FusedAdam and the distributed optimizer
(:func:`megatron_dsv3.fp8.support.refusals` says why it cannot run here: never on CPU, and this
harness's optimizer is the non-distributed one).  The benchmark emulates them: the optimizer keeps
fp32 moments and rounds them to BF16 after every step, which is what FusedAdam with
``exp_avg_dtype=bf16`` stores (it computes in fp32 from the stored values); the output says so.
``deepseek-fp32-moments`` is the recipe with fp32 moments.

Each run is its own process (``megatron_dsv3.testing``'s harness, built as ``megatron-dsv3 train``
builds models); FP8 uses the emulation, the reference the tests use (``megatron_dsv3.fp8.emulation``).
matplotlib is needed only for ``--plot``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

FP8 = {  # variant: (FP8 recipe, AdamW moments; None = the recipe's)
    "deepseek": ("deepseek", None),
    "deepseek-fp32-moments": ("deepseek", "fp32"),
    "te-blockwise": ("te-blockwise", None),
}
LAST = 20
BAR = 0.0025  # DeepSeek-V3's: relative loss error below 0.25%


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


def fp8_args(variant: str, device: str, num_layers: int) -> tuple[tuple[str, ...], bool, str, str]:
    """An FP8 variant's ``--dsv3-fp8*`` options, whether the benchmark rounds the moments to BF16,
    which moments it runs with, and why (empty when there is nothing to explain)."""
    from megatron_dsv3.fp8.recipes import named_recipe
    from megatron_dsv3.fp8.support import refusals
    from megatron_dsv3.model.backends import transformer_engine_status

    name, moments = FP8[variant]
    recipe = named_recipe(name)
    moments = moments or recipe.moments
    args = ("--dsv3-fp8", name, "--dsv3-fp8-backend", "emulated", "--dsv3-fp8-moments", "fp32")
    if moments == "fp32":
        return args, False, "fp32", "" if recipe.moments == "fp32" else f"(the recipe's are {recipe.moments})"
    # The harness's optimizer is Megatron's non-distributed one, so `refusals` always finds a reason.
    te = transformer_engine_status()
    found = [r for r in refusals(recipe.with_overrides(moments=moments), "emulated", model_backend="local",
                                 device=device, capability=None, tp=1, pp=1, use_distributed_optimizer=False,
                                 num_layers=num_layers, te_usable=te.usable, te_reason=te.reason)
             if r.key == "fp8.moments"]
    why = found[0].problem if found else "the benchmark's optimizer is Megatron's non-distributed one"
    return args, True, "bf16 (emulated)", (f"Megatron's way cannot run here ({why}); fp32 moments rounded to"
                                            " bf16 after every step instead, what FusedAdam's exp_avg_dtype=bf16 stores")


def _round_moments_to_bf16(optimizer) -> None:
    import torch

    for opt in optimizer.chained_optimizers:
        for state in opt.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(state[key].to(torch.bfloat16))


def train(preset_name, extra, batches, seed: int, lr: float, warmup: int, weight_decay: float, device: str,
          bf16_moments: bool, verbose: bool):
    """Per-step losses of one BF16 run (in its own process)."""
    import torch

    from megatron_dsv3.parallel.layout import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.quiet import quiet_megatron, silenced

    quiet_megatron(verbose)
    cpu = device == "cpu"
    layout = ParallelLayout()
    parallel.init_parallel(layout, seed=seed, cpu=cpu, preset=preset_name)
    with silenced(verbose):
        config, _, chunks = parallel.build_chunks(preset_name, layout, extra_args=tuple(extra) + ("--bf16",), cpu=cpu)
        optimizer = parallel.build_optimizer(chunks, lr=lr, weight_decay=weight_decay, clip_grad=1.0, bf16=True)
    losses, seconds, cpu_seconds = [], [], []
    for step, tokens in enumerate(batches):
        for group in optimizer.param_groups:  # as Megatron's scheduler sets them: linear warmup, no decay on 1-D
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
            group["weight_decay"] = weight_decay * group["wd_mult"]
        start, cpu_start = time.perf_counter(), time.process_time()
        with silenced(verbose):
            out = parallel.train_step(chunks, config, tokens.to("cpu" if cpu else "cuda"), 2, optimizer=optimizer)
            if bf16_moments:
                _round_moments_to_bf16(optimizer)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        losses.append(out["loss_sum"] / out["tokens"])
        if not torch.isfinite(torch.tensor(losses[-1])):
            break
    return {"losses": losses, "step_seconds": statistics.fmean(seconds), "step_cpu_seconds": statistics.fmean(cpu_seconds)}


# ---- comparisons ----
def _mean_last(losses: list[float]) -> float:
    tail = losses[-LAST:]
    return sum(tail) / len(tail)


def per_step_relative(a: list[float], b: list[float]) -> list[float]:
    """``|a - b| / b`` at every step both reached (a diverged run is shorter)."""
    return [abs(x - y) / y for x, y in zip(a, b)]


def compare(a: list[float], b: list[float]) -> dict:
    """``a`` against the reference ``b``: relative error of the final mean, and the largest per step."""
    rel = per_step_relative(a, b)
    worst = max(range(len(rel)), key=rel.__getitem__)
    return {"final": abs(_mean_last(a) - _mean_last(b)) / _mean_last(b), "per_step_max": rel[worst],
            "per_step_max_at": worst + 1, "steps": len(a)}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarise(losses: dict, seeds: list[int], variants: list[str]) -> dict:
    """Every FP8 variant against BF16 of the same seed, and BF16 seeds against each other."""
    out = {"bf16_seed_spread": {}, "fp8": {}}
    pairs = [compare(losses["bf16"][s], losses["bf16"][t]) for s, t in itertools.combinations(seeds, 2)]
    for key in ("final", "per_step_max"):
        out["bf16_seed_spread"][key] = _spread([p[key] for p in pairs])
    out["bf16_seed_spread"]["pairs"] = [f"{s}-{t}" for s, t in itertools.combinations(seeds, 2)]
    for v in variants:
        per_seed = {s: compare(losses[v][s], losses["bf16"][s]) for s in seeds}
        out["fp8"][v] = {key: _spread([c[key] for c in per_seed.values()]) for key in ("final", "per_step_max")}
        out["fp8"][v]["per_seed"] = per_seed
        out["fp8"][v]["diverged"] = [s for s in seeds if len(losses[v][s]) < len(losses["bf16"][s])]
    return out


# ---- output ----
def print_steps(losses: dict, seeds: list[int], variants: list[str]) -> None:
    names = ["bf16"] + variants
    head = " ".join(f"{n[:16]}/s{s}".rjust(20) for n in names for s in seeds)
    print(f"{'step':>5} {head}")
    steps = max(len(losses[n][s]) for n in names for s in seeds)
    for i in range(steps):
        cells = []
        for n in names:
            for s in seeds:
                run = losses[n][s]
                cells.append(f"{run[i]:20.4f}" if i < len(run) else f"{'-':>20}")
        print(f"{i + 1:5d} {' '.join(cells)}")


def _pct(spread: dict) -> str:
    return f"{spread['mean'] * 100:.3f}% ({spread['min'] * 100:.3f}-{spread['max'] * 100:.3f})"


def print_table(summary: dict, moments: dict) -> None:
    spread = summary["bf16_seed_spread"]
    print(f"\nrelative loss error against BF16 of the same seed: mean over seeds (min-max);"
          f" final = mean of the last {LAST} steps")
    print(f"| run | AdamW moments | final | per-step max |")
    print("| --- | --- | --- | --- |")
    for v, r in summary["fp8"].items():
        diverged = f" (diverged: seeds {r['diverged']})" if r["diverged"] else ""
        print(f"| FP8 {v} (emulated){diverged} | {moments[v]} | {_pct(r['final'])} | {_pct(r['per_step_max'])} |")
    print(f"| BF16 seed against BF16 seed ({', '.join(spread['pairs'])}) | fp32 | {_pct(spread['final'])}"
          f" | {_pct(spread['per_step_max'])} |")
    for v, r in summary["fp8"].items():
        worst = max(r["per_seed"].values(), key=lambda c: c["per_step_max"])
        below = sum(c["final"] < BAR for c in r["per_seed"].values())
        verdict = (f"below DeepSeek's 0.25% for all {len(r['per_seed'])} seeds" if below == len(r["per_seed"])
                   else f"below DeepSeek's 0.25% for {below} of {len(r['per_seed'])} seeds")
        noise = "inside" if r["final"]["max"] <= spread["final"]["max"] else "outside"
        print(f"{v}: final error {verdict}, {noise} the BF16 seed spread;"
              f" largest single step {worst['per_step_max'] * 100:.2f}% at step {worst['per_step_max_at']}")


def plot(path: str, losses: dict, seeds: list[int], variants: list[str], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); pip install matplotlib")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    for n in ["bf16"] + variants:
        runs = [losses[n][s] for s in seeds]
        steps = min(len(r) for r in runs)
        x = range(1, steps + 1)
        columns = [[r[i] for r in runs] for i in range(steps)]
        label = "BF16" if n == "bf16" else f"FP8 {n} (emulated)"
        line, = top.plot(x, [statistics.fmean(c) for c in columns], label=f"{label}: mean of {len(seeds)} seeds",
                         linewidth=1)
        top.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.2)
    top.set_ylabel("training loss (band: min-max over seeds)")
    top.legend()
    bands = {f"FP8 {v} vs BF16, same seed": [per_step_relative(losses[v][s], losses["bf16"][s]) for s in seeds]
             for v in variants}
    bands["BF16 seed vs BF16 seed"] = [per_step_relative(losses["bf16"][s], losses["bf16"][t])
                                       for s, t in itertools.combinations(seeds, 2)]
    for label, rels in bands.items():
        steps = min(len(r) for r in rels)
        x = range(1, steps + 1)
        columns = [[r[i] * 100 for r in rels] for i in range(steps)]
        line, = bottom.plot(x, [statistics.fmean(c) for c in columns], label=label, linewidth=1)
        bottom.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.2)
    bottom.axhline(BAR * 100, color="red", linestyle="--", linewidth=1, label="DeepSeek-V3's bar: 0.25%")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative loss difference per step (%)")
    bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"plot: {path}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--preset", default="dsv3-tiny")
    cli.add_argument("--steps", type=int, default=120)
    cli.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 1234, 1235, ...")
    cli.add_argument("--batch", type=int, default=4, help="sequences per step (micro-batches of 2)")
    cli.add_argument("--lr", type=float, default=2e-3)
    cli.add_argument("--warmup", type=int, default=20)
    cli.add_argument("--weight-decay", type=float, default=0.1)
    cli.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cli.add_argument("--runs", nargs="+", choices=list(FP8), default=["deepseek"], help="FP8 variants (BF16 always runs)")
    cli.add_argument("--jobs", type=int, default=1, help="runs at a time (each is one single-threaded process)")
    cli.add_argument("--plot", default=None, help="save the curves here (PNG)")
    cli.add_argument("--json", default=None, help="write the results here")
    cli.add_argument("--verbose", action="store_true")
    opts = cli.parse_args()
    if opts.seeds < 2:
        cli.error("--seeds must be at least 2: the seed-to-seed spread is the noise the FP8 gap is held against")

    from megatron_dsv3.model.presets import get_preset
    from megatron_dsv3.testing.distributed import run_distributed
    from megatron_dsv3.testing.quiet import quiet_megatron

    quiet_megatron(opts.verbose)
    batches = corpus_batches(opts.preset, opts.steps, opts.batch)
    seeds = [1234 + i for i in range(opts.seeds)]
    num_layers = get_preset(opts.preset).num_layers
    plan = {"bf16": ((), False)}
    moments = {}
    for v in opts.runs:
        extra, bf16_moments, moments[v], why = fp8_args(v, opts.device, num_layers)
        plan[v] = (extra, bf16_moments)
        print(f"{v}: AdamW moments {moments[v]} {why}".rstrip())
    losses, seconds, cpu_seconds = {n: {} for n in plan}, {n: [] for n in plan}, {n: [] for n in plan}

    def run(name: str, seed: int) -> None:
        extra, bf16_moments = plan[name]
        start = time.perf_counter()
        r = run_distributed(train, 1, opts.preset, extra, batches, seed, opts.lr, opts.warmup, opts.weight_decay,
                            opts.device, bf16_moments, opts.verbose, timeout=6 * 3600)[0]
        losses[name][seed] = r["losses"]
        seconds[name].append(r["step_seconds"])
        cpu_seconds[name].append(r["step_cpu_seconds"])
        print(f"{name} seed {seed}: {len(r['losses'])} steps in {time.perf_counter() - start:.0f} s"
              f" ({r['step_cpu_seconds']:.2f} s of CPU per step), final mean {_mean_last(r['losses']):.4f}", flush=True)

    # Each run is its own single-threaded process; --jobs of them at a time.
    with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        for done in [pool.submit(run, name, seed) for seed in seeds for name in plan]:
            done.result()
    print_steps(losses, seeds, opts.runs)
    summary = summarise(losses, seeds, opts.runs)
    print_table(summary, moments)
    step_seconds = {n: statistics.fmean(v) for n, v in seconds.items()}
    step_cpu_seconds = {n: statistics.fmean(v) for n, v in cpu_seconds.items()}
    print("seconds per step, wall (CPU time): " + ", ".join(f"{n} {step_seconds[n]:.2f} ({step_cpu_seconds[n]:.2f})"
                                                           for n in step_seconds))
    setup = (f"{opts.preset}, {opts.steps} steps of {opts.batch} x {batches.shape[-1] - 1} tokens, {len(seeds)} seeds,"
             f" {opts.device}, commit {_commit()}")
    if opts.plot:
        plot(opts.plot, losses, seeds, opts.runs, f"FP8 block-wise (emulated) vs BF16: {setup}")
    if opts.json:
        record = {"setup": setup, "seeds": seeds, "last_steps_averaged": LAST, "moments": moments,
                  "step_seconds": step_seconds,
                  "step_cpu_seconds": step_cpu_seconds, "mean_loss_last": {n: {s: _mean_last(r) for s, r in runs.items()}
                                                                   for n, runs in losses.items()},
                  **summary, "losses": losses}
        with open(opts.json + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)


if __name__ == "__main__":
    main()
