"""CPU mode: one switch that lets Megatron-Core run without a GPU, and that a GPU run never sees."""

from __future__ import annotations

import subprocess
import sys

_CONTEXT = """
import torch, megatron_dsv3.cpu as cpu
zeros = torch.zeros
with cpu.cpu_mode() as on:
    assert on and cpu.is_cpu_mode()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed, get_cuda_rng_tracker
    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    b = torch.rand(3)
    assert not torch.equal(a, b)
assert not cpu.is_cpu_mode()
assert torch.zeros is zeros
try:
    torch.zeros(1, device="cuda")
except (RuntimeError, AssertionError):
    print("RESTORED")
"""


def test_cpu_mode_context_manager_redirects_cuda_and_restores_torch():
    out = subprocess.run([sys.executable, "-c", _CONTEXT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESTORED" in out.stdout


_ON_GPU = """
import torch, megatron_dsv3.cpu as cpu
cpu.gpu_available = lambda: True  # what a GPU machine reports
zeros = torch.zeros
assert cpu.enable_cpu_mode() is False
assert torch.zeros is zeros and not cpu.is_cpu_mode()
from megatron_dsv3.runtime.catalog import all_changes
assert not any(c.applied for c in all_changes() if c.group == "cpu")
print("UNCHANGED")
"""


def test_cpu_mode_changes_nothing_when_a_gpu_is_present():
    out = subprocess.run([sys.executable, "-c", _ON_GPU], capture_output=True, text=True)
    assert "UNCHANGED" in out.stdout, out.stderr[-3000:]
