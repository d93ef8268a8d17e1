"""Our FP8 recipes as Transformer Engine objects (production backend: Megatron's own FP8 path).

With ``fp8.backend: transformer_engine`` the job runs Megatron's ``--fp8-format e4m3 --fp8-recipe
blockwise`` (set by :mod:`megatron_dsv3.args.settings`), which builds TE's ``Float8BlockScaling``.
That class takes its scale rule from ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES`` *when TE's recipe module
is first imported* (class attributes ``fp8_quant_fwd_inp`` / ``_weight`` / ``bwd_grad``), and
Megatron imports TE, hence that module, at ``import megatron.core``, before any argument is read:
an environment variable set from the arguments would come too late.  So the recipe object is built
here with explicit per-instance ``QParams`` (what TE's modules read, ``recipe.fp8_quant_fwd_inp
.power_2_scale`` in ``transformer_engine/pytorch/module/linear.py``), and the ``model`` run-time
change ``blockwise_fp8_recipe_follows_the_dsv3_recipe`` makes Megatron's ``get_fp8_recipe`` return
it.  The variable is still exported for any TE process started later.

Nothing here imports Transformer Engine: callers pass TE's recipe module (``transformer_engine
.common.recipe``), which needs only pydantic, so a CPU test can check these objects against TE's
real classes.
"""

from __future__ import annotations

from megatron_dsv3.fp8.recipes import FP8Recipe

FP32_SCALES_ENV = "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"


def _dim(kind: str) -> int:
    return 1 if kind == "1d" else 2


def qparams(recipe: FP8Recipe, recipe_module):
    """TE's ``QParams`` for our recipe: power-of-two or fp32 scales, and the amax floor."""
    return recipe_module.QParams(power_2_scale=recipe.scale == "pow2", amax_epsilon=recipe.amax_epsilon)


def float8_block_scaling(recipe: FP8Recipe, recipe_module):
    """TE's ``Float8BlockScaling`` for ``recipe`` (block length 128, E4M3, split accumulator)."""
    te = recipe_module.Float8BlockScaling(
        fp8_format=recipe_module.Format.E4M3,
        x_block_scaling_dim=_dim(recipe.activation_block),
        w_block_scaling_dim=_dim(recipe.weight_block),
        grad_block_scaling_dim=_dim(recipe.grad_block),
    )
    # Per instance, so that the import-time environment variable no longer decides.
    te.fp8_quant_fwd_inp = qparams(recipe, recipe_module)
    te.fp8_quant_fwd_weight = qparams(recipe, recipe_module)
    te.fp8_quant_bwd_grad = qparams(recipe, recipe_module)
    return te


def quantizer_kwargs(recipe: FP8Recipe, tensor_type: str) -> dict:
    """The arguments TE's ``Float8BlockQuantizer`` gets for one tensor role ("input", "weight",
    "grad_output"), as ``Float8BlockScalingRecipeState.make_quantizers`` derives them from the recipe."""
    role = {"weight": "weight", "grad_output": "grad", "grad_input": "grad"}.get(tensor_type, "activation")
    kind = {"activation": recipe.activation_block, "weight": recipe.weight_block, "grad": recipe.grad_block}[role]
    return {
        "rowwise": True,
        "columnwise": True,
        "amax_epsilon": recipe.amax_epsilon,
        "force_pow_2_scales": recipe.scale == "pow2",
        "block_scaling_dim": _dim(kind),
    }


def environment(recipe: FP8Recipe) -> dict[str, str]:
    """The environment TE's recipe module reads at import, for processes started after this one."""
    return {FP32_SCALES_ENV: "1" if recipe.scale == "fp32" else "0"}
