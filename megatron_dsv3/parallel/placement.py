"""The ``Placement``: which pipeline rank and chunk hold which stages, layers, embedding, head, loss, MTP.

Every part of the package that needs to know where a layer or the loss lives asks a placement: the
spec (which layers a chunk builds), the model builder (Megatron's ``pre_process``/``post_process``
roles), the memory estimate, the batch and loss reporting of the training loop, and the test harness.

A model is a sequence of *stages* in model order: stage 0 holds the embedding, the last stage the
final norm, the output head, the loss and Multi-Token Prediction (MTP sits with the loss because it
shares the embedding and the head; arXiv 2412.19437v2, section 2.2).  A schedule places the stages on
``pp`` ranks, each rank holding one or more *chunks* (Megatron's virtual stages, ``vp_stage``):

* ``1f1b`` (Megatron): one stage per rank, stage ``r`` on rank ``r``.
* ``interleaved`` (Megatron): ``pp x vpp`` stages, stage ``s`` on rank ``s % pp``, chunk ``s // pp``.
* ``dualpipev`` (DeepSeek): ``2 pp`` stages in a V: rank ``r`` holds stage ``r`` (chunk 0) and stage
  ``2 pp - 1 - r`` (chunk 1), so rank 0 holds the embedding, the head, the loss and MTP together.
* ``dualpipe`` (DeepSeek): ``pp`` stages, each held twice: rank ``r`` holds stage ``r`` for the
  micro-batches entering at rank 0 (direction 0) and a mirrored copy of stage ``pp - 1 - r`` for
  those entering at rank ``pp - 1`` (direction 1); the two copies keep identical weights.  A rank's
  first chunk (``vp_stage`` 0) is the one nearer the start of its direction, as in a V, so the
  chunk holding MTP is always a rank's last (Megatron builds MTP only there).

Layers per stage come from Megatron's rules for Megatron's schedules
(:mod:`megatron_dsv3.parallel.megatron_placements`), so a placement never disagrees with what Megatron
builds.  For DeepSeek's schedules (:mod:`megatron_dsv3.parallel.deepseek_placements`) the layout string
lists the stages in model order (``"Et*3|t*4|t*4|t*3mL"``); without one the layers split evenly.  A
DualPipe(V) placement reaches Megatron as its layout object (:mod:`megatron_dsv3.parallel.megatron_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.chunk import Chunk
from megatron_dsv3.parallel.deepseek_placements import deepseek_rows, deepseek_stages
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES, MEGATRON_SCHEDULES, SCHEDULES, ParallelLayout
from megatron_dsv3.parallel.megatron_placements import (
    count_stages,
    from_megatron_layout,
    megatron_even,
    megatron_layout_object,
)

__all__ = ["Chunk", "Placement", "place", "placement_for", "placement_of", "default_schedule"]


@dataclass(frozen=True)
class Placement:
    """``rows[pp_rank][vp_stage]``: the chunk each rank holds, for one schedule."""

    schedule: str
    rows: tuple[tuple[Chunk, ...], ...]
    num_layers: int
    mtp_num_layers: int

    @property
    def pp(self) -> int:
        return len(self.rows)

    @property
    def vpp(self) -> int:
        """Chunks per rank (Megatron's virtual pipeline size; 1 without virtual stages)."""
        return len(self.rows[0])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stages(self) -> tuple[Chunk, ...]:
        """One chunk per stage, in model order (DualPipe's mirrored copies left out)."""
        return tuple(sorted((c for row in self.rows for c in row if not c.mirror), key=lambda c: c.stage))

    @property
    def param_copies(self) -> int:
        """How many copies of the model's weights the pipeline holds (DualPipe: 2)."""
        return 2 if self.schedule == "dualpipe" else 1

    def chunk(self, pp_rank: int, vp_stage: int | None = None) -> Chunk:
        return self.rows[pp_rank][vp_stage or 0]

    def chunks(self) -> list[Chunk]:
        return [c for row in self.rows for c in row]

    @property
    def loss_ranks(self) -> tuple[int, ...]:
        """Pipeline ranks that compute a loss (DualPipe: both ends; otherwise one rank)."""
        return tuple(sorted({c.pp_rank for c in self.chunks() if c.loss}))

    @property
    def loss_rank(self) -> int:
        """The pipeline rank that holds the loss of the micro-batches entering at rank 0."""
        return next(c.pp_rank for c in self.chunks() if c.loss and not c.mirror)

    def embedding_ranks(self, tied: bool = False) -> tuple[int, ...]:
        """Pipeline ranks holding a copy of the word embedding: where it embeds the tokens, where
        MTP embeds the shifted tokens, and (``tied``) where the output head reuses it."""
        return tuple(sorted({c.pp_rank for c in self.chunks() if c.embedding or c.mtp or (tied and c.loss)}))

    def embedding_group(self, tied: bool = False) -> tuple[int, ...]:
        """Megatron's embedding group: the ranks whose embedding copies Megatron all-reduces.

        Megatron's placements: every rank with a copy.  DeepSeek's: one rank, so Megatron's own
        all-reduce does nothing; those copies are summed by the schedule (``pipeline/copies.py``).
        """
        ranks = self.embedding_ranks(tied)
        return ranks[:1] if self.schedule in DEEPSEEK_SCHEDULES else ranks

    @property
    def report_rank(self) -> int:
        """The rank where Megatron's training loop reduces and logs the loss: its last pipeline
        rank; DeepSeek's schedules send their loss reports there."""
        return self.pp - 1

    def reports_loss(self, pp_rank: int, *, tp_rank: int = 0, cp_rank: int = 0, dp_rank: int = 0) -> bool:
        """Whether a process prints the step's loss: rank 0 of tensor, context and data parallelism
        on the :attr:`report_rank`."""
        return pp_rank == self.report_rank and tp_rank == cp_rank == dp_rank == 0

    @property
    def mtp_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({c.pp_rank for c in self.chunks() if c.mtp}))

    def needs_batch(self, pp_rank: int, vp_stage: int | None = None) -> tuple[bool, bool]:
        """``(needs tokens, needs labels)`` for a chunk: tokens to embed (the embedding, and MTP's
        shifted tokens), labels for the loss (the main one and MTP's)."""
        c = self.chunk(pp_rank, vp_stage)
        return c.embedding or c.loss or bool(c.mtp), c.loss or bool(c.mtp)

    def render(self, first_k_dense: int = 0) -> str:
        """One line per rank: ``rank r: <chunk 0> | <chunk 1> ...``."""
        return "\n".join(
            f"rank {r}: " + " | ".join(c.describe(first_k_dense) for c in row) for r, row in enumerate(self.rows)
        )


