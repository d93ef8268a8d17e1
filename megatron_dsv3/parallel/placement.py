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

Layers per stage come from Megatron's rules for Megatron's schedules (its
``PipelineParallelLayerLayout`` for a layout string, else ``get_num_layers_to_build`` /
``get_transformer_layer_offset``), so this module never disagrees with what Megatron builds.  For
DeepSeek's schedules the layout string lists the stages in model order (``"Et*3|t*4|t*4|t*3mL"``);
without one the layers split evenly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import SCHEDULES, ParallelLayout

MEGATRON_SCHEDULES = ("1f1b", "interleaved")
DEEPSEEK_SCHEDULES = ("dualpipe", "dualpipev")


@dataclass(frozen=True)
class Chunk:
    """One chunk: what pipeline rank ``pp_rank`` holds as its virtual stage ``vp_stage``."""

    pp_rank: int
    vp_stage: int
    stage: int  # position of the chunk's stage in model order (0 holds the embedding)
    decoders: tuple[int, ...]  # 0-based global decoder-layer ids
    embedding: bool = False  # Megatron's pre_process
    mtp: int = 0  # MTP layers on this chunk
    loss: bool = False  # final norm, output head and loss: Megatron's post_process
    mirror: bool = False  # DualPipe's second copy of a stage (its weights equal the first copy's)

    @property
    def direction(self) -> int:
        """DualPipe: 0 for the micro-batches entering at rank 0, 1 for those entering at the last rank."""
        return 1 if self.mirror else 0

    def describe(self, first_k_dense: int = 0) -> str:
        parts = ["embedding"] if self.embedding else []
        if self.decoders:
            first, last = self.decoders[0], self.decoders[-1]
            dense = sum(1 for i in self.decoders if i < first_k_dense)
            span = f"decoder {first}" if first == last else f"decoders {first}-{last}"
            if dense:
                span += " (dense)" if dense == len(self.decoders) else f" ({dense} dense)"
            parts.append(span)
        if self.mtp:
            parts.append("mtp" if self.mtp == 1 else f"mtp x{self.mtp}")
        if self.loss:
            parts.append("output head + loss")
        text = ", ".join(parts) or "(empty)"
        return f"{text} (mirror)" if self.mirror else text


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
    stages = _count_stages(layout) if isinstance(layout, str) else None
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
            return _from_megatron_layout(_megatron_layout_object(layout, pp, num_layers, mtp_num_layers),
                                         num_layers, mtp_num_layers, schedule)
        return _megatron_even(num_layers, mtp_num_layers, pp, vpp, schedule, megatron_config)
    stages = _deepseek_stages(layout, pp, num_layers, mtp_num_layers, schedule)
    return _deepseek_placement(stages, pp, num_layers, mtp_num_layers, schedule)


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


# ---- Megatron's placements ----
def _count_stages(text: str) -> int:
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    return PipelineParallelLayerLayout.get_num_stages_from_str(text)


def _megatron_layout_object(layout, pp: int, num_layers: int, mtp_num_layers: int):
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


def _from_megatron_layout(parsed, num_layers: int, mtp_num_layers: int, schedule: str) -> Placement:
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
    return Placement(schedule, tuple(tuple(row) for row in rows), num_layers, mtp_num_layers)


def _megatron_even(num_layers, mtp_num_layers, pp, vpp, schedule, config) -> Placement:
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
    return Placement(schedule, tuple(rows), num_layers, mtp_num_layers)


# ---- DeepSeek's placements ----
def _deepseek_stages(layout, pp, num_layers, mtp_num_layers, schedule) -> list[tuple[bool, int, int, bool]]:
    """``(embedding, decoders, mtp, loss)`` per stage, in model order."""
    count = 2 * pp if schedule == "dualpipev" else pp
    if layout is None:
        if num_layers % count:
            raise ConfigError(
                f"{schedule} on pp={pp} ranks has {count} stages, which do not divide model.num_layers={num_layers}",
                fix=f"give parallel.layout with {count} stages in model order (e.g. 'Et*3|t*4|...|t*2mL'), or"
                f" choose pp so that {'2 x ' if schedule == 'dualpipev' else ''}pp divides {num_layers}",
                key="parallel.layout",
            )
        per = num_layers // count
        return [(s == 0, per, mtp_num_layers if s == count - 1 else 0, s == count - 1) for s in range(count)]
    if not isinstance(layout, str):
        raise ConfigError(f"{schedule} takes its layout as a string of stages in model order",
                          fix="give parallel.layout as a string", key="parallel.layout")
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        parsed = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except (AssertionError, ValueError, KeyError) as err:
        raise _layout_error(layout, schedule, count, f"cannot be parsed ({err})") from None
    stages = []
    for kinds in parsed:
        names = [getattr(k, "name", k) for k in kinds]
        stages.append(("embedding" in names, names.count("decoder"), names.count("mtp"), "loss" in names))
    if len(stages) != count:
        raise _layout_error(layout, schedule, count, f"has {len(stages)} stages")
    flat = [name for kinds in parsed for name in (getattr(k, "name", k) for k in kinds)]
    checks = [
        (flat.count("embedding") == 1 and stages[0][0], "must start with the embedding E, once"),
        (flat.count("loss") == 1 and stages[-1][3], "must end with the loss L, once"),
        (flat.count("decoder") == num_layers, f"has {flat.count('decoder')} decoder layers t, the model {num_layers}"),
        (flat.count("mtp") == mtp_num_layers, f"has {flat.count('mtp')} MTP layers m, the model {mtp_num_layers}"),
        (all(s[2] == 0 for s in stages[:-1]), "must put the MTP layers m in the last stage, with the loss"),
        ("mtp" not in flat or flat.index("mtp") > max(i for i, n in enumerate(flat) if n == "decoder"),
         "must put the MTP layers after the last decoder layer"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _layout_error(layout, schedule, count, problem)
    return stages


def _layout_error(layout: str, schedule: str, count: int, problem: str) -> ConfigError:
    return ConfigError(
        f"parallel.layout={layout!r} {problem}; {schedule} needs {count} stages in model order",
        fix=f"write {count} stages separated by `|`, the first starting with E, the last ending with the MTP"
        " layers and L, e.g. 'Et*3|t*4|t*4|t*3mL' for 14 layers on 4 stages",
        key="parallel.layout",
    )


def _deepseek_placement(stages, pp, num_layers, mtp_num_layers, schedule) -> Placement:
    starts, first = [], 0
    for _, n, _, _ in stages:
        starts.append(first)
        first += n

    def chunk(s: int, rank: int, vp: int, mirror: bool = False) -> Chunk:
        embedding, n, mtp, loss = stages[s]
        return Chunk(rank, vp, s, tuple(range(starts[s], starts[s] + n)), embedding=embedding, mtp=mtp,
                     loss=loss, mirror=mirror)

    if schedule == "dualpipev":
        rows = [(chunk(r, r, 0), chunk(2 * pp - 1 - r, r, 1)) for r in range(pp)]
    else:  # direction 0 is stage r, direction 1 the mirror of stage pp-1-r; the nearer start first
        rows = [(chunk(r, r, 0), chunk(pp - 1 - r, r, 1, mirror=True)) if r < pp // 2
                else (chunk(pp - 1 - r, r, 0, mirror=True), chunk(r, r, 1)) for r in range(pp)]
    return Placement(schedule, tuple(rows), num_layers, mtp_num_layers)


# ---- the placement as Megatron's layout object ----
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
