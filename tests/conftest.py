"""Shared fixtures: Megatron-Core in this process, on CPU, with a one-process gloo group."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit fuser would compile for ~10 s

import pytest


@pytest.fixture(scope="session")
def megatron_single_process():
    """CPU mode plus a one-rank gloo world with Megatron's parallel state (TP = PP = EP = 1)."""
    import torch

    from megatron_dsv3.cpu import enable_cpu_mode
    from megatron_dsv3.testing.distributed import free_port

    enable_cpu_mode()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
