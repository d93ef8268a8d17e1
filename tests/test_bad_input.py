"""Invalid combinations fail before any model is built, with the field, the values and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_dsv3.args.compose import megatron_argv
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.presets import get_preset
from megatron_dsv3.parallel import ParallelLayout

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

TINY = get_preset("dsv3-tiny")


@pytest.mark.parametrize(
    "preset, layout, must_mention",
    [
        (TINY, ParallelLayout(ep=3, dp=3), ["parallel.ep=3", "num_routed_experts=16", "divisors of 16"]),
        (TINY, ParallelLayout(tp=3, sp=True), ["parallel.tp=3", "num_attention_heads=4", "divisors of 4"]),
        (TINY.with_overrides(first_k_dense=5), None, ["first_k_dense=5", "num_layers=4", "below 4"]),
        (TINY.with_overrides(num_groups=3), None, ["num_groups=3", "num_routed_experts=16", "divisors of 16"]),
        (TINY, ParallelLayout(pp=3), ["pp x vpp = 3", "num_layers=4", "divisors of 4"]),
        (TINY, ParallelLayout(tp=2), ["parallel.tp=2", "sequence parallel", "parallel.sp: true"]),
        (TINY, ParallelLayout(ep=4, dp=2), ["parallel.ep x parallel.etp = 4 x 1", "raise dp"]),
    ],
)
def test_invalid_combination_names_field_values_and_fix(preset, layout, must_mention):
    # megatron_argv is the first step of every path that builds a model; it validates first.
    with pytest.raises(ConfigError) as err:
        megatron_argv(preset, layout, cpu=True)
    text = str(err.value)
    assert "Fix:" in text
    for fragment in must_mention:
        assert fragment in text, text


def test_unknown_preset_lists_the_presets_and_suggests_one():
    result = subprocess.run(
        [sys.executable, "-m", "megatron_dsv3.cli", "info", "dsv3-tinny"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown preset 'dsv3-tinny'" in result.stderr
    assert "deepseek-v3, deepseek-v2-lite, dsv3-proxy, dsv3-tiny" in result.stderr
    assert "did you mean 'dsv3-tiny'" in result.stderr


def test_unknown_model_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown model field 'num_layer'.*did you mean 'num_layers'"):
        TINY.with_overrides(num_layer=8)


def test_transformer_engine_backend_without_transformer_engine_is_an_error():
    # This machine has no GPU, so Transformer Engine cannot run here.
    with pytest.raises(ConfigError) as err:
        megatron_argv(TINY, backend="transformer_engine", cpu=False)
    assert "backend 'transformer_engine'" in str(err.value)
    assert "--dsv3-backend local" in str(err.value)


def test_dsv3_spec_refuses_a_config_without_mla(megatron_single_process):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv3 import dsv3

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=4)
    with pytest.raises(ConfigError, match="multi_latent_attention=False.*--multi-latent-attention"):
        dsv3(config)
