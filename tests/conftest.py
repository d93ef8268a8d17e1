"""Shared fixtures: Megatron-Core in this process, on CPU, with a one-process gloo group."""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit fuser would compile for ~10 s

import pytest


@contextlib.contextmanager
def gpu_machine(monkeypatch, enabled: bool = True):
    """Let Megatron's validate_args accept Transformer Engine, grouped GEMM and TP on this CPU machine
    (a Hopper GPU with Transformer Engine, as far as argument validation can tell)."""
    if not enabled:
        yield
        return
    import megatron.training.arguments as megatron_arguments
    import torch

    import megatron_dsv3.model.backends as backends

    with monkeypatch.context() as m:
        m.setattr(backends, "transformer_engine_status", lambda: backends.TransformerEngineStatus(True, "", True))
        m.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        m.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
        import megatron.core.transformer.transformer_config as transformer_config

        m.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)  # TE 2.20 (FP8 recipe checks)
        m.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        yield


@pytest.fixture(autouse=True)
def fresh_moe_metrics_tracker():
    """Megatron's MoE metrics tracker is process-global and sized by the first model that records into it.

    A training loop empties it every step (``report``); a test that only runs a forward does not, and the
    next test's model (more layers) would index past it.  Each test starts with none.
    """
    module = sys.modules.get("megatron.core.transformer.moe.moe_logging")
    if module is not None:
        module.destroy_moe_metrics_tracker()
    yield


@pytest.fixture(scope="session")
def megatron_single_process():
    """The plugin active, CPU mode, and a one-rank gloo world with Megatron's parallel state (TP = PP = EP = 1)."""
    from megatron_dsv3.cpu import enable_cpu_mode
    from megatron_dsv3.runtime.activation import activate
    from megatron_dsv3.testing.distributed import join_one_rank_world

    activate(source="tests")
    enable_cpu_mode()
    join_one_rank_world("gloo")
    yield
