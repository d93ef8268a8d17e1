"""Checkpoint conversion: throughput and peak memory, HF -> Megatron and back, at two sizes.

A synthetic HF checkpoint with DeepSeek-V3's tensor shapes (hidden 7168, MLA ranks 1536/512, experts
of 2048, 128 heads; fewer layers, experts and vocabulary rows) is written at about 1 GB and about
4 GB, in BF16 and in FP8 E4M3 with 128x128 ``weight_scale_inv`` blocks (as released).  Each
conversion runs in a fresh process (``megatron-dsv3 convert``'s own code path) that reports its
wall time and peak resident memory (``VmHWM``, since the process started).

Targets on 2 cores: >= 200 MB/s; peak RSS under 2 GB plus the largest tensor, the same at both
sizes.  MB/s counts the BF16 bytes of the model (what is written on import, read on export) over
the conversion's time (the model build on the meta device included, process start-up not).

    python benchmarks/convert.py [--sizes small,large] [--dtypes bf16,fp8] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # DeepSeek-V3 with 1 MoE layer of 2 experts / 3 MoE layers of 8 experts, 16,384 vocabulary rows.
    "small": dict(num_layers=1, num_routed_experts=2),
    "large": dict(num_layers=3, num_routed_experts=8),
}
COMMON = dict(first_k_dense=0, vocab_size=16384, num_groups=1, group_topk=1, moe_router_topk=2, mtp_num_layers=0)
SHARD_BYTES = 512 * 2**20


def preset_for(size: str):
    from megatron_dsv3.model.presets import get_preset

    return get_preset("deepseek-v3").with_overrides(name=f"dsv3-shapes-{size}", **COMMON, **SIZES[size])


def _fp8(name: str, shape) -> bool:
    """The release keeps embeddings, the head, norms and the router in BF16; projections are FP8."""
    return len(shape) == 2 and name.endswith("_proj.weight") and "eh_proj" not in name


def make_checkpoint(size: str, dtype: str, path: Path) -> dict:
    """Write the synthetic checkpoint shard by shard (memory: one shard)."""
    import torch
    from safetensors.torch import save_file

    from megatron_dsv3.convert.hf_config import hf_config_from_preset
    from megatron_dsv3.convert.run import export_plan
    from megatron_dsv3.fp8.quantize import quantize
    from megatron_dsv3.model.hf_names import name_table

    preset = preset_for(size)
    plan, _ = export_plan(preset, name_table(preset, include_mtp=False), torch.bfloat16)
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, shards, largest, model_bytes = {}, 0, {}, [], 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shards.append(name)
            shard, shard_bytes = {}, 0

    for name, shape, dt in plan:
        t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(dt)
        largest = max(largest, t.nbytes)
        model_bytes += t.nbytes
        if dtype == "fp8" and _fp8(name, shape):
            q = quantize(t.float(), (128, 128))
            tensors = {name: q.data, name + "_scale_inv": q.scale_inv}
        else:
            tensors = {name: t.contiguous()}
        for k, v in tensors.items():
            shard[k] = v
            shard_bytes += v.nbytes
        del t, tensors
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    config = hf_config_from_preset(preset)
    if dtype == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    total = sum((path / s).stat().st_size for s in shards)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"disk_bytes": total, "model_bytes": model_bytes, "largest": largest}


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from megatron_dsv3.cli import _quiet_third_party
_quiet_third_party()
from megatron_dsv3.convert import run
import megatron.core.dist_checkpointing, megatron.training.arguments  # start-up: imports, not conversion
import megatron_dsv3.model.build  # run imports the rest of the converter
def hwm():  # this process's peak RSS since exec (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = hwm()
direction, src, dst, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t1 = time.perf_counter()
if direction == "import":
    r = run.hf_to_megatron(src, dst, threads=threads, progress=False)
else:
    r = run.megatron_to_hf(src, dst, threads=threads, progress=False)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "startup": t1 - t0, "bytes": r.bytes_written,
                  "rss": hwm(), "base_rss": base}))
"""


def convert(direction: str, src: Path, dst: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, direction, str(src), str(dst), str(threads)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{direction} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--sizes", default="small,large")
    cli.add_argument("--dtypes", default="bf16,fp8")
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    a = cli.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="convert-bench-"))
    rows = []
    try:
        for size in a.sizes.split(","):
            for dtype in a.dtypes.split(","):
                case = work / f"{size}-{dtype}"
                shutil.rmtree(case, ignore_errors=True)
                t = time.perf_counter()
                info = make_checkpoint(size, dtype, case / "hf")
                made = time.perf_counter() - t
                os.sync()  # the synthetic checkpoint on disk before the clock starts
                imp = convert("import", case / "hf", case / "megatron", a.threads)
                os.sync()
                exp = convert("export", case / "megatron", case / "hf-back", a.threads)
                for direction, r in (("hf-to-megatron", imp), ("megatron-to-hf", exp)):
                    rows.append((size, dtype, direction, info, r))
                print(f"# {size} {dtype}: synthetic checkpoint {info['disk_bytes'] / 1e9:.2f} GB on disk"
                      f" (made in {made:.0f} s)", file=sys.stderr)
                shutil.rmtree(case)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'size':6} {'source':5} {'direction':15} {'model GB':>8} {'on disk GB':>10} {'seconds':>8} {'MB/s':>6}"
          f" {'start-up s':>10} {'RSS after imports GB':>20} {'peak RSS GB':>11} {'largest tensor MB':>17} {'RSS - largest GB':>16}")
    ok_speed, over = True, []
    for size, dtype, direction, info, r in rows:
        mbs = info["model_bytes"] / 1e6 / r["seconds"]
        ok_speed &= mbs >= 200
        excess = (r["rss"] - info["largest"]) / 1e9
        over.append(excess)
        disk = info["disk_bytes"] / 1e9 if direction == "hf-to-megatron" else info["model_bytes"] / 1e9
        print(f"{size:6} {dtype:5} {direction:15} {info['model_bytes'] / 1e9:8.2f} {disk:10.2f} {r['seconds']:8.1f}"
              f" {mbs:6.0f} {r['startup']:10.1f} {r['base_rss'] / 1e9:20.2f} {r['rss'] / 1e9:11.2f} {info['largest'] / 1e6:17.0f} {excess:16.2f}")
    print(f"throughput >= 200 MB/s: {'met' if ok_speed else 'NOT met'}; peak RSS - largest tensor <= 2 GB: "
          f"{'met' if max(over) <= 2 else 'NOT met'} (max {max(over):.2f} GB)")


if __name__ == "__main__":
    main()
