"""DualPipe and DualPipeV in Megatron-Core's training loop: the engine's programs run on model chunks.

:func:`dualpipe_forward_backward` has the signature of Megatron's ``forward_backward_func`` (what
``get_forward_backward_func`` returns; ``megatron/core/pipeline_parallel/schedules.py``), so
``train_step`` and ``evaluate`` call it unchanged.  Each rank runs its program from
:mod:`megatron_dsv3.pipeline.engine` on its two chunks (:class:`~megatron_dsv3.pipeline.rank_step.RankStep`):

* a forward is Megatron's ``forward_step`` (the user's ``forward_step_func``; the loss, and the MoE
  and MTP loss scales, on the chunk the placement gives the loss), a backward Megatron's
  ``backward_step``; an input-gradient-only backward runs with the weight GEMMs queued
  (:mod:`megatron_dsv3.model.wgrad`) and a ``W`` runs the oldest queued ones;
* with overlap on, everything runs through Megatron's overlapped step instead
  (:mod:`megatron_dsv3.pipeline.overlap`), pairs overlapped;
* activations and their gradients travel point-to-point over the pipeline group
  (:mod:`megatron_dsv3.pipeline.messages`); at the turn of the V they stay local;
* data-parallel reduction and the sums of the placement's copies: :mod:`megatron_dsv3.pipeline.grad_sync`;
* the loss reports go to the last pipeline rank, where Megatron's training loop reduces and logs
  them (:mod:`megatron_dsv3.pipeline.reports`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from megatron.core.pipeline_parallel.schedules import backward_step, forward_step

from megatron_dsv3.model.wgrad import WGRAD, run_transformer_engine_wgrads
from megatron_dsv3.pipeline import reports
from megatron_dsv3.pipeline.engine import Op, rank_program
from megatron_dsv3.pipeline.grad_sync import GradSync
from megatron_dsv3.pipeline.messages import Messages
from megatron_dsv3.pipeline.overlap import combined_step
from megatron_dsv3.pipeline.ranges import op_range
from megatron_dsv3.pipeline.rank_step import RankStep

# Set to a list to record each compute operation as ``(op, kind, start, end)`` in seconds
# (``benchmarks/pipeline.py``: measured operation times for the simulator); None records nothing.
TRACE: list | None = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Runner:
    """One ``forward_backward`` call on one rank: the program's compute operations."""

    def __init__(self, step: RankStep):
        self.step = step
        self.messages = Messages(step)
        self.grad_sync = GradSync(step)
        self.reports: dict[int, object] = {}  # global micro-batch -> what the loss function reported

    # ---- compute ----
    def _input(self, c: int, m: int):
        s = self.messages.data[c]
        if s.prev_rank is None:
            return None
        if s.prev_rank == self.step.rank and m not in s.inputs:  # the turn: a copy, so the original frees
            source = self.messages.local_before(c).outputs[m]
            s.inputs[m] = source.detach().clone().requires_grad_(True)
            self.messages.free([source])
        return s.inputs[m]

    def _start(self, c: int) -> None:
        step = self.step
        if not step.started[c] and step.config.param_sync_func is not None and not step.forward_only:
            step.config.param_sync_func[step.vp(c)](step.model[step.vp(c)].parameters())

    def _keep_forward(self, c: int, m: int, output, num_tokens, store) -> None:
        self.step.started[c] = True
        if self.step.chunks[c].loss:
            self.reports[self.step.global_mb(c, m)] = store[0] if store else None
            self.grad_sync.count(num_tokens)
        self.messages.data[c].outputs[m] = output

    def forward(self, c: int, m: int) -> None:
        step = self.step
        self._start(c)
        if step.overlap:
            output, num_tokens, store, _ = combined_step(step, (c, m, self._input(c, m)), None)
        else:
            store, vp = [], step.vp(c)
            output, num_tokens = forward_step(
                step.forward_step_func, step.iterators[vp], step.model[vp], step.num_microbatches,
                self._input(c, m), store, step.config, step.cp_size, collect_non_loss_data=step.collect_non_loss_data,
                is_first_microbatch=step.first_microbatch(c), current_microbatch=step.global_mb(c, m), vp_stage=vp,
                is_last_stage=step.chunks[c].loss,
            )
        self._keep_forward(c, m, output, num_tokens, store)

    def _backward_inputs(self, c: int, m: int):
        s = self.messages.data[c]
        self.grad_sync.release_if_due(c, m)
        output_grad = None if s.next_rank is None else s.output_grads.pop(m)
        return s.inputs.pop(m, None), s.outputs.pop(m), output_grad

    def _hand_back(self, c: int, m: int, grad) -> None:
        s = self.messages.data[c]
        if s.prev_rank is None:
            return
        if s.prev_rank == self.step.rank:  # the turn: the chunk before waits for it here
            self.messages.local_before(c).output_grads[m] = grad
        else:
            s.input_grads[m] = grad

    def backward(self, c: int, m: int, zb: bool) -> None:
        inputs, output, output_grad = self._backward_inputs(c, m)
        deferring = zb and self.step.split
        with WGRAD.defer() if deferring else contextlib.nullcontext():
            if self.step.overlap:
                grad = combined_step(self.step, None, (c, inputs, output, output_grad))[3]
            else:
                grad = backward_step(inputs, output, output_grad, self.step.config)
            self._transformer_engine_w(c, deferring)
        self._hand_back(c, m, grad)

    def _transformer_engine_w(self, c: int, deferring: bool) -> None:
        """TE's modules deferred this backward's weight GEMMs (``delay_wgrad_compute``): the ``W`` runs
        them, or, for a backward that does not defer, they run now."""
        modules = self.step.te_deferring[c]
        if modules and deferring:
            WGRAD.put(lambda: run_transformer_engine_wgrads(modules))
        elif modules:
            run_transformer_engine_wgrads(modules)

    def forward_backward(self, op: Op) -> None:
        if not self.step.overlap:
            self.forward(op.chunk, op.mb)
            self.backward(op.b_chunk, op.b_mb, zb=False)
            return
        self._start(op.chunk)
        f_input = self._input(op.chunk, op.mb)
        inputs, output, output_grad = self._backward_inputs(op.b_chunk, op.b_mb)
        f_out, num_tokens, store, grad = combined_step(self.step, (op.chunk, op.mb, f_input),
                                                       (op.b_chunk, inputs, output, output_grad))
        self._keep_forward(op.chunk, op.mb, f_out, num_tokens, store)
        self._hand_back(op.b_chunk, op.b_mb, grad)

    def run_op(self, op: Op) -> None:
        if op.kind == "F" or (self.step.forward_only and op.kind == "FB"):
            self.forward(op.chunk, op.mb)
        elif self.step.forward_only:
            return  # backwards and weight gradients do not run in a forward-only step
        elif op.kind == "B":
            self.backward(op.chunk, op.mb, op.zb)
        elif op.kind == "W":
            if self.step.split:
                WGRAD.pop()
        else:
            self.forward_backward(op)

    def _timed(self, op: Op) -> None:
        """``run_op`` inside its named range; recorded in :data:`TRACE` when that is a list."""
        if TRACE is None:
            with op_range(str(op)):
                self.run_op(op)
            return
        _sync()
        start = time.perf_counter()
        with op_range(str(op)):
            self.run_op(op)
        _sync()
        TRACE.append((str(op), "Bz" if op.kind == "B" and op.zb and self.step.split else op.kind, start,
                      time.perf_counter()))

    # ---- the program ----
    def run(self) -> list:
        step = self.step
        WGRAD.clear()
        self.grad_sync.hold()
        self._skip_other_direction(before=True)
        for action in rank_program(step.schedule, step.placement.pp, step.num_microbatches, step.rank):
            if action.kind == "op":
                self.messages.commit()
                self._timed(action.op)
            else:
                getattr(self.messages, action.kind)(action.chunk)
        self.messages.commit()
        self._skip_other_direction(before=False)
        self.grad_sync.release_all()
        self.grad_sync.finish()
        reports.pool_mtp_metrics(step)
        return reports.reports_for_megatron(step, self.reports)

    def _skip_other_direction(self, before: bool) -> None:
        """Every chunk's iterator yields the step's M micro-batches (as for Megatron's interleaved
        schedule); under DualPipe direction 0 uses the first half and direction 1 the second."""
        step = self.step
        if step.schedule != "dualpipe":
            return
        for chunk in step.chunks:
            iterator = step.iterators[chunk.vp_stage]
            if iterator is None or not step.placement.needs_batch(step.rank, chunk.vp_stage)[0]:
                continue
            if (chunk.direction == 1) == before:
                for _ in range(step.num_microbatches // 2):
                    next(iterator)


def dualpipe_forward_backward(**kwargs) -> list:
    """Megatron's ``forward_backward_func`` for the ``dualpipe`` and ``dualpipev`` schedules."""
    return _Runner(RankStep.from_megatron(kwargs)).run()
