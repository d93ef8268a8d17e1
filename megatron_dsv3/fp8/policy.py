"""Which FP8 Linears stay in BF16: a recipe's choices, applied by module name after the model is built.

Always BF16 (DeepSeek-V3 section 3.3): the embedding, the output head, the MoE router, the norms and
core attention; none of them is a Linear of the spec, so no FP8 provider builds them.  A recipe may
also keep the first / last N decoder layers (``bf16_first_layers`` / ``bf16_last_layers``, global
layer numbers, counted as Megatron's ``--first-last-layers-bf16`` counts them), the shared experts
and the MTP module in BF16.  As in torchtitan's FP8 converter, the choice is data applied from
outside the model: :func:`keep_bf16_modules` runs as a pre-wrap hook of the model builder
(:class:`megatron_dsv3.model.build.DSV3ModelBuilder`) and switches the chosen FP8 Linears back to
the BF16 path (Megatron's local GEMMs, deferrable weight gradient included).
"""

from __future__ import annotations

from megatron_dsv3.fp8.linear import FP8LinearMixin
from megatron_dsv3.fp8.plan import plan_of


def _layer_numbers(model) -> dict[str, int]:
    """``decoder.layers.<i>`` -> its global (1-based) layer number."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {name: module.layer_number for name, module in model.named_modules()
            if isinstance(module, TransformerLayer) and name.startswith("decoder.layers.")}


def bf16_reason(name: str, layer_number: int | None, recipe, num_layers: int) -> str | None:
    """Why the Linear called ``name`` stays in BF16 under ``recipe``, or None (it runs in FP8)."""
    if name.startswith("mtp.") and "mtp" in recipe.bf16_modules:
        return "mtp"
    if ".shared_experts." in name and "shared_experts" in recipe.bf16_modules:
        return "shared_experts"
    if layer_number is not None:
        if layer_number <= recipe.bf16_first_layers:
            return f"first {recipe.bf16_first_layers} layers"
        if layer_number > num_layers - recipe.bf16_last_layers:
            return f"last {recipe.bf16_last_layers} layers"
    return None


def keep_bf16_modules(chunks):
    """Name every FP8 Linear of ``chunks`` and switch the recipe's BF16 ones back; returns ``chunks``."""
    for chunk in chunks:
        plan = plan_of(chunk.config)
        if plan is None or not plan.runs_local_linears:
            continue
        layers = _layer_numbers(chunk)
        for name, module in chunk.named_modules():
            if not isinstance(module, FP8LinearMixin):
                continue
            module.fp8_name = name
            prefix = next((p for p in layers if name.startswith(p + ".")), None)
            if bf16_reason(name, layers.get(prefix), plan.recipe, chunk.config.num_layers):
                module.fp8 = None
    return chunks


def fp8_linears(model) -> dict[str, bool]:
    """Every FP8-capable Linear of ``model`` by name: True when it runs in FP8."""
    return {name: m.fp8 is not None for name, m in model.named_modules() if isinstance(m, FP8LinearMixin)}
