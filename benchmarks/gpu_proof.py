"""The GPU proof run: one command that proves the PyTorch GPU path on one H100 or H200, in under 8 minutes.

The GPU test machine has Python 3.12 and torch but neither megatron-core nor Transformer Engine, and
no network; the wheels travel with the command, in ``.whl/`` (at most 64 MiB at a time).

On the GPU machine (the repository as the working directory)::

    python3 benchmarks/gpu_proof.py --out OUT

1. unpacks the carried wheels (megatron-core, this package, pytest) into a temporary folder on
   ``PYTHONPATH`` (no pip, no network; torch and the rest are the machine's);
2. runs the GPU tests: ``tests/test_gpu.py`` (grouped against sequential experts on CUDA, FP8 grouped
   experts against the emulation, ``torch._scaled_mm`` with empty and odd-sized operands, DualPipe's
   communication-stream set-up on real streams) and ``tests/test_fp8_gpu.py``;
3. times DeepSeek-V3's GEMM shapes in BF16 and FP8 (``benchmarks/gpu_fp8.py``);
4. times one MoE layer, sequential against grouped experts, BF16 and FP8 (``benchmarks/moe_layer.py``);
5. times dsv3-proxy training steps with sequential and grouped experts, BF16 and FP8, with tokens/s,
   TFLOP/s and MFU against a BF16 matrix product measured in the same run (``benchmarks/gpu_step.py``);

each step a process of its own with a time limit, its log and JSON in ``OUT``; then it writes
``OUT/gpu_proof.md`` (the table ``docs/benchmarks.md`` takes) and ``OUT/gpu_proof.json``.  A step
that fails or runs out of time is reported as such and the others still run.

On any machine, ``python benchmarks/gpu_proof.py --plan`` builds ``.whl/`` (this package with ``pip
wheel``, the others with ``pip download``), lists what the run will do, and checks that the wheels
total under 64 MiB, what the GPU machine accepts at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
CARRY_LIMIT = 64 * 2**20
# What the GPU machine has, and what it lacks (carried).
ON_THE_MACHINE = {"torch", "numpy", "packaging", "pyyaml", "sentencepiece", "psutil", "safetensors"}
DOWNLOADS = ["megatron-core==0.19.2", "pytest==8.4.2", "pluggy==1.6.0", "iniconfig==2.3.0", "pygments==2.19.2"]
BUDGET_S = 470  # the whole run, install included: under 8 minutes

# (name, seconds allowed, command after `python3`, JSON it writes or None)
STEPS = [
    ("tests", 130, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                    "tests/test_fp8_gpu.py"], None),
    ("gemms", 75, ["benchmarks/gpu_fp8.py", "--repeats", "10", "--json", "{out}/gemms.json"], "gemms.json"),
    ("moe_layer", 70, ["benchmarks/moe_layer.py", "--repeats", "5", "--json", "{out}/moe_layer.json"], "moe_layer.json"),
    ("proxy_steps", 185, ["benchmarks/gpu_step.py", "--steps", "5", "--warmup", "2", "--json",
                          "{out}/proxy_steps.json"], "proxy_steps.json"),
]


# ---- --plan: the wheels and the steps ----
def build_wheels() -> list[pathlib.Path]:
    """``.whl/``: this package built now, the downloads kept once fetched."""
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("megatron_dsv3-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(WHEELS), str(ROOT)],
                   check=True, capture_output=True)
    missing = [d for d in DOWNLOADS if not list(WHEELS.glob(d.split("==")[0].replace("-", "_") + "-" + d.split("==")[1] + "-*.whl"))]
    if missing:
        subprocess.run(pip + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                              "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "-d", str(WHEELS),
                              *missing], check=True, capture_output=True)
    return sorted(WHEELS.glob("*.whl"))


def unmet_requirements(wheels: list[pathlib.Path]) -> list[str]:
    """Each carried wheel's ``Requires-Dist`` (markers evaluated for Python 3.12 on Linux, no extras) that
    neither a carried wheel nor the machine gives."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    have = {canonicalize_name(n) for n in ON_THE_MACHINE} | {canonicalize_name(w.name.split("-")[0]) for w in wheels}
    environment = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
                   "platform_system": "Linux", "extra": ""}
    unmet = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if not line.startswith("Requires-Dist:"):
                    continue
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker is not None and not requirement.marker.evaluate(environment):
                    continue
                if canonicalize_name(requirement.name) not in have:
                    unmet.add(f"{requirement.name} (for {wheel.name.split('-')[0]})")
    return sorted(unmet)


