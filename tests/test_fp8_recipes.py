"""FP8 recipes: the named recipes, the ``fp8:`` section, the plugin options and what they imply,
the refusals of ``megatron-dsv3 check``, and the provider and BF16 policy in a built model.

Facts asserted here: DeepSeek's recipe (E4M3, 1x128 / 128x128, amax/448 fp32 scales, promotion every 128,
BF16 moments; arXiv 2412.19437v2, section 3.3), Transformer Engine's power-of-two default
(``Float8BlockScaling`` in ``transformer_engine/common/recipe/__init__.py``, relaxed by
``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``), Blackwell's power-of-two-only scales (TE runs block scaling there
through MXFP8 GEMMs, whose E8M0 scales are powers of two; ``docs/fp8.md``), Megatron-LM #1863.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.recipes import ALWAYS_BF16, named_recipe
from megatron_dsv3.recipe import loads_recipe, recipe_report

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def test_the_deepseek_recipe_is_the_papers():
    r = named_recipe("deepseek")
    assert (r.format, r.scale, r.block_size, r.margin) == ("e4m3", "fp32", 128, 0)
    assert (r.block("activation"), r.block("weight"), r.block("grad")) == ((1, 128), (128, 128), (1, 128))
    assert r.moments == "bf16"
    assert set(ALWAYS_BF16) >= {"embedding", "output head", "normalisation", "core attention"}


def test_te_blockwise_is_transformer_engines_default_power_of_two_scales():
    r = named_recipe("te-blockwise")
    assert r.scale == "pow2" and r.moments == "fp32"
    assert (r.block("activation"), r.block("weight"), r.block("grad")) == ((1, 128), (128, 128), (1, 128))


GPU = """
model: {preset: dsv3-tiny}
backend: transformer_engine
hardware: {device: cuda, gpu: H100, gpu_memory_gb: 80}
parallel: {world_size: 1}
training: {micro_batch_size: 1, global_batch_size: 8, train_iters: 10, use_distributed_optimizer: true}
data: {source: mock}
"""
CPU = """
model: {preset: dsv3-tiny}
backend: local
precision: fp32
hardware: {device: cpu}
parallel: {world_size: 1}
training: {micro_batch_size: 1, global_batch_size: 8, train_iters: 10}
data: {source: mock}
"""


def _recipe(base: str, fp8: str, overrides=()):
    return loads_recipe(base + f"fp8: {fp8}\n", source="mine.yaml", overrides=list(overrides))


def test_the_fp8_section_loads_named_recipes_with_overrides():
    r = _recipe(GPU, "{recipe: deepseek, scale: pow2, bf16_first_layers: 1, bf16_modules: [mtp]}")
    fp8 = r.fp8.resolved()
    assert (fp8.name, fp8.scale, fp8.bf16_first_layers, fp8.bf16_modules) == ("deepseek", "pow2", 1, ("mtp",))
    assert loads_recipe(GPU, source="mine.yaml").fp8.resolved() is None
    with pytest.raises(ConfigError, match=r"mine.yaml:\d+: unknown key 'fp8.scales'.*did you mean 'fp8.scale'"):
        _recipe(GPU, "{recipe: deepseek, scales: fp32}")
    with pytest.raises(ConfigError, match="fp8.recipe='deepsek' is not one of deepseek, te-blockwise"):
        _recipe(GPU, "{recipe: deepsek}")


def test_the_recipe_becomes_the_plugins_fp8_options():
    from megatron_dsv3.args.compose import recipe_argv

    argv = recipe_argv(_recipe(GPU, "{recipe: deepseek, bf16_last_layers: 1, bf16_modules: []}"))
    i = argv.index("--dsv3-fp8")
    assert argv[i:i + 4] == ["--dsv3-fp8", "deepseek", "--dsv3-fp8-backend", "auto"]
    assert argv[argv.index("--dsv3-fp8-bf16-last-layers") + 1] == "1"
    assert "--fp8-format" not in argv  # Megatron's flags are implied where the job runs
    assert "--dsv3-fp8" not in recipe_argv(loads_recipe(GPU, source="mine.yaml"))


REFUSED = [
    # (fp8 section, other sections, key the error names, words of the reason, words of the fix)
    ("{recipe: deepseek}", ["hardware.gpu=B200"], "fp8.scale", "power-of-two scales only", "pow2"),
    ("{recipe: deepseek}", ["parallel.tp=2", "parallel.sp=true", "parallel.world_size=2"], "parallel.tp", "#1863",
     "tp: 1"),
    ("{recipe: te-blockwise, block_size: 64}", [], "fp8.block_size", "fixes the block length at 128", "emulated"),
    ("{recipe: deepseek, activation_block: 2d}", [], "fp8.weight_block", "Fprop", "1d"),
    ("{recipe: deepseek, margin: 1}", [], "fp8.margin", "no margin", "margin: 0"),
    ("{recipe: deepseek, bf16_modules: [shared_experts]}", [], "fp8.bf16_modules", "whole layers", "pytorch"),
    ("{recipe: deepseek, backend: pytorch}", [], "fp8.backend", "local backend", "backend: local"),
    ("{recipe: deepseek}", ["training.use_distributed_optimizer=false"], "fp8.moments", "precision-aware", "fp32"),
    ("{recipe: deepseek}", ["hardware.gpu=A100"], "hardware.gpu", "compute capability >= 9.0", "Hopper"),
    ("{scale: pow2}", [], "fp8.scale", "fp8.recipe is null", "fp8.recipe: deepseek"),
    # Megatron's OptimizerConfig: "--use-precision-aware-optimizer requires FusedAdam from TransformerEngine"
    ("{recipe: deepseek, backend: pytorch}", ["backend=local"], "fp8.moments", "Transformer Engine's FusedAdam",
     "fp8.moments: fp32"),
    # Megatron's TransformerConfig: at most num_layers // pipeline size BF16 layers at each end (4 // 2 here)
    ("{recipe: deepseek, bf16_first_layers: 3}", ["parallel.pp=2", "parallel.world_size=2"], "fp8.bf16_first_layers",
     "exceeds the 2 layers per pipeline stage", "at most 2"),
    ("{recipe: deepseek, bf16_last_layers: 3}", ["parallel.pp=2", "parallel.world_size=2"], "fp8.bf16_last_layers",
     "exceeds the 2 layers per pipeline stage", "fp8.backend: pytorch"),
]


def _without_transformer_engine(monkeypatch):
    from megatron_dsv3.model import backends

    monkeypatch.setattr(backends, "transformer_engine_status",
                        lambda: backends.TransformerEngineStatus(False, "Transformer Engine is not installed"))


@pytest.mark.parametrize("fp8,sections,key,reason,fix", REFUSED,
                         ids=["fp32-scales-on-blackwell", "te-tp2-issue-1863", "te-block-64", "te-2d-by-2d",
                              "te-margin", "te-bf16-shared-experts", "pytorch-on-te-model", "bf16-moments-no-zero1",
                              "pre-hopper", "keys-without-recipe", "bf16-moments-without-te",
                              "te-bf16-first-layers-per-stage", "te-bf16-last-layers-per-stage"])
def test_check_refuses_what_the_gpu_backend_or_layout_cannot_run(fp8, sections, key, reason, fix, monkeypatch):
    _without_transformer_engine(monkeypatch)
    recipe = _recipe(GPU, fp8, sections)
    report = recipe_report(recipe)
    assert not report.ok
    text = str(report.error)
    assert text.startswith(("mine.yaml:", "override '")) and reason in text and "Fix: " in text and fix in text.split("Fix:")[1]
    assert report.error.key == key


def test_check_accepts_the_fixed_recipes(monkeypatch):
    _without_transformer_engine(monkeypatch)
    pp2 = ["parallel.pp=2", "parallel.world_size=2"]
    for fp8, sections in [("{recipe: te-blockwise}", ["hardware.gpu=B200"]),
                          ("{recipe: deepseek}", ["hardware.gpu=H800"]),
                          ("{recipe: deepseek, bf16_first_layers: 1, bf16_last_layers: 1}", []),
                          ("{recipe: deepseek, bf16_first_layers: 2, bf16_last_layers: 2}", pp2),
                          ("{recipe: deepseek, backend: pytorch, moments: fp32, bf16_first_layers: 3}",
                           ["backend=local"] + pp2)]:
        assert recipe_report(_recipe(GPU, fp8, sections)).error is None, (fp8, sections)
    cpu = _recipe(CPU, "{recipe: deepseek, moments: fp32, bf16_modules: [shared_experts, mtp]}")
    assert recipe_report(cpu).error is None


def test_cpu_recipes_are_refused_the_gpu_backends_and_bf16_moments():
    report = recipe_report(_recipe(CPU, "{recipe: deepseek}"))
    assert "fp8.moments=bf16" in str(report.error) and "hardware.device is cpu" in str(report.error)
    report = recipe_report(_recipe(CPU, "{recipe: deepseek, moments: fp32, backend: pytorch}"))
    assert "needs a GPU" in str(report.error)


# ---- what the options imply, where the job runs ----
def _parse(extra, *, monkeypatch, gpu: bool):
    from conftest import gpu_machine

    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with gpu_machine(monkeypatch, enabled=gpu):
        argv = megatron_argv("dsv3-tiny", backend="transformer_engine" if gpu else "local", cpu=not gpu,
                             extra=list(extra))
        return parse_megatron_args(argv[2:])


def test_transformer_engine_fp8_is_megatrons_blockwise_recipe_with_the_precision_aware_optimizer(monkeypatch):
    monkeypatch.delenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", raising=False)
    args = _parse(["--dsv3-fp8", "deepseek", "--use-distributed-optimizer", "--bf16",
                   "--dsv3-fp8-bf16-first-layers", "1"], monkeypatch=monkeypatch, gpu=True)
    # --moe-router-padding-for-quantization: the name Megatron 0.19 keeps (-for-fp8 is deprecated there)
    assert (args.fp8, args.fp8_recipe, args.moe_router_padding_for_quantization) == ("e4m3", "blockwise", True)
    assert (args.first_last_layers_bf16, args.num_layers_at_start_in_bf16, args.num_layers_at_end_in_bf16) == (True, 1, 0)
    import torch

    assert args.use_precision_aware_optimizer and args.exp_avg_dtype == args.exp_avg_sq_dtype == torch.bfloat16
    assert args.main_params_dtype == torch.float32
    assert args.dsv3_fp8_plan.backend == "transformer_engine"
    import os

    assert os.environ["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] == "1"


def test_the_job_refuses_what_megatron_would_reject_later(monkeypatch):
    """BF16 moments without Transformer Engine (Megatron's optimizer raises "requires FusedAdam from
    TransformerEngine" after the model is built), and more BF16 layers at an end than a pipeline stage
    holds (Megatron's TransformerConfig asserts), refused when the arguments are applied."""
    from conftest import gpu_machine

    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with gpu_machine(monkeypatch), monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        _without_transformer_engine(m)
        argv = megatron_argv("dsv3-tiny", backend="local", cpu=False, extra=[
            "--dsv3-fp8", "deepseek", "--dsv3-fp8-backend", "pytorch", "--use-distributed-optimizer", "--bf16"])
        with pytest.raises(ConfigError, match="FusedAdam.*Transformer Engine is not installed") as err:
            parse_megatron_args(argv[2:])
        assert err.value.key == "--dsv3-fp8-moments"
    with pytest.raises(ConfigError, match="bf16_last_layers=3 exceeds the 2 layers per pipeline stage") as err:
        _parse(["--dsv3-fp8", "te-blockwise", "--dsv3-fp8-bf16-last-layers", "3", "--pipeline-model-parallel-size", "2"],
               monkeypatch=monkeypatch, gpu=True)
    assert err.value.key == "--dsv3-fp8-bf16-last-layers"


def test_an_explicit_megatron_fp8_flag_that_contradicts_the_plan_is_an_error(monkeypatch):
    with pytest.raises(ConfigError, match="--fp8-format was given as 'hybrid'"):
        _parse(["--dsv3-fp8", "te-blockwise", "--fp8-format", "hybrid"], monkeypatch=monkeypatch, gpu=True)
    with pytest.raises(ConfigError, match="--dsv3-fp8-scale given without --dsv3-fp8"):
        _parse(["--dsv3-fp8-scale", "pow2"], monkeypatch=monkeypatch, gpu=False)


def test_on_cpu_the_local_backend_gets_the_emulated_fp8_linears(monkeypatch):
    from megatron_dsv3.args.settings import transformer_config
    from megatron_dsv3.fp8.plan import plan_of
    from megatron_dsv3.fp8.provider import FP8LocalSpecProvider
    from megatron_dsv3.model.providers import provider_for

    args = _parse(["--dsv3-fp8", "deepseek", "--dsv3-fp8-moments", "fp32"], monkeypatch=monkeypatch, gpu=False)
    assert args.fp8 is None and not args.use_precision_aware_optimizer
    config = transformer_config(args)
    assert plan_of(config).backend == "emulated" and plan_of(config).recipe.scale == "fp32"
    assert isinstance(provider_for(config), FP8LocalSpecProvider)
    with pytest.raises(ConfigError, match="fp8.moments=bf16 uses Megatron's precision-aware optimizer"):
        _parse(["--dsv3-fp8", "deepseek"], monkeypatch=monkeypatch, gpu=False)


# ---- the provider and the BF16 policy in a built model ----
def _fp8_model(monkeypatch, extra):
    from megatron.core.models.gpt import GPTModel

    from megatron_dsv3.args.settings import transformer_config
    from megatron_dsv3.fp8.policy import fp8_linears, keep_bf16_modules
    from megatron_dsv3.model.spec import dsv3_block_spec

    config = transformer_config(_parse(["--dsv3-fp8", "deepseek", "--dsv3-fp8-moments", "fp32", *extra],
                                       monkeypatch=monkeypatch, gpu=False))
    spec = dsv3_block_spec(config, pp_rank=0)
    model = GPTModel(config=config, transformer_layer_spec=spec, mtp_block_spec=spec.mtp_block_spec,
                     vocab_size=4096, max_sequence_length=128, position_embedding_type="rope")
    keep_bf16_modules([model])
    return model, fp8_linears(model)


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_every_linear_of_the_spec_runs_in_fp8_and_the_always_bf16_modules_do_not(megatron_single_process, monkeypatch,
                                                                                  experts):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    model, linears = _fp8_model(monkeypatch, ["--dsv3-experts", experts])
    assert all(linears.values()) and len(linears) > (100 if experts == "sequential" else 40)
    names = " ".join(linears)
    routed = "experts.local_experts.0.linear_fc1" if experts == "sequential" else "mlp.experts.linear_fc1"
    for part in ("linear_q_down_proj", "linear_kv_down_proj", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj",
                 "mlp.linear_fc1", routed, "shared_experts.linear_fc2", "mtp.layers.0.eh_proj"):
        assert part in names, part
    assert type(model.output_layer) is ColumnParallelLinear  # output head: BF16
    assert not any(k in names for k in ("router", "embedding", "layernorm", "core_attention"))


def test_the_bf16_policy_keeps_first_and_last_layers_shared_experts_and_mtp(megatron_single_process, monkeypatch):
    _, linears = _fp8_model(monkeypatch, ["--dsv3-fp8-bf16-first-layers", "1", "--dsv3-fp8-bf16-last-layers", "1",
                                          "--dsv3-fp8-bf16-modules", "shared_experts", "mtp"])
    bf16 = {n for n, fp8 in linears.items() if not fp8}
    assert all(n.startswith(("decoder.layers.0.", "decoder.layers.3.", "mtp.")) or ".shared_experts." in n for n in bf16)
    assert any(n.startswith("decoder.layers.0.") for n in bf16) and any(n.startswith("mtp.") for n in bf16)
    fp8 = {n for n, on in linears.items() if on}
    assert fp8 and all(n.startswith(("decoder.layers.1.", "decoder.layers.2.")) for n in fp8)
    assert not any(".shared_experts." in n for n in fp8)
