"""Which layers each pipeline rank holds, and which micro-batches it keeps in flight.

Placement follows Megatron-Core 0.19: with ``--pipeline-model-parallel-layout`` the string is parsed
and validated by Megatron's own ``PipelineParallelLayerLayout``
(``megatron/core/transformer/pipeline_parallel_layer_layout.py``); without it the decoder layers are
split evenly over ``pp x vpp`` virtual stages in Megatron's order (virtual stage ``v`` of rank ``r``
holds block ``v * pp + r``), the embedding sits on rank 0's first chunk, and the output head, the
loss and the MTP block on the last rank's last chunk.

The in-flight counts follow ``get_pp_rank_microbatches`` and ``get_schedule_table`` in
``megatron/core/pipeline_parallel/schedules.py``: under 1F1B rank ``r`` runs ``pp - r - 1`` warmup
forwards and one more before its first backward; under the interleaved schedule it runs
``2 (pp - r - 1) + (vpp - 1) * pp`` warmup forwards (micro-batches taken ``pp`` at a time per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.megatron_args import ParallelLayout
from megatron_dsv3.presets import ModelPreset


@dataclass(frozen=True)
class Chunk:
    """One (virtual) pipeline stage: what it holds."""

    pp_rank: int
    vp_stage: int
    embedding: bool
    decoders: tuple[int, ...]  # 0-based global decoder-layer ids
    mtp: int  # MTP layers on this chunk
    loss: bool  # output head and loss

    def describe(self, preset: ModelPreset) -> str:
        parts = ["embedding"] if self.embedding else []
        if self.decoders:
            first, last = self.decoders[0], self.decoders[-1]
            dense = sum(1 for i in self.decoders if i < preset.first_k_dense)
            span = f"decoder {first}" if first == last else f"decoders {first}-{last}"
            if dense:
                span += " (dense)" if dense == len(self.decoders) else f" ({dense} dense)"
            parts.append(span)
        if self.mtp:
            parts.append("mtp" if self.mtp == 1 else f"mtp x{self.mtp}")
        if self.loss:
            parts.append("output head + loss")
        return ", ".join(parts) or "(empty)"


def parse_layout(text: str, pp: int, preset: ModelPreset):
    """Megatron's ``PipelineParallelLayerLayout`` for ``text``, validated against the model."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        parsed = PipelineParallelLayerLayout(text, pp)
        parsed.validate_layer_layout(num_layers=preset.num_layers, mtp_num_layers=preset.mtp_num_layers or None)
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(
            f"parallel.layout={text!r} is not a valid Megatron pipeline layout for pp={pp},"
            f" {preset.num_layers} decoder layers and {preset.mtp_num_layers} MTP layers: {err}",
            fix="write one stage per `|` (pp x vpp stages): E = embedding (first), t = decoder layer,"
            " m = MTP layer (after the last decoder), L = loss (last); e.g. 'Et*3|(t*4|)*14,t*2mL'",
            key="parallel.layout",
        ) from None
    return parsed


def placement(preset: ModelPreset, layout: ParallelLayout) -> list[list[Chunk]]:
    """``chunks[pp_rank][vp_stage]``: the layers of every (virtual) pipeline stage."""
    if layout.layout:
        return _from_layout(parse_layout(layout.layout, layout.pp, preset))
    pp, vpp = layout.pp, layout.vpp or 1
    per = preset.num_layers // (pp * vpp)
    chunks = []
    for r in range(pp):
        row = []
        for v in range(vpp):
            start = (v * pp + r) * per
            last = r == pp - 1 and v == vpp - 1
            row.append(Chunk(r, v, r == 0 and v == 0, tuple(range(start, start + per)),
                             preset.mtp_num_layers if last else 0, last))
        chunks.append(row)
    return chunks


def _from_layout(parsed) -> list[list[Chunk]]:
    from megatron.core.transformer.enums import LayerType

    pp, vpp = parsed.pipeline_model_parallel_size, parsed.virtual_pipeline_model_parallel_size
    # Decoder ids run over virtual stages first, then ranks (Megatron's flatten order).
    next_id, ids = 0, {}
    for v in range(vpp):
        for r in range(pp):
            count = parsed.layout[r][v].count(LayerType.decoder)
            ids[r, v] = tuple(range(next_id, next_id + count))
            next_id += count
    return [
        [
            Chunk(r, v, LayerType.embedding in parsed.layout[r][v], ids[r, v],
                  parsed.layout[r][v].count(LayerType.mtp), LayerType.loss in parsed.layout[r][v])
            for v in range(vpp)
        ]
        for r in range(pp)
    ]


def virtual_stages(layout: ParallelLayout) -> int:
    """Virtual stages per pipeline rank (1 without interleaving), from vpp or the layout string."""
    if layout.layout:
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        return PipelineParallelLayerLayout.get_num_stages_from_str(layout.layout) // layout.pp
    return layout.vpp or 1


def forward_order(num_microbatches: int, vpp: int, group: int) -> list[int]:
    """The chunk of each forward pass in Megatron's interleaved order (``get_schedule_table``)."""
    order = []
    for start in range(0, num_microbatches, group):
        size = num_microbatches - start if start + group >= num_microbatches else group
        for chunk in range(vpp):
            order += [chunk] * size
    return order


def in_flight(pp: int, rank: int, vpp: int, num_microbatches: int) -> list[int]:
    """Chunks of the forward passes rank ``rank`` holds activations for when its first backward starts."""
    if pp == 1:  # forward_backward_no_pipelining: one micro-batch at a time
        return [0]
    if vpp == 1:
        return [0] * min(pp - rank, num_microbatches)
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
    count = min(warmup + 1, num_microbatches * vpp)
    return forward_order(num_microbatches, vpp, pp)[:count]
