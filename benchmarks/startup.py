"""Start-up cost of the hook: ``python -c pass`` with megatron-dsv3 installed against without.

"Without" is the same interpreter with ``megatron-dsv3.pth`` set aside for the measurement (it is
put back afterwards, even on error); runs alternate, and the medians are compared.  Also checks
with ``python -X importtime`` that no module of ours is imported at start-up (the .pth line only
registers a watcher).  Target: ratio <= 1.03 (and well under 3 ms for a process that never imports
Megatron).  Measure a regular install: an editable install adds its own finder's cost to both.

    python benchmarks/startup.py [--runs 40]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time_once() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def _hook_import_microseconds() -> int | None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    for line in out.stderr.splitlines():
        match = re.search(r"\|\s*(\d+)\s*\|\s*_megatron_dsv3_hook$", line)
        if match:
            return int(match.group(1))
    return None


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--runs", type=int, default=40)
    opts = cli.parse_args()

    from megatron_dsv3.launch import hook

    pth = hook.pth_path()
    if not pth.exists():
        raise SystemExit(f"{pth} is not installed: `pip install .` or `megatron-dsv3 hook install` first")
    parked = Path(str(pth) + ".benchmark-off")
    with_hook, without_hook = [], []
    hook_us = _hook_import_microseconds()
    for _ in range(3):
        _time_once()  # warm the file cache
    try:
        for _ in range(opts.runs):
            with_hook.append(_time_once())
            os.replace(pth, parked)
            try:
                without_hook.append(_time_once())
            finally:
                os.replace(parked, pth)
    finally:
        if parked.exists():
            os.replace(parked, pth)
    a, b = statistics.median(with_hook), statistics.median(without_hook)
    print(f"python -c pass, {opts.runs} alternating runs each ({sys.executable})")
    print(f"{'':<28}{'median (ms)':>12}")
    print(f"{'with megatron-dsv3':<28}{a * 1e3:>12.2f}")
    print(f"{'without':<28}{b * 1e3:>12.2f}")
    print(f"{'difference':<28}{(a - b) * 1e3:>12.2f}")
    print(f"{'hook module imported':<28}{'no' if hook_us is None else f'yes, {hook_us / 1e3:.3f} ms':>12}")
    print(f"ratio = {a / b:.3f}  (target <= 1.03: {'met' if a / b <= 1.03 else 'NOT met'})")


if __name__ == "__main__":
    main()
