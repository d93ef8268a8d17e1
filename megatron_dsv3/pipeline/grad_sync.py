"""Data-parallel gradient reduction around a DualPipe(V) step, and the sums the placement's copies need.

DDP reduces a chunk's gradients from its last micro-batch's backward on (Megatron's ``no_sync``
context per virtual stage, ``config.no_sync_func``): from then on DDP's grad-ready hooks count each
gradient that arrives, and a bucket starts reducing once every one of its parameters has had its
last, so ``overlap_grad_reduce`` overlaps the reduction with the rest of the step.  With the
zero-bubble split a deferred weight's last gradient arrives at its ``W`` (FIFO, so after every
earlier ``W`` of that chunk), and DDP counts it there, not at the ``B``
(:mod:`megatron_dsv3.runtime.ddp_changes`).  After the schedule Megatron's ``finalize_model_grads``
runs as after any schedule (under DualPipe its reduction also sums the mirrored copies:
:mod:`megatron_dsv3.pipeline.mirrors`), then a rank's embedding copies are summed
(:mod:`megatron_dsv3.pipeline.copies`).
"""

from __future__ import annotations

import torch

from megatron_dsv3.model.wgrad import WGRAD
from megatron_dsv3.pipeline import copies, mirrors
from megatron_dsv3.pipeline.engine import microbatches_per_chunk
from megatron_dsv3.pipeline.rank_step import RankStep, device


class GradSync:
    def __init__(self, step: RankStep):
        self.step = step
        self.no_sync: dict[int, object] = {}
        self.num_tokens = torch.zeros((), dtype=torch.int)  # tokens in this rank's losses

    def hold(self) -> None:
        """Enter one ``no_sync`` context per chunk (``config.no_sync_func`` is a list by virtual stage)."""
        if self.step.forward_only:
            return
        funcs = self.step.config.no_sync_func
        funcs = funcs if isinstance(funcs, list) else [funcs] * len(self.step.chunks)
        for c, chunk in enumerate(self.step.chunks):
            func = funcs[chunk.vp_stage]
            if func is not None:
                self.no_sync[c] = func()
                self.no_sync[c].__enter__()

    def release_if_due(self, c: int, m: int) -> None:
        """Before chunk ``c``'s backward of its micro-batch ``m``: from its last one on, DDP reduces."""
        if m == microbatches_per_chunk(self.step.schedule, self.step.num_microbatches) - 1 and c in self.no_sync:
            self.no_sync.pop(c).__exit__(None, None, None)

    def release_all(self) -> None:
        for context in self.no_sync.values():
            context.__exit__(None, None, None)
        self.no_sync = {}

    def count(self, num_tokens) -> None:
        if num_tokens is not None:
            self.num_tokens += num_tokens.detach().to("cpu", torch.int)

    def finish(self) -> None:
        """After the schedule: Megatron's ``finalize_model_grads``, then the copies' sums."""
        step = self.step
        if step.forward_only:
            return
        if len(WGRAD):
            raise RuntimeError("a deferred weight gradient was never computed")
        if step.schedule == "dualpipe" and not all(mirrors.reduces_with_mirrors(chunk) for chunk in step.model):
            raise RuntimeError("DualPipe's mirrored copies sum their gradients inside Megatron DDP's reduction"
                               " (pipeline/mirrors.py): wrap every chunk in megatron.core's DistributedDataParallel"
                               " with megatron-dsv3 activated before the chunks are wrapped")
        copies.sum_mirrored_token_counts(step)
        if step.config.finalize_model_grads_func is not None:
            total = self._total_tokens() if step.config.calculate_per_token_loss else None
            step.config.finalize_model_grads_func(step.model, total, pg_collection=step.pg_collection,
                                                  force_all_reduce=step.force_all_reduce)
        copies.sum_local_embedding_copies(step)

    def _total_tokens(self):
        total = self.num_tokens.to(device())
        torch.distributed.all_reduce(total, group=self.step.group)
        return total
