"""Parallel sizes and the ``Placement``: which rank and chunk hold which stages, loss, head and MTP."""

from megatron_dsv3.parallel.layout import SCHEDULES, ParallelLayout
from megatron_dsv3.parallel.placement import Chunk, Placement, place, placement_for, placement_of

__all__ = ["SCHEDULES", "Chunk", "ParallelLayout", "Placement", "place", "placement_for", "placement_of"]
