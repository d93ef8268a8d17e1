"""The local backend's grouped experts compute, save and load what Megatron's ``SequentialMLP`` does.

The reference is Megatron's own ``SequentialMLP`` (one GEMM per expert) built from the same seed:
the grouped experts (one ``torch.nn.functional.grouped_mm`` per projection) start from the same
weights, give the same outputs and gradients bit for bit in fp32 (empty experts included), and their
distributed checkpoints load into each other.  Parallel layouts with grouped experts are checked by
``test_parallel_equivalence.py`` and ``test_dualpipe_equivalence.py`` (grouped is the default) and,
for expert tensor parallelism, by the slow test here.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel import ParallelLayout


def _build(experts: str, seed: int = 0, extra=()):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsv3.testing.parallel import build_chunks

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(1234 + seed)
    _, _, (model,) = build_chunks("dsv3-tiny", ParallelLayout(), ddp=False,
                                  extra_args=("--dsv3-experts", experts, *extra))
    return model


@pytest.fixture(scope="module")
def models(megatron_single_process):
    return {"grouped": _build("grouped"), "sequential": _build("sequential")}


def _experts(model):
    return model.decoder.layers[1].mlp.experts


def _stacked(sequential, name: str, grad: bool = False) -> torch.Tensor:
    return torch.stack([getattr(getattr(e, name).weight, "grad" if grad else "data") for e in sequential.local_experts])


def _expert_fc1(model, e: int) -> torch.Tensor:
    experts = _experts(model)
    return experts.linear_fc1.weight[e] if hasattr(experts, "linear_fc1") else experts.local_experts[e].linear_fc1.weight


def _inputs(num_experts: int, hidden: int, seed: int = 2):
    """Tokens for every expert, with empty experts and one expert holding more than 128 tokens."""
    counts = torch.tensor([0 if e % 3 == 0 else 5 + 7 * e for e in range(num_experts)])
    counts[1] = 300
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(int(counts.sum()), hidden, generator=g)
    return counts, x, torch.rand(x.shape[0], generator=g), torch.randn(x.shape, generator=g)


def _run(experts, counts, x, probs, dy):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    out, bias = experts(x, counts, probs)
    assert bias is None
    out.backward(dy)
    return out.detach(), x.grad, probs.grad


@pytest.mark.quick
def test_grouped_experts_start_from_the_sequential_experts_weights(models):
    """Same seed, same random draws: every parameter of the two models is equal, experts stacked."""
    grouped, sequential = models["grouped"], models["sequential"]
    g, s = _experts(grouped), _experts(sequential)
    assert type(g).__name__ == "GroupedExperts" and type(s).__name__ == "SequentialMLP"
    assert torch.equal(g.linear_fc1.weight, _stacked(s, "linear_fc1"))
    assert torch.equal(g.linear_fc2.weight, _stacked(s, "linear_fc2"))
    others = dict(sequential.named_parameters())
    for name, p in grouped.named_parameters():
        if ".experts.linear_fc" not in name:
            assert torch.equal(p, others[name]), name


@pytest.mark.quick
def test_grouped_experts_equal_sequential_experts_bit_for_bit_with_empty_experts(models):
    """Outputs, input and gate-value gradients and weight gradients in fp32, bit for bit; experts
    without tokens get exactly zero weight gradients."""
    g, s = _experts(models["grouped"]), _experts(models["sequential"])
    counts, x, probs, dy = _inputs(g.num_local_experts, x_hidden := g.linear_fc1.weight.shape[2])
    assert x_hidden == 128 and (counts == 0).any() and (counts > 128).any()
    got, want = _run(g, counts, x, probs, dy), _run(s, counts, x, probs, dy)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for fc in ("linear_fc1", "linear_fc2"):
        grad = getattr(g, fc).weight.grad
        assert torch.equal(grad, _stacked(s, fc, grad=True))
        assert torch.equal(grad[counts == 0], torch.zeros_like(grad[counts == 0]))
        assert (grad[counts > 0].abs().amax(dim=(1, 2)) > 0).all()


@pytest.mark.quick
def test_whole_models_with_grouped_or_sequential_experts_give_equal_logits_and_gradients(models):
    grouped, sequential = models["grouped"], models["sequential"]
    tokens = torch.randint(0, 4096, (2, 129), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(128).expand(2, 128)
    losses = {}
    for name, model in models.items():
        model.zero_grad()
        losses[name] = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        losses[name].sum().backward()
    assert torch.equal(losses["grouped"], losses["sequential"])
    g, s = _experts(grouped), _experts(sequential)
    assert torch.equal(g.linear_fc1.weight.grad, _stacked(s, "linear_fc1", grad=True))
    seq = dict(sequential.named_parameters())
    for name, p in grouped.named_parameters():
        if ".experts.linear_fc" not in name and p.grad is not None:
            assert torch.equal(p.grad, seq[name].grad), name


@pytest.mark.parametrize("saved,loaded", [("sequential", "grouped"), ("grouped", "sequential")])
@pytest.mark.quick
def test_distributed_checkpoints_load_across_grouped_and_sequential_experts(models, tmp_path, saved, loaded):
    """Megatron's torch_dist checkpoint of one loads into the other (built from another seed) and the
    logits are equal: the grouped experts write SequentialMLP's keys, shapes and offsets."""
    from megatron_dsv3.testing.parallel import load_weights, save_weights

    save_weights([models[saved]], str(tmp_path))
    target = _build(loaded, seed=7)
    assert not torch.equal(_expert_fc1(target, 2), _expert_fc1(models[saved], 2))  # another seed
    load_weights([target], str(tmp_path))
    assert torch.equal(_expert_fc1(target, 2), _expert_fc1(models[saved], 2))
    tokens = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        assert torch.equal(target(tokens, positions, None), models[saved](tokens, positions, None))


