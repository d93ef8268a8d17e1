"""Megatron's parallel sizes for one job, as plain data (no Megatron import)."""

from __future__ import annotations

from dataclasses import dataclass

# Pipeline schedules by their paper / Megatron names.  1f1b and interleaved are Megatron-Core's own;
# dualpipe and dualpipev are DeepSeek's (arXiv 2412.19437v2, section 3.2.1).
MEGATRON_SCHEDULES = ("1f1b", "interleaved")
DEEPSEEK_SCHEDULES = ("dualpipe", "dualpipev")
SCHEDULES = MEGATRON_SCHEDULES + DEEPSEEK_SCHEDULES
SCHEDULE_NAMES = {"1f1b": "1F1B", "interleaved": "interleaved 1F1B", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron's parallel sizes; the world size is ``tp * pp * cp * dp``.

    Experts are split over ``ep`` ranks (each expert over ``etp``) inside the ``tp * cp * dp`` ranks
    of one pipeline stage, as Megatron-Core arranges its expert groups.  ``layout`` is Megatron's
    ``--pipeline-model-parallel-layout`` string (``"Et*3|(tt|)*29,m|L"``); for ``dualpipe`` and
    ``dualpipev`` its stages are listed in model order (see :mod:`megatron_dsv3.parallel.placement`).
    ``schedule`` None means Megatron's choice: 1F1B, or interleaved with virtual stages.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    layout: str | None = None
    schedule: str | None = None
    # DualPipe(V) only: split backwards into B and W (None: on); overlap F&B pairs (None: with EP > 1).
    zero_bubble: bool | None = None
    fb_overlap: bool | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp
