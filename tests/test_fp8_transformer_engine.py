"""The Transformer Engine objects our recipes produce, checked against TE's real classes on the CPU.

Transformer Engine cannot be imported without a GPU, and installing its pure-Python wheel breaks
``import megatron.core`` on a machine without the core library (``transformer_engine/common/
__init__.py`` raises RuntimeError "Found empty `transformer-engine` meta package installed", which
Megatron's ImportError guard does not catch), so it is not a test dependency.  Its recipe module
(``transformer_engine/common/recipe/__init__.py``) imports nothing but pydantic and the standard
library: these tests download the 1.2 MB wheel once into the package cache (``$MEGATRON_DSV3_CACHE``,
default ``~/.cache/megatron-dsv3``) (``pip download transformer-engine==2.20.2 --no-deps``), load
that one file by path, and skip, saying why, when the download is impossible.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import subprocess
import sys
import types
import zipfile

import pytest

from megatron_dsv3.fp8.recipes import named_recipe
from megatron_dsv3.fp8.support import two_d_by_two_d
from megatron_dsv3.fp8.te import FP32_SCALES_ENV, float8_block_scaling, quantizer_kwargs

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

TE_VERSION = "2.20.2"
RECIPE_FILE = "transformer_engine/common/recipe/__init__.py"
QUANTIZER_FILE = "transformer_engine/pytorch/tensor/float8_blockwise_tensor.py"


@pytest.fixture(scope="module")
def te_wheel():
    from megatron_dsv3.data import default_cache_dir

    folder = default_cache_dir() / "transformer-engine-wheel"
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob(f"transformer_engine-{TE_VERSION}-*.whl"))
    if not wheels:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder),
                            f"transformer-engine=={TE_VERSION}"], check=True, capture_output=True, timeout=180)
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"cannot download the transformer-engine {TE_VERSION} wheel (offline?): {err}")
        wheels = sorted(folder.glob(f"transformer_engine-{TE_VERSION}-*.whl"))
    if not wheels:
        pytest.skip(f"pip download produced no transformer-engine {TE_VERSION} wheel in {folder}")
    return zipfile.ZipFile(wheels[0])


@pytest.fixture(scope="module")
def te_recipe(te_wheel, tmp_path_factory):
    """TE's real recipe module, loaded by path with the scale environment variable unset (TE's default)."""
    path = tmp_path_factory.mktemp("te") / "te_recipe.py"
    path.write_bytes(te_wheel.read(RECIPE_FILE))
    mp = pytest.MonkeyPatch()
    mp.delenv(FP32_SCALES_ENV, raising=False)
    spec = importlib.util.spec_from_file_location("_te_recipe_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the dataclasses' annotations through it
    spec.loader.exec_module(module)
    mp.undo()
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("name,power_of_two", [("deepseek", False), ("te-blockwise", True)])
def test_our_recipes_are_transformer_engines_float8_block_scaling(te_recipe, name, power_of_two):
    te = float8_block_scaling(named_recipe(name), te_recipe)
    assert isinstance(te, te_recipe.Float8BlockScaling) and te.fp8_format == te_recipe.Format.E4M3
    for q in (te.fp8_quant_fwd_inp, te.fp8_quant_fwd_weight, te.fp8_quant_bwd_grad):
        assert isinstance(q, te_recipe.QParams) and q.power_2_scale is power_of_two and q.amax_epsilon == 0.0
    assert (te.x_block_scaling_dim, te.w_block_scaling_dim, te.grad_block_scaling_dim) == (1, 2, 1)
    assert all(g.use_split_accumulator for g in (te.fp8_gemm_fprop, te.fp8_gemm_dgrad, te.fp8_gemm_wgrad))


def test_deepseeks_fp32_scales_do_not_depend_on_the_import_time_environment(te_recipe):
    """TE's class defaults follow NVTE_FP8_BLOCK_SCALING_FP32_SCALES at import (unset here: powers of
    two); the object built for `deepseek` has fp32 scales regardless, per instance."""
    default = te_recipe.Float8BlockScaling()
    assert default.fp8_quant_fwd_inp.power_2_scale is True
    ours = float8_block_scaling(named_recipe("deepseek"), te_recipe)
    assert ours.fp8_quant_fwd_inp.power_2_scale is False
    assert te_recipe.Float8BlockScaling.fp8_quant_fwd_inp.power_2_scale is True  # the class is untouched


def test_te_blockwise_equals_transformer_engines_defaults(te_recipe):
    ours, default = float8_block_scaling(named_recipe("te-blockwise"), te_recipe), te_recipe.Float8BlockScaling()
    assert repr(ours) == repr(default)


@pytest.mark.parametrize("kinds", list(itertools.product(("1d", "2d"), repeat=3)),
                         ids=lambda k: "-".join(k))
def test_the_2d_by_2d_refusal_agrees_with_transformer_engine(te_recipe, kinds):
    recipe = named_recipe("deepseek").with_overrides(activation_block=kinds[0], weight_block=kinds[1],
                                                      grad_block=kinds[2])
    refused = bool(two_d_by_two_d(recipe))
    try:
        float8_block_scaling(recipe, te_recipe)
        accepted = True
    except Exception as err:  # pydantic wraps TE's assertion
        assert "2D by 2D block gemm not supported" in str(err)
        accepted = False
    assert accepted is not refused


def _init_parameters(source: str, cls: str) -> set[str]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            return {a.arg for a in init.args.args + init.args.kwonlyargs}
    raise AssertionError(f"{cls} not found")


@pytest.mark.parametrize("name", ["deepseek", "te-blockwise"])
def test_quantizer_arguments_are_what_te_derives_from_the_recipe(te_wheel, te_recipe, name):
    """Per tensor role, the Float8BlockQuantizer arguments (names checked against TE's constructor)
    equal what TE's Float8BlockScalingRecipeState.make_quantizers reads from our recipe object."""
    parameters = _init_parameters(te_wheel.read(QUANTIZER_FILE).decode(), "Float8BlockQuantizer")
    recipe = named_recipe(name)
    te = float8_block_scaling(recipe, te_recipe)
    derived = {"input": (te.fp8_quant_fwd_inp, te.x_block_scaling_dim),
               "weight": (te.fp8_quant_fwd_weight, te.w_block_scaling_dim),
               "grad_output": (te.fp8_quant_bwd_grad, te.grad_block_scaling_dim)}
    for role, (q, dim) in derived.items():
        kwargs = quantizer_kwargs(recipe, role)
        assert set(kwargs) <= parameters
        assert (kwargs["force_pow_2_scales"], kwargs["amax_epsilon"], kwargs["block_scaling_dim"]) == (
            q.power_2_scale, q.amax_epsilon, dim)


def test_megatrons_get_fp8_recipe_returns_the_plans_recipe(megatron_single_process, te_recipe, monkeypatch):
    """The `model` change blockwise_fp8_recipe_follows_the_dsv3_recipe, with TE's real recipe module
    standing in for `transformer_engine.common.recipe`."""
    from megatron.core import fp8_utils

    from megatron_dsv3.fp8.plan import FP8Plan
    from megatron_dsv3.model.options import ModelOptions

    common = types.ModuleType("transformer_engine.common")
    common.recipe = te_recipe
    package = types.ModuleType("transformer_engine")
    package.common = common
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", common)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", te_recipe)
    plan = FP8Plan(recipe=named_recipe("deepseek"), backend="transformer_engine")
    config = types.SimpleNamespace(dsv3_options=ModelOptions(fp8_plan=plan), fp8_recipe="blockwise", fp8="e4m3")
    te = fp8_utils.get_fp8_recipe(config)
    assert isinstance(te, te_recipe.Float8BlockScaling) and te.fp8_quant_bwd_grad.power_2_scale is False
    # Without a plan Megatron's own function answers (no Transformer Engine here: None).
    assert fp8_utils.get_fp8_recipe(types.SimpleNamespace(fp8_recipe="blockwise", fp8="e4m3")) is None
