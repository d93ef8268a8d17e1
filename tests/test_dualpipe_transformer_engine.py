"""Transformer Engine's deferred weight GEMMs at DualPipe's ``W`` (a GPU with Transformer Engine only).

With the TE backend and the zero-bubble split, TE's modules are built with ``delay_wgrad_compute``
(every backward queues their weight GEMMs) and the schedule runs them at the ``W``
(``model/wgrad.py``: ``transformer_engine_deferring``, ``run_transformer_engine_wgrads``; the runner
queues them for a deferring backward and runs them at once after any other).  These tests skip
without CUDA and Transformer Engine, which neither this CPU machine nor the project's GPU machine
has (the GPU machine has no network and takes 64 MiB at a time, TE's core wheel is 276 MB;
``docs/benchmarks.md``): the TE path is unverified until a GPU with TE runs them
(``pytest tests/test_dualpipe_transformer_engine.py``).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def _transformer_engine():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # ImportError, or OSError when its CUDA libraries are missing
        pytest.skip(f"needs Transformer Engine ({type(err).__name__}: {err})")
    return te


def _modules(te, delay: bool) -> dict:
    """A linear, a layernorm-linear (attention's and the MLP's TE modules) and a grouped linear (the
    experts'), deferring their weight GEMMs or not, with the same weights."""
    torch.manual_seed(0)
    kwargs = dict(bias=False, params_dtype=torch.float32, device="cuda", delay_wgrad_compute=delay)
    return {"linear": te.Linear(64, 32, **kwargs), "layernorm_linear": te.LayerNormLinear(64, 32, **kwargs),
            "grouped_linear": te.GroupedLinear(4, 64, 32, **kwargs)}


def _run(modules: dict, x: torch.Tensor, splits: list[int]) -> None:
    out = [modules["linear"](x), modules["layernorm_linear"](x), modules["grouped_linear"](x, splits)]
    sum((o.float() * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum() for o in out).backward()


def _weight_grads(modules: dict) -> dict:
    return {f"{n}.{p}": w.grad.clone() for n, m in modules.items() for p, w in m.named_parameters()
            if w.grad is not None}


def test_te_weight_gemms_deferred_by_a_backward_run_at_the_w_and_give_the_undeferred_gradients():
    from megatron_dsv3.model.wgrad import WGRAD, run_transformer_engine_wgrads, transformer_engine_deferring

    te = _transformer_engine()
    x = torch.randn(24, 64, device="cuda", requires_grad=True)
    splits = [8, 0, 10, 6]  # an expert without tokens included
    reference = _modules(te, delay=False)
    _run(reference, x, splits)
    want = _weight_grads(reference)

    deferring = _modules(te, delay=True)
    found = transformer_engine_deferring(torch.nn.ModuleDict(deferring))
    assert {type(m).__name__ for m in found} == {"Linear", "LayerNormLinear", "GroupedLinear"}
    WGRAD.clear()
    with WGRAD.defer():  # as the runner does for a deferring backward
        _run(deferring, x, splits)
        WGRAD.put(lambda: run_transformer_engine_wgrads(found))
    weights = {n: g for n, g in _weight_grads(deferring).items() if "weight" in n and "layer_norm" not in n}
    assert not weights, f"weight GEMMs ran in the B: {sorted(weights)}"
    WGRAD.pop()  # the W
    got = _weight_grads(deferring)
    assert set(got) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_ddp_counts_a_te_weight_deferred_to_the_w_as_ready_there(monkeypatch):
    """Megatron DDP with ``delay_wgrad_compute`` puts its grad-ready hook on TE's wgrad hooks: with
    ``--overlap-grad-reduce`` the bucket of a deferred TE weight starts reducing at the ``W``."""
    import os

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv3.model.wgrad import WGRAD, run_transformer_engine_wgrads, transformer_engine_deferring
    from megatron_dsv3.train.processes import free_port

    te = _transformer_engine()
    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1)
    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"linear": te.Linear(64, 32, bias=False, params_dtype=torch.float32, device="cuda",
                                                      delay_wgrad_compute=True)})
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=True,
                                                                        delay_wgrad_compute=True), module)
    (group,) = ddp.bucket_groups
    weight = module["linear"].weight
    found = transformer_engine_deferring(module)
    x = torch.randn(16, 64, device="cuda")
    for step in range(2):
        ddp.zero_grad_buffer()
        WGRAD.clear()
        with WGRAD.defer():
            module["linear"](x).sum().backward()
            WGRAD.put(lambda: run_transformer_engine_wgrads(found))
        assert weight not in group.per_param_grad_ready_counts and group.grad_reduce_handle is None, step
        WGRAD.pop()
        assert group.per_param_grad_ready_counts.get(weight) == 1, step
        assert (group.grad_reduce_handle is not None) == (step == 1), step
        ddp.finish_grad_sync()
        torch.testing.assert_close(weight.main_grad, torch.ones(16, 32, device="cuda").t() @ x, rtol=1e-5, atol=1e-5)


def test_the_671b_recipe_defers_te_weight_gemms_to_the_w_with_the_overlapped_reduction(monkeypatch):
    """The shipped DualPipe recipe's arguments, parsed as on its GPUs: ``--overlap-grad-reduce`` and
    the zero-bubble split together, and the config built from them makes Transformer Engine's modules
    defer their weight GEMMs (``delay_wgrad_compute``, set after Megatron's config checks, which would
    tie it to ``--overlap-moe-expert-parallel-comm``).  Runs on CPU (argument and config level only)."""
    from conftest import gpu_machine

    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.args.settings import parse_megatron_args, schedule_options, transformer_config
    from megatron_dsv3.recipe import load_recipe

    recipe = load_recipe("deepseek-v3-671b-h800-2048")
    monkeypatch.setenv("WORLD_SIZE", "2048")
    monkeypatch.setenv("RANK", "0")
    with gpu_machine(monkeypatch):
        args = parse_megatron_args(recipe_argv(recipe)[2:])
        options = schedule_options(args)
        config = transformer_config(args)
    assert args.transformer_impl == "transformer_engine" and args.overlap_grad_reduce
    assert (options.zero_bubble, options.fb_overlap) == (True, False)
    assert config.delay_wgrad_compute and not config.overlap_moe_expert_parallel_comm
    assert not args.delay_wgrad_compute  # Megatron's own flag (its combined 1F1B) stays off