def default_schedule(pp: int, vpp: int | None, layout: str | None) -> str:
    """Megatron's choice when no schedule is named: interleaved when a rank holds several chunks."""
    stages = count_stages(layout) if isinstance(layout, str) else None
    if (vpp or 1) > 1 or (stages is not None and stages > pp):
        return "interleaved"
    return "1f1b"


def place(
    num_layers: int,
    mtp_num_layers: int,
    pp: int,
    *,
    vpp: int | None = None,
    layout=None,
    schedule: str | None = None,
    megatron_config=None,
) -> Placement:
    """The placement of ``num_layers`` decoder layers and ``mtp_num_layers`` MTP layers on ``pp``
    ranks under ``schedule``; ``layout`` is a layout string (or Megatron's parsed layout object).

    ``megatron_config`` (a ``TransformerConfig``) lets Megatron's own layer functions see its uneven
    first/last-stage options; without it they see an even split.
    """
    schedule = schedule or default_schedule(pp, vpp, layout)
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule '{schedule}'", fix=f"use one of: {', '.join(SCHEDULES)}",
                          key="parallel.schedule", value=schedule, choices=list(SCHEDULES))
    mtp_num_layers = mtp_num_layers or 0
    if schedule in MEGATRON_SCHEDULES:
        if layout is not None:
            rows = from_megatron_layout(megatron_layout_object(layout, pp, num_layers, mtp_num_layers))
        else:
            rows = megatron_even(num_layers, mtp_num_layers, pp, vpp, megatron_config)
    else:
        rows = deepseek_rows(deepseek_stages(layout, pp, num_layers, mtp_num_layers, schedule), pp, schedule)
    return Placement(schedule, rows, num_layers, mtp_num_layers)


def placement_for(preset, layout: ParallelLayout) -> Placement:
    """The placement of a model preset under a :class:`ParallelLayout` (no Megatron config needed)."""
    return place(preset.num_layers, preset.mtp_num_layers, layout.pp, vpp=layout.vpp, layout=layout.layout,
                 schedule=layout.schedule)


def placement_of(config) -> Placement:
    """The placement a Megatron ``TransformerConfig`` (or ``GPTModelConfig``) describes."""
    config = getattr(config, "transformer", config)
    layout = config.pipeline_model_parallel_layout
    if isinstance(getattr(layout, "placement", None), Placement):
        return layout.placement  # a DeepSeek placement, see megatron_layout()
    return place(config.num_layers, config.mtp_num_layers or 0, config.pipeline_model_parallel_size,
                 vpp=config.virtual_pipeline_model_parallel_size, layout=layout, megatron_config=config)
