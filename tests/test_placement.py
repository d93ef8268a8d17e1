"""The Placement: which rank and chunk hold which layers, embedding, head, loss and MTP.

Megatron's own placements (1F1B, interleaved, layout strings) are checked against Megatron's own
layer functions; DeepSeek's V (DualPipeV) and mirrored (DualPipe) placements against the rule of the
paper's figure (arXiv 2412.19437v2, section 3.2.1; the ``deepseek-ai/DualPipe`` README for DualPipeV):
under DualPipeV rank r holds stages r and 2P-1-r, so rank 0 holds the embedding, the head, the loss and MTP.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel import ParallelLayout, place, placement_for
from megatron_dsv3.parallel.megatron_layout import megatron_layout

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def _megatron_config(num_layers: int, pp: int, vpp: int | None):
    return SimpleNamespace(
        num_layers=num_layers, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        pipeline_model_parallel_layout=None, num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
    )


@pytest.mark.parametrize("pp,vpp", [(1, None), (2, None), (4, None), (2, 2), (4, 2), (2, 4)])
def test_megatron_placements_give_each_chunk_megatrons_layers_and_roles(pp, vpp):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    p = place(16, 1, pp, vpp=vpp)
    assert p.schedule == ("interleaved" if vpp else "1f1b") and (p.pp, p.vpp) == (pp, vpp or 1)
    config = _megatron_config(16, pp, vpp)
    for r in range(pp):
        for v in range(vpp or 1):
            chunk = p.chunk(r, v)
            stage_vp = v if vpp else None
            offset = get_transformer_layer_offset(config, vp_stage=stage_vp, pp_rank=r)
            count = get_num_layers_to_build(config, vp_stage=stage_vp, pp_rank=r)
            assert chunk.decoders == tuple(range(offset, offset + count))
            assert chunk.stage == v * pp + r
            last = (r, v) == (pp - 1, (vpp or 1) - 1)
            assert chunk.embedding == ((r, v) == (0, 0))
            assert chunk.loss == last and chunk.mtp == (1 if last else 0)
    assert p.loss_ranks == (pp - 1,) and p.embedding_ranks() == tuple(sorted({0, pp - 1}))


def test_a_megatron_layout_string_places_layers_as_megatrons_layout_class():
    from megatron.core import parallel_state
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    text = "Et|tt|ttt|t|tt|tmL"  # pp=3, vpp=2: Megatron's flattened order is vp-major
    p = place(10, 1, 3, layout=text)
    parsed = PipelineParallelLayerLayout(text, 3)
    assert p.schedule == "interleaved" and p.vpp == 2
    # Megatron's layout reads the virtual-stage count from its parallel state.
    saved = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(2)
    try:
        for r in range(3):
            for v in range(2):
                assert list(p.chunk(r, v).decoders) == parsed.get_layer_id_list(vp_stage=v, pp_rank=r)
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(saved)
    assert p.chunk(0, 0).embedding and p.chunk(2, 1).loss and p.chunk(2, 1).mtp == 1


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_v_placement_puts_stages_r_and_2p_minus_1_minus_r_on_rank_r(pp):
    layers = 8 * pp
    p = place(layers, 1, pp, schedule="dualpipev")
    per = layers // (2 * pp)
    assert (p.pp, p.vpp, p.num_stages) == (pp, 2, 2 * pp)
    for r in range(pp):
        down, up = p.chunk(r, 0), p.chunk(r, 1)
        assert (down.stage, up.stage) == (r, 2 * pp - 1 - r)
        assert down.decoders == tuple(range(r * per, (r + 1) * per))
        assert up.decoders == tuple(range((2 * pp - 1 - r) * per, (2 * pp - r) * per))
    # Rank 0 holds the embedding, the output head, the loss and MTP together.
    assert p.chunk(0, 0).embedding and p.chunk(0, 1).loss and p.chunk(0, 1).mtp == 1
    assert p.loss_rank == 0 and p.loss_ranks == (0,) and p.mtp_ranks == (0,)
    assert p.embedding_ranks() == (0,)  # MTP shares the embedding on the same rank
    assert [i for c in p.stages for i in c.decoders] == list(range(layers))
    assert sum(c.embedding for c in p.chunks()) == 1 and sum(c.loss for c in p.chunks()) == 1


def test_v_placement_takes_uneven_stages_in_model_order():
    p = place(14, 1, 2, schedule="dualpipev", layout="Et*3|t*4|t*4|t*3mL")
    assert [len(c.decoders) for c in p.stages] == [3, 4, 4, 3]
    assert p.chunk(0, 0).decoders == (0, 1, 2) and p.chunk(1, 0).decoders == (3, 4, 5, 6)
    assert p.chunk(1, 1).decoders == (7, 8, 9, 10) and p.chunk(0, 1).decoders == (11, 12, 13)


@pytest.mark.parametrize("pp", [2, 4])
def test_dualpipe_placement_mirrors_every_stage_across_the_pipeline(pp):
    p = place(4 * pp, 1, pp, schedule="dualpipe")

    def by_direction(r, direction):
        return next(c for c in p.rows[r] if c.direction == direction)

    for r in range(pp):
        original, mirror = by_direction(r, 0), by_direction(r, 1)
        assert original.stage == r and not original.mirror
        assert mirror.stage == pp - 1 - r and mirror.mirror
        assert mirror.decoders == by_direction(pp - 1 - r, 0).decoders  # the same layers, a second copy
        # The chunk nearer its direction's start comes first, so MTP is always a rank's last chunk.
        assert p.chunk(r, 0) is (original if r < pp // 2 else mirror)
    assert p.chunk(pp - 1, 1).mtp == 1 and p.chunk(0, 1).mtp == 1
    assert p.loss_ranks == (0, pp - 1) and p.loss_rank == pp - 1 and p.param_copies == 2
    assert p.embedding_group() == (0,) and p.report_rank == pp - 1
    assert [i for c in p.stages for i in c.decoders] == list(range(4 * pp))


@pytest.mark.parametrize("layout, words", [
    ("Et*3|t*4|t*4mL", "has 3 stages"),
    ("Et*3|t*4|t*4m|t*3L", "MTP layers m in the last stage"),
    ("t*3|Et*4|t*4|t*3mL", "start with the embedding"),
    ("Et*3|t*4|t*4|t*2mL", "has 13 decoder layers"),
])
def test_a_bad_v_layout_names_the_problem_and_the_fix(layout, words):
    with pytest.raises(ConfigError) as err:
        place(14, 1, 2, schedule="dualpipev", layout=layout)
    assert words in str(err.value) and "4 stages in model order" in str(err.value) and "Fix:" in str(err.value)


def test_layers_that_do_not_split_over_the_v_stages_ask_for_a_layout():
    with pytest.raises(ConfigError, match="4 stages, which do not divide model.num_layers=6.*parallel.layout"):
        place(6, 1, 2, schedule="dualpipev")


def test_megatron_layout_object_answers_from_the_placement_and_pickles():
    from megatron.core.transformer.enums import LayerType

    p = place(8, 1, 2, schedule="dualpipev")
    layout = megatron_layout(p)
    assert layout.virtual_pipeline_model_parallel_size == 2 and layout.pipeline_model_parallel_size == 2
    for r in range(2):
        for v in range(2):
            chunk = p.chunk(r, v)
            assert layout.get_num_layers_to_build(vp_stage=v, pp_rank=r) == len(chunk.decoders)
            assert layout.get_layer_offset(vp_stage=v, pp_rank=r) == chunk.decoders[0]
    assert layout.layout[0][1].count(LayerType.mtp) == 1 and LayerType.loss in layout.layout[0][1]
    assert layout.validate_layer_layout(num_layers=8, mtp_num_layers=1) is False
    copy = pickle.loads(pickle.dumps(layout))  # Megatron saves its arguments in every checkpoint
    assert copy.placement == p


def test_placement_for_a_preset_and_a_layout_is_the_recipes():
    from megatron_dsv3.model.presets import get_preset

    preset = get_preset("dsv3-tiny").with_overrides(num_layers=8)
    p = placement_for(preset, ParallelLayout(pp=2, schedule="dualpipev"))
    assert p.schedule == "dualpipev" and p.chunk(0, 1).loss and p.num_layers == 8