def plan() -> int:
    wheels = build_wheels()
    total = sum(w.stat().st_size for w in wheels)
    print("Carried wheels (.whl/, unpacked onto PYTHONPATH on the GPU machine):")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    ok = total < CARRY_LIMIT
    print(f"  {total / 2**20:7.2f} MiB  in all (limit 64 MiB: {'ok' if ok else 'TOO LARGE'})")
    unmet = unmet_requirements(wheels)
    print(f"  requirements neither carried nor on the machine: {', '.join(unmet) if unmet else 'none'}\n")
    ok = ok and not unmet
    print(f"On the GPU machine, within {BUDGET_S} s (each step a process with its own time limit):")
    print("  install    5 s  unpack the wheels into a temporary folder, on PYTHONPATH for every step")
    for name, limit, argv, _ in STEPS:
        print(f"  {name:<9} {limit:3d} s  python3 {' '.join(a.replace('{out}', 'OUT') for a in argv)}")
    print("  report        OUT/gpu_proof.md (for docs/benchmarks.md) and OUT/gpu_proof.json\n")
    print("Command (the device tool: carry ['.whl'], output in $OUT):\n  python3 benchmarks/gpu_proof.py --out $OUT")
    return 0 if ok else 1


# ---- the run ----
def install(site: pathlib.Path) -> dict:
    """Unpack the carried wheels into ``site`` (a wheel is a zip of importable files; no pip, no network)."""
    import zipfile

    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"ok": False, "error": "no wheels in .whl/: run `python benchmarks/gpu_proof.py --plan` first and carry .whl"}
    try:
        for wheel in wheels:
            zipfile.ZipFile(wheel).extractall(site)
    except (OSError, zipfile.BadZipFile) as err:
        return {"ok": False, "wheels": [w.name for w in wheels], "error": f"{type(err).__name__}: {err}"}
    return {"ok": True, "wheels": [w.name for w in wheels], "error": ""}


