"""Presets against the paper's numbers (arXiv 2412.19437v2) and against the models Megatron builds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_dsv3.model.accounting import count
from megatron_dsv3.model.presets import PRESETS, get_preset

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def test_deepseek_v3_preset_matches_the_paper_numbers():
    """671B total, 37B activated (arXiv 2412.19437v2, section 1); KV cache 61 x (512 + 64) x 2 bytes =
    70,272 B/token ("Insights into DeepSeek-V3", arXiv 2505.09343, Table 1)."""
    c = count(get_preset("deepseek-v3"))
    assert abs(c.total_params / 671e9 - 1) < 0.005
    assert abs(c.active_params / 37e9 - 1) < 0.015
    assert c.kv_cache_bytes_per_token == 70_272
    # The released checkpoint's 14B of MTP repeat the shared embedding and head (2 x 0.93B).
    assert abs((c.mtp_params + 2 * c.embedding_params) / 14e9 - 1) < 0.05
    # "Insights into DeepSeek-V3" (arXiv 2505.09343), table 2: 250 GFLOPs per token.
    assert abs(c.flops_per_token / 250e9 - 1) < 0.02


def test_deepseek_v3_preset_has_the_papers_architecture():
    p = get_preset("deepseek-v3")
    assert (p.num_layers, p.first_k_dense, p.hidden_size, p.vocab_size) == (61, 3, 7168, 129280)
    assert (p.num_attention_heads, p.q_lora_rank, p.kv_lora_rank) == (128, 1536, 512)
    assert (p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim) == (128, 64, 128)
    assert (p.num_routed_experts, p.num_shared_experts, p.moe_ffn_hidden_size, p.moe_router_topk) == (256, 1, 2048, 8)
    assert (p.ffn_hidden_size, p.num_groups, p.group_topk, p.route_scale) == (18432, 8, 4, 2.5)
    assert p.score_function == "sigmoid" and p.expert_bias and p.expert_bias_update_rate == 1e-3
    assert p.seq_aux_loss_coeff == 1e-4 and p.mtp_num_layers == 1 and p.mtp_loss_scaling_factor == 0.3
    assert p.init_method_std == 0.006


def test_deepseek_v2_lite_preset_matches_the_published_model():
    """DeepSeek-V2 report, appendix B: V2-Lite has 15.7B parameters, 2.4B activated."""
    c = count(get_preset("deepseek-v2-lite"))
    assert abs(c.total_params / 15.7e9 - 1) < 0.01
    assert abs(c.active_params / 2.4e9 - 1) < 0.03


def test_small_presets_fit_their_targets():
    proxy, tiny = count(get_preset("dsv3-proxy")), count(get_preset("dsv3-tiny"))
    # 80 GB at ~18 bytes per parameter (bf16 weights, fp32 grads and Adam) leaves room for activations.
    assert (proxy.total_params + proxy.mtp_params) * 18 < 60e9
    assert 1e6 < tiny.total_params + tiny.mtp_params < 10e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_info_json_has_the_documented_keys(name):
    out = subprocess.run(
        [sys.executable, "-m", "megatron_dsv3.cli", "info", name, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    data = json.loads(out)
    for key in ("total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token", "flops_per_token"):
        assert isinstance(data[key], int)
    assert data["total_params"] == count(get_preset(name)).total_params


def _built_parameter_count(preset) -> int:
    """Parameters of the GPTModel Megatron builds from the dsv3 spec, on the meta device."""
    import torch

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    with torch.device("meta"):
        _, _, (model,) = build_chunks(preset, ParallelLayout(), ddp=False, extra_args=("--no-initialization",))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_builds_with_the_parameters_we_count(name, megatron_single_process):
    """The built model (all layers for the small presets, a dense + an MoE layer + MTP for the
    large ones) has exactly the parameters the accounting formulas give."""
    preset = get_preset(name)
    if preset.num_layers > 12:
        preset = preset.with_overrides(num_layers=preset.first_k_dense + 1)
    c = count(preset)
    assert _built_parameter_count(preset) == c.total_params + c.mtp_params