@pytest.mark.quick
def test_a_sequential_state_dict_loads_into_grouped_experts_stacked(models, megatron_single_process):
    g = _build("grouped", seed=5)
    experts = _experts(g)
    experts.load_state_dict(_experts(models["sequential"]).state_dict())
    assert torch.equal(experts.linear_fc1.weight, _experts(models["grouped"]).linear_fc1.weight)
    partial = {k: v for k, v in _experts(models["sequential"]).state_dict().items() if "local_experts.3." not in k}
    with pytest.raises(KeyError, match="lacks.*local_experts.3.linear_fc1.weight"):
        experts.load_state_dict(partial)


@pytest.mark.quick
def test_the_grouped_weight_gradient_waits_in_the_zero_bubble_queue(models):
    """While DualPipe's B runs (the queue deferring), the weight GEMMs are queued; W computes them."""
    from megatron_dsv3.model.wgrad import WGRAD

    g = _experts(models["grouped"])
    counts, x, probs, dy = _inputs(g.num_local_experts, 128, seed=4)
    _run(g, counts, x, probs, dy)
    want = [p.grad.clone() for p in g.parameters()]
    for p in g.parameters():
        p.grad = None
    out, _ = g(x.clone().requires_grad_(), counts, probs)
    with WGRAD.defer():
        out.backward(dy)
    assert all(p.grad is None for p in g.parameters()) and len(WGRAD) == 1
    WGRAD.pop()
    assert all(torch.equal(p.grad, w) for p, w in zip(g.parameters(), want))


@pytest.mark.quick
def test_experts_choice_sets_megatrons_moe_grouped_gemm_and_a_contradiction_is_named(megatron_single_process):
    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    for experts, grouped in (("auto", True), ("grouped", True), ("sequential", False)):
        assert parse_megatron_args(megatron_argv("dsv3-tiny", cpu=True, experts=experts)[2:]).moe_grouped_gemm == grouped
    argv = megatron_argv("dsv3-tiny", cpu=True, experts="sequential", extra=["--moe-grouped-gemm"])
    with pytest.raises(ConfigError, match="--moe-grouped-gemm was given as True.*--dsv3-experts sequential"):
        parse_megatron_args(argv[2:])


@pytest.mark.quick
def test_grouped_experts_where_grouped_mm_is_missing_are_an_error_naming_the_fix(monkeypatch):
    """Asking for grouped experts where ``grouped_mm`` cannot run is an error that names the fix;
    ``auto`` then runs sequential experts and says so once."""
    from megatron_dsv3.model import backends
    from megatron_dsv3.model.grouped_gemm import require_grouped_mm

    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    backends.grouped_mm_status.cache_clear()
    try:
        with pytest.raises(ConfigError, match="no torch.nn.functional.grouped_mm.*Fix: use --dsv3-experts sequential"):
            backends.resolve_experts("grouped", "local", on_cpu=True)
        with pytest.raises(ConfigError, match="grouped experts cannot run here"):
            require_grouped_mm()
        with pytest.warns(RuntimeWarning, match="experts auto runs one GEMM per expert"):
            assert backends.resolve_experts("auto", "local", on_cpu=True) == "sequential"
        assert backends.resolve_experts("auto", "transformer_engine", on_cpu=False) == "grouped"
    finally:
        monkeypatch.undo()
        backends.grouped_mm_status.cache_clear()


@pytest.mark.quick
def test_grouped_experts_refuse_what_they_do_not_implement(megatron_single_process):
    from megatron_dsv3.model.grouped_experts import check_config_for_grouped_experts

    config = _experts(_build("grouped", extra=())).config
    for field, value, named in (("add_bias_linear", True, "add_bias_linear"), ("moe_latent_size", 64, "moe_latent_size")):
        saved = getattr(config, field)
        setattr(config, field, value)
        try:
            with pytest.raises(ConfigError, match=f"{named}.*Fix: use --dsv3-experts sequential"):
                check_config_for_grouped_experts(config)
        finally:
            setattr(config, field, saved)


# ---- expert tensor parallelism (processes: slow) ----
@pytest.mark.slow
def test_expert_tensor_parallel_layouts_with_grouped_experts_match_one_process(tmp_path):
    """ETP = 2 alone and with EP = 2: loss and every gradient equal the single-process step.  The
    default run covers TP + SP, EP, PP, VPP and DualPipe(V) with grouped experts (the default)."""
    from megatron_dsv3.testing.equivalence import compare_layouts

    layouts = {"etp2": ParallelLayout(etp=2, dp=2), "ep2_etp2": ParallelLayout(ep=2, etp=2, dp=4)}
    report = compare_layouts(str(tmp_path), layouts, extra_args=("--dsv3-experts", "grouped"))
    for name, r in report.items():
        assert r["num_grads"] == r["num_params"], name
        assert r["loss_rel_err"] < 1e-5, (name, r)
        assert r["max_grad_rel_err"] < 1e-5, (name, r["worst_param"], r["max_grad_rel_err"])
        assert r["expert_bias_max_abs_err"] == 0.0, name


@pytest.mark.quick
def test_empty_experts_weight_gradients_are_zeroed_whatever_the_kernel_left():
    """Blackwell's grouped_mm has left garbage in empty groups' weight gradients (pytorch#172439)."""
    from megatron_dsv3.model.grouped_gemm import zero_empty_experts

    counts = torch.tensor([3, 0, 5, 0])
    grad = torch.randn(4, 6, 8)
    got = zero_empty_experts(grad.clone(), counts)
    assert torch.equal(got[[1, 3]], torch.zeros(2, 6, 8)) and torch.equal(got[[0, 2]], grad[[0, 2]])