def run_step(name: str, limit: float, argv: list[str], out: pathlib.Path, env: dict) -> dict:
    command = [sys.executable] + [a.replace("{out}", str(out)) for a in argv]
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"out of time ({limit:.0f} s)"
    tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    return {"status": status, "seconds": time.monotonic() - start, "tail": tail}


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _load(out: pathlib.Path, name: str | None):
    if name and (out / name).exists():
        return json.loads((out / name).read_text())
    return None


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"### GPU proof: {env.get('device', 'no GPU')} (compute capability {env.get('capability', '-')}), torch"
             f" {env['torch']}, CUDA {env['cuda']}, {env['date']}", "",
             "| step | result | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['status']} | {r['seconds']:.0f} |" for name, r in report["steps"].items()]
    gemms = report["results"].get("gemms")
    if gemms:
        lines += ["", "DeepSeek-V3's GEMM shapes (TFLOP/s; FP8 = block-wise 1x128 by 128x128 on torch._scaled_mm):", "",
                  "| shape | M | K | N | BF16 | FP8 | FP8 incl. quantising | FP8 / BF16 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['shape']} | {g['m']} | {g['k']} | {g['n']} | {g['bf16_tflops']:.0f} | {g['fp8_tflops']:.0f} |"
                  f" {g['fp8_with_quantize_tflops']:.0f} | {g['speedup']:.2f} |" for g in gemms["gemms"]]
        large = [g["speedup"] for g in gemms["gemms"] if g["large"]]
        lines += ["", f"Dense shapes: FP8 / BF16 = {min(large):.2f} to {max(large):.2f} (target >= 1.5).", "",
                  "| quantizer (16384 x 7168 bf16) | GB/s | of device copy |", "| --- | --- | --- |"]
        lines += [f"| {q['what']} | {q['gb_per_s']:.0f} | {100 * q['of_copy']:.0f}% |" for q in gemms["quantizer"]]
    moe = report["results"].get("moe_layer")
    if moe:
        s = moe["shape"]
        lines += ["", f"One MoE layer ({s['experts']} experts, top-{s['topk']}, hidden {s['hidden']}, width {s['ffn']},"
                  f" {s['tokens']} tokens), forward + backward:", "",
                  "| precision | experts | experts ms | layer ms | tokens/s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {v['precision']} | {v['experts']} | {v['experts_ms']:.2f} | {v['layer_ms']:.2f} |"
                  f" {v['tokens_per_s']:,.0f} |" for v in moe["variants"]]
        lines += [""] + [f"{p}: grouped / sequential = {r['experts_speedup']:.2f}x (experts), {r['layer_speedup']:.2f}x"
                         f" (layer); max difference {r['max_abs_difference']:.3g}. " for p, r in moe["ratios"].items()]
        lines += ["Target: grouped >= 3x sequential at 64 experts."]
    steps = report["results"].get("proxy_steps")
    if steps:
        lines += ["", f"dsv3-proxy training steps ({steps['sequences_per_step']} x {steps['seq']} tokens; MFU against the"
                  f" measured BF16 GEMM, {steps['bf16_gemm_tflops']:.0f} TFLOP/s):", "",
                  "| variant | step ms | tokens/s | TFLOP/s | MFU | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
        for v in steps["variants"]:
            if "error" in v:
                lines.append(f"| {v['variant']} | failed: {v['error'][:80]} | | | | |")
            else:
                lines.append(f"| {v['variant']} | {v['step_s'] * 1e3:.0f} | {v['tokens_per_s']:,.0f} |"
                             f" {v['model_tflops']:.0f} | {100 * v['mfu']:.1f}% | {v['peak_memory_gib']:.1f} |")
        lines += ["", "Target: bf16:grouped MFU >= 45%."]
    return "\n".join(lines) + "\n"


def prove(out: pathlib.Path, budget: float) -> int:
    deadline = time.monotonic() + budget
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "steps": {}, "results": {}}
    site = pathlib.Path(tempfile.mkdtemp(prefix="gpu-proof-site-"))
    start = time.monotonic()
    installed = install(site)
    report["steps"]["install"] = {"status": "passed" if installed["ok"] else "failed", "seconds": time.monotonic() - start,
                                  "tail": installed["error"].splitlines()[-15:]}
    if installed["ok"]:
        env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", TORCH_CPP_LOG_LEVEL="ERROR")
        for name, limit, argv, result in STEPS:
            left = deadline - time.monotonic()
            if left < 20:
                report["steps"][name] = {"status": "skipped (the 8-minute budget is spent)", "seconds": 0, "tail": []}
                continue
            step_env = dict(env, TORCHDYNAMO_DISABLE="1") if name == "tests" else env
            report["steps"][name] = run_step(name, min(limit, left), argv, out, step_env)
            report["results"][name] = _load(out, result)
            print(f"{name}: {report['steps'][name]['status']} ({report['steps'][name]['seconds']:.0f} s)", flush=True)
    (out / "gpu_proof.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_proof.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["status"] == "passed" for r in report["steps"].values()) else 1


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--plan", action="store_true", help="build .whl/, list the steps, check the 64 MiB limit")
    cli.add_argument("--out", default=os.environ.get("OUT", "gpu-proof"), help="where logs, JSON and the table go")
    cli.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    opts = cli.parse_args()
    if opts.plan:
        sys.exit(plan())
    sys.exit(prove(pathlib.Path(opts.out).resolve(), opts.budget))


if __name__ == "__main__":
    main()
