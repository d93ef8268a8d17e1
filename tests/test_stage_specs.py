"""Per-stage spec: each pipeline (virtual) stage holds the right layers, dense or MoE, and MTP only
on the last stage, for plain, interleaved and custom layouts.

The expected placement is computed here by hand from Megatron's documented rules: with P stages
and V virtual stages, the L layers split into P*V equal chunks and chunk v*P + r sits on rank r,
virtual stage v; the first ``first_k_dense`` layers are dense.
"""

from __future__ import annotations

import pytest

from megatron_dsv3.model.presets import get_preset
from megatron_dsv3.parallel import ParallelLayout

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

PRESET = get_preset("dsv3-tiny").with_overrides(num_layers=8, first_k_dense=3)


def _config(layout: ParallelLayout, monkeypatch):
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    monkeypatch.setenv("WORLD_SIZE", str(layout.world_size))
    monkeypatch.setenv("RANK", "0")
    return core_transformer_config_from_args(parse_megatron_args(megatron_argv(PRESET, layout, cpu=True)))


def _describe(config, pp_rank: int, vp_stage):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_dsv3 import dsv3
    from megatron_dsv3.parallel import placement_of

    spec = dsv3(config, vp_stage=vp_stage, pp_rank=pp_rank)
    kinds = ["moe" if s.submodules.mlp.func is MoELayer else "dense" for s in spec.layer_specs]
    return list(placement_of(config).chunk(pp_rank, vp_stage).decoders), kinds, spec.mtp_block_spec is not None


def _expected(layer_ids):
    return ["dense" if i < PRESET.first_k_dense else "moe" for i in layer_ids]


@pytest.mark.parametrize("pp,vpp", [(1, None), (2, None), (4, None), (2, 2), (2, 4), (4, 2)])
def test_each_stage_holds_its_layers_and_mtp_sits_on_the_last(pp, vpp, monkeypatch, megatron_single_process):
    config = _config(ParallelLayout(pp=pp, vpp=vpp), monkeypatch)
    chunks = pp * (vpp or 1)
    size = PRESET.num_layers // chunks
    seen = []
    for rank in range(pp):
        for v in range(vpp or 1):
            ids, kinds, has_mtp = _describe(config, rank, v if vpp else None)
            chunk = v * pp + rank
            assert ids == list(range(chunk * size, (chunk + 1) * size))
            assert kinds == _expected(ids)
            assert has_mtp == (chunk == chunks - 1)
            seen += ids
    assert sorted(seen) == list(range(PRESET.num_layers))


def test_custom_layout_places_layers_and_mtp_as_written(monkeypatch, megatron_single_process):
    # Embedding + 1 layer | 3 layers | 3 layers | 1 layer + MTP + loss.
    layout = ParallelLayout(pp=4, layout="Et|ttt|ttt|tmL")
    config = _config(layout, monkeypatch)
    expected_ids = [[0], [1, 2, 3], [4, 5, 6], [7]]
    for rank in range(4):
        ids, kinds, has_mtp = _describe(config, rank, None)
        assert ids == expected_ids[rank]
        assert kinds == _expected(ids)
        assert has_mtp == (rank == 3)


def test_mtp_block_is_built_from_the_same_layer_spec(monkeypatch, megatron_single_process):
    """MTP's transformer layer is the dsv3 MoE layer (MLA + DeepSeekMoE), not Megatron's default."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_dsv3 import dsv3
    from megatron_dsv3.model.attention import MLACoreAttention

    config = _config(ParallelLayout(), monkeypatch)
    spec = dsv3(config)
    mtp_layer = spec.mtp_block_spec.layer_specs[0].submodules.mtp_model_layer
    assert mtp_layer is spec.layer_specs[-1]
    attention = mtp_layer.submodules.self_attention
    assert attention.module is MLASelfAttention
    assert attention.submodules.core_attention is MLACoreAttention
