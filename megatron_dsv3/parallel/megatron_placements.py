"""Megatron's own placements (``1f1b``, ``interleaved``), from Megatron's own rules.

Layers per stage come from Megatron's ``PipelineParallelLayerLayout`` for a layout string, else
``get_num_layers_to_build`` / ``get_transformer_layer_offset`` (``megatron/core/transformer/
transformer_block.py``, ``transformer_layer.py``), so a placement never disagrees with what Megatron
builds.  Each function returns the rows ``rows[pp_rank][vp_stage]`` of a
:class:`~megatron_dsv3.parallel.placement.Placement`.
"""

from __future__ import annotations

from types import SimpleNamespace

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.chunk import Chunk

Rows = tuple[tuple[Chunk, ...], ...]


def count_stages(text: str) -> int:
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    return PipelineParallelLayerLayout.get_num_stages_from_str(text)


def megatron_layout_object(layout, pp: int, num_layers: int, mtp_num_layers: int):
    """Megatron's ``PipelineParallelLayerLayout`` for a string (validated), or the object as given."""
    if not isinstance(layout, str):
        return layout
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        parsed = PipelineParallelLayerLayout(layout, pp)
        parsed.validate_layer_layout(num_layers=num_layers, mtp_num_layers=mtp_num_layers or None)
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(
            f"parallel.layout={layout!r} is not a valid Megatron pipeline layout for pp={pp},"
            f" {num_layers} decoder layers and {mtp_num_layers} MTP layers: {err}",
            fix="write one stage per `|` (pp x vpp stages): E = embedding (first), t = decoder layer,"
            " m = MTP layer (after the last decoder), L = loss (last); e.g. 'Et*3|(t*4|)*14,t*2mL'",
            key="parallel.layout",
        ) from None
    return parsed


def from_megatron_layout(parsed) -> Rows:
    from megatron.core.transformer.enums import LayerType

    pp, vpp = parsed.pipeline_model_parallel_size, parsed.virtual_pipeline_model_parallel_size
    # Decoder ids run over virtual stages first, then ranks (Megatron's flattened order).
    next_id, rows = 0, [[None] * vpp for _ in range(pp)]
    for v in range(vpp):
        for r in range(pp):
            kinds = parsed.layout[r][v]
            count = kinds.count(LayerType.decoder)
            rows[r][v] = Chunk(r, v, v * pp + r, tuple(range(next_id, next_id + count)),
                               embedding=LayerType.embedding in kinds, mtp=kinds.count(LayerType.mtp),
                               loss=LayerType.loss in kinds)
            next_id += count
    return tuple(tuple(row) for row in rows)


def megatron_even(num_layers: int, mtp_num_layers: int, pp: int, vpp: int | None, config) -> Rows:
    """Megatron's own split (``get_num_layers_to_build`` / ``get_transformer_layer_offset``)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = vpp if (vpp or 1) > 1 else None
    if config is None:
        config = SimpleNamespace(
            num_layers=num_layers, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
            pipeline_model_parallel_layout=None, num_layers_in_first_pipeline_stage=None,
            num_layers_in_last_pipeline_stage=None, account_for_embedding_in_pipeline_split=False,
            account_for_loss_in_pipeline_split=False,
        )
        if num_layers % (pp * (vpp or 1)):
            raise ConfigError(
                f"parallel.pp x vpp = {pp * (vpp or 1)} pipeline stages do not divide model.num_layers={num_layers}",
                fix=f"choose pp x vpp among the divisors of {num_layers}, or give an explicit parallel.layout",
                key="parallel.pp",
            )
    rows = []
    for r in range(pp):
        row = []
        for v in range(vpp or 1):
            stage_vp = v if vpp else None
            count = get_num_layers_to_build(config, vp_stage=stage_vp, pp_rank=r)
            offset = get_transformer_layer_offset(config, vp_stage=stage_vp, pp_rank=r)
            last = r == pp - 1 and v == (vpp or 1) - 1
            row.append(Chunk(r, v, v * pp + r, tuple(range(offset, offset + count)), embedding=r == 0 and v == 0,
                             mtp=mtp_num_layers if last else 0, loss=last))
        rows.append(tuple(row))
    return tuple(rows)
