"""Our Megatron model computes what HuggingFace transformers' DeepseekV3 computes.

An independent implementation of the whole architecture (MLA with decoupled RoPE or YaRN, the
sigmoid router with expert bias and group limits, shared experts, dense first layers, RMSNorm):
the same weights, mapped through ``megatron_dsv3.model.hf_names``, must give the same logits.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.model import hf_names as hf_mapping
from megatron_dsv3.model.presets import get_preset

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

transformers = pytest.importorskip("transformers")

TINY = get_preset("dsv3-tiny")


def _hf_model(p):
    """transformers' DeepseekV3 (sigmoid routing) or DeepseekV2 (softmax routing) for preset ``p``,
    configured by the converter's one preset -> config.json mapping."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    from megatron_dsv3.convert.hf_config import hf_config_from_preset

    config = hf_config_from_preset(p)
    v3 = config.pop("model_type") == "deepseek_v3"
    config.pop("architectures")
    config_cls, model_cls = (DeepseekV3Config, DeepseekV3ForCausalLM) if v3 else (DeepseekV2Config, DeepseekV2ForCausalLM)
    return model_cls(config_cls(**config, attn_implementation="eager")).eval()


def _hf_checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """transformers 5 packs experts into 3-D tensors; released checkpoints name each expert."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2, dim=0)
                state[f"{prefix}{e}.gate_proj.weight"], state[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, w in enumerate(tensor):
                state[f"{prefix}{e}.down_proj.weight"] = w
        else:
            state[name] = tensor
    return state


def _megatron_model(p):
    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    _, _, (model,) = build_chunks(p, ParallelLayout(), ddp=False)
    return model.eval()


def _randomize(hf_model, seed: int) -> None:
    """Random weights everywhere (norm weights and expert biases too, so their mapping matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(hf_model.named_parameters()) + list(hf_model.named_buffers()):
            if t.dtype.is_floating_point and "inv_freq" not in name:
                if name.endswith("norm.weight"):
                    t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
                elif name.endswith("e_score_correction_bias"):
                    t.copy_(0.05 * torch.randn(t.shape, generator=g))
                else:
                    t.copy_(0.05 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize(
    "preset",
    [
        TINY,
        TINY.with_overrides(rope_type="yarn", yarn_factor=40.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0),
        # DeepSeek-V2-Lite style (against transformers' DeepseekV2): no query compression, softmax
        # gates without renormalisation, two shared experts, no expert bias.
        TINY.with_overrides(q_lora_rank=None, score_function="softmax", normalize_topk=False,
                            expert_bias=False, num_groups=1, group_topk=1, route_scale=1.0,
                            num_shared_experts=2, mtp_num_layers=0),
        # 4 groups of 4 experts, top-4 from 1 group: Megatron-Core 0.19 alone would score a group by
        # its top 4, DeepSeek (and transformers) by its top 2.
        TINY.with_overrides(num_groups=4, group_topk=1, moe_router_topk=4),
    ],
    ids=["dsv3-tiny", "dsv3-tiny-yarn", "v2-lite-style", "groups-top4-from-1"],
)
def test_logits_match_transformers_deepseek(preset, megatron_single_process):
    torch.manual_seed(0)
    hf_model = _hf_model(preset)
    _randomize(hf_model, seed=1)
    model = _megatron_model(preset)
    state = hf_mapping.hf_to_megatron(_hf_checkpoint_tensors(hf_model), preset)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") or "local_tokens_per_expert" in k or k.startswith("mtp.") for k in missing), missing

    tokens = torch.randint(0, preset.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        got = model(tokens, positions, None)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
@pytest.mark.parametrize("preset", [TINY, get_preset("deepseek-v2-lite").with_overrides(num_layers=2)],
                         ids=["dsv3-tiny", "v2-lite-2-layers"])
def test_name_table_holds_exactly_the_built_models_weights_with_their_shapes(preset, experts, megatron_single_process):
    """Every parameter (and expert bias) of the built model, MTP included, has one HF name, and the
    table's shape for it is the built one.  The table names ``SequentialMLP``'s per-expert weights;
    the grouped experts hold the same weights stacked (``experts.linear_fc1.weight`` is
    (experts, *shape)) and load the per-expert names (``test_grouped_experts.py``)."""
    import re

    import torch as _torch

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    with _torch.device("meta"):
        _, _, (model,) = build_chunks(preset, ParallelLayout(), ddp=False,
                                      extra_args=("--no-initialization", "--dsv3-experts", experts))
    built = {n: tuple(t.shape) for n, t in model.named_parameters()} | {
        n: tuple(t.shape) for n, t in model.named_buffers() if n.endswith("expert_bias")}
    mappings = hf_mapping.name_table(preset, include_mtp=True)
    table = {m.megatron: m.shape for m in mappings}
    if experts == "grouped":
        stacked = {}
        for name, shape in table.items():
            key = re.sub(r"\.local_experts\.\d+\.", ".", name)
            stacked[key] = (stacked[key][0] + 1, *shape) if key != name and key in stacked else (
                (1, *shape) if key != name else shape)
        table = stacked
    assert table == built
    hf_names = [h for m in mappings for h in m.hf]
    assert len(hf_names) == len(set(hf_names))


@pytest.mark.parametrize("preset", [
    TINY,
    TINY.with_overrides(q_lora_rank=None, num_shared_experts=2, expert_bias=False, score_function="softmax",
                        num_groups=1, group_topk=1, mtp_num_layers=0),
    get_preset("deepseek-v2-lite").with_overrides(num_layers=2),
], ids=["dsv3-tiny", "v2-lite-style", "v2-lite-2-layers"])
def test_name_table_hf_shapes_are_transformers_checkpoint_shapes(preset):
    """The names and shapes an imported checkpoint is checked against (``hf_shapes``) are those of
    transformers' model for the preset, MTP aside (transformers builds no MTP layer)."""
    with torch.device("meta"):
        hf_model = _hf_model(preset.with_overrides(mtp_num_layers=0))
    theirs = {n: tuple(t.shape) for n, t in _hf_checkpoint_tensors(hf_model).items()
              if not n.endswith("rotary_emb.inv_freq")}
    mtp = f"model.layers.{preset.num_layers}."
    ours = {n: s for n, s in hf_mapping.hf_shapes(preset).items() if not n.startswith(mtp)}
    assert ours == theirs


def test_name_table_inverts_itself_bit_identically():
    p = get_preset("dsv3-tiny")
    g = torch.Generator().manual_seed(0)
    hf = {}
    for m in hf_mapping.name_table(p, include_mtp=True):
        for name in m.hf:
            shape = (p.num_attention_heads * p.qk_head_dim, 8) if "q_b_proj" in name else (
                (p.kv_lora_rank + p.qk_rope_head_dim, 8) if "kv_a_proj" in name else (6, 8))
            hf[name] = torch.randn(shape, generator=g)
    back = hf_mapping.megatron_to_hf(hf_mapping.hf_to_megatron(hf, p, include_mtp=True), p, include_mtp=True)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
