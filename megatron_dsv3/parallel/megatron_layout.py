"""A placement handed to Megatron as its own layout object, and the options DeepSeek's schedules run with.

Megatron asks its ``PipelineParallelLayerLayout`` (``megatron/core/transformer/
pipeline_parallel_layer_layout.py``) which layers a chunk builds and where their numbering starts;
that class hard-codes the interleaved order, in which a V cannot be written.  A subclass that answers
from a :class:`~megatron_dsv3.parallel.placement.Placement` is the one way a DualPipe(V) placement
reaches Megatron (``TransformerConfig`` accepts a layout object as it is), and it carries the
schedule's :class:`ScheduleOptions` with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_dsv3.parallel.chunk import Chunk
from megatron_dsv3.parallel.placement import Placement


@dataclass(frozen=True)
class ScheduleOptions:
    """How DeepSeek's schedules run their operations (``--dualpipe-zero-bubble``, ``--dualpipe-fb-overlap``).

    ``zero_bubble``: the backwards the schedule marks ``z`` leave their weight GEMMs for a later
    ``W`` (off: every backward is whole and ``W`` does nothing).  ``fb_overlap``: a forward and a
    backward paired by the schedule run overlapped, layer piece by layer piece (off: one after the
    other).  Either way the losses are the same.
    """

    zero_bubble: bool = True
    fb_overlap: bool = False


def schedule_options_of(config) -> ScheduleOptions:
    """The options a config's pipeline runs with (the defaults for Megatron's own placements)."""
    config = getattr(config, "transformer", config)
    return getattr(config.pipeline_model_parallel_layout, "options", None) or ScheduleOptions()


def megatron_layout(placement: Placement, options: ScheduleOptions | None = None):
    """A Megatron ``PipelineParallelLayerLayout`` that describes a DeepSeek placement.

    Megatron's layout class hard-codes the interleaved order (stage ``v * pp + r`` on rank ``r``,
    chunk ``v``) and numbers layers by a running sum in that order; this subclass fills
    ``layout[pp_rank][vp_stage]`` from the placement and answers Megatron's layer-offset questions
    from it, so ``TransformerBlock`` numbers every layer globally (and checkpoints key it so) with
    no other change.  ``TransformerConfig`` accepts a layout object as it is.
    """
    return _placement_layout_class()(placement, options or ScheduleOptions())


@functools.cache
def _placement_layout_class():
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    class PlacementLayout(PipelineParallelLayerLayout):
        """Megatron's layout interface over a megatron-dsv3 ``Placement`` (see ``megatron_layout``)."""

        def __init__(self, placement: Placement, options: ScheduleOptions):  # no parsing: the placement is the layout
            self.placement = placement
            self.options = options
            self.input_data = f"{placement.schedule}: " + "; ".join(placement.render().splitlines())
            self.pipeline_model_parallel_size = placement.pp
            self.virtual_pipeline_model_parallel_size = placement.vpp
            self.layout = [[_kinds(c, LayerType) for c in row] for row in placement.rows]
            self.flatten_layout = [k for c in placement.stages for k in _kinds(c, LayerType)]

        def __reduce__(self):  # picklable: Megatron saves its arguments in every checkpoint
            return (megatron_layout, (self.placement, self.options))

        def __eq__(self, other):  # configs built from the same arguments compare equal
            return isinstance(other, PlacementLayout) and (self.placement, self.options) == (other.placement,
                                                                                              other.options)

        def __hash__(self):
            return hash((self.placement, self.options))

        def validate_layer_layout(self, num_layers, mtp_num_layers):
            if num_layers != self.placement.num_layers or (mtp_num_layers or 0) != self.placement.mtp_num_layers:
                raise ValueError(f"the {self.placement.schedule} placement has {self.placement.num_layers}"
                                 f" decoder and {self.placement.mtp_num_layers} MTP layers, the config"
                                 f" {num_layers} and {mtp_num_layers}")
            return False  # MTP sits with the loss: never "standalone"

        def _chunk(self, vp_stage, pp_rank) -> Chunk:
            if pp_rank is None:
                from megatron.core import parallel_state

                pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            return self.placement.chunk(pp_rank, vp_stage)

        def get_num_layers_to_build(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
            return _kinds(self._chunk(vp_stage, pp_rank), LayerType).count(layer_type)

        def get_layer_offset(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
            if layer_type != LayerType.decoder:
                return 0  # MTP layers all sit in one chunk, numbered from 0
            chunk = self._chunk(vp_stage, pp_rank)
            return sum(len(c.decoders) for c in self.placement.stages if c.stage < chunk.stage)

    return PlacementLayout


def _kinds(chunk: Chunk, LayerType) -> list:
    kinds = [LayerType.embedding] if chunk.embedding else []
    kinds += [LayerType.decoder] * len(chunk.decoders) + [LayerType.mtp] * chunk.mtp
    return kinds + ([LayerType.loss] if chunk.loss else [])
