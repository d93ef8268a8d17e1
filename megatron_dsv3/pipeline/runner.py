"""DualPipe and DualPipeV in Megatron-Core's training loop: the engine's programs run on model chunks.

:func:`dualpipe_forward_backward` has the signature of Megatron's ``forward_backward_func`` (what
``get_forward_backward_func`` returns; ``megatron/core/pipeline_parallel/schedules.py``), so
``train_step`` and ``evaluate`` call it unchanged.  Each rank runs its program from
:mod:`megatron_dsv3.pipeline.engine` on its two chunks:

* a forward is Megatron's ``forward_step`` (the user's ``forward_step_func``; the loss, and the MoE
  and MTP loss scales, on the chunk the placement gives the loss), a backward Megatron's
  ``backward_step``; an input-gradient-only backward runs with the weight GEMMs queued
  (:mod:`megatron_dsv3.model.wgrad`) and a ``W`` runs the oldest queued ones;
* with overlap on, everything runs through Megatron's overlapped step instead
  (:mod:`megatron_dsv3.pipeline.overlap`), pairs overlapped;
* activations and their gradients travel point-to-point over the pipeline group, posted where
  DeepSeek's reference posts them; at the turn of the V (DualPipeV's last rank) they stay local;
* data-parallel gradient reduction starts for a chunk at its last micro-batch's backward (DDP's
  ``no_sync`` per chunk), so ``overlap_grad_reduce`` works without the zero-bubble split (tested
  with DP 2: ``tests/test_dualpipe_equivalence.py``, slow); with the split, DDP's grad-ready hook
  fires at the ``B`` for a deferred weight that has no gradient yet and asserts, so
  :mod:`megatron_dsv3.pipeline.constraints` refuses that combination.  Megatron's
  ``finalize_model_grads`` runs as after any schedule, then the copies a placement keeps are summed
  (:mod:`megatron_dsv3.pipeline.copies`);
* the loss reports go to the last pipeline rank, where Megatron's training loop reduces and logs
  them (under DualPipeV the loss is computed on rank 0; under DualPipe on both end ranks).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from megatron_dsv3.model.wgrad import WGRAD
from megatron_dsv3.parallel.megatron_layout import schedule_options_of
from megatron_dsv3.parallel.placement import Chunk, Placement, placement_of
from megatron_dsv3.pipeline import copies
from megatron_dsv3.pipeline.engine import Op, global_microbatch, microbatches_per_chunk, rank_program
from megatron_dsv3.pipeline.ranges import op_range


@dataclass
class _ChunkState:
    """What one chunk keeps during a step, by micro-batch (counted per chunk).

    Chunks are numbered as the engine numbers them (DualPipeV: the chunk's place on the V, which is
    its virtual stage; DualPipe: its direction); ``vp`` is Megatron's virtual stage, the index of
    the model chunk and of its data iterator.
    """

    chunk: Chunk
    prev_rank: int | None  # pipeline rank of the stage before (None: this chunk embeds)
    next_rank: int | None  # pipeline rank of the stage after (None: this chunk holds the loss)
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    output_grads: dict = field(default_factory=dict)
    input_grads: dict = field(default_factory=dict)
    sent_f: int = 0
    sent_b: int = 0
    received_f: int = 0
    received_b: int = 0


def engine_chunk(placement: Placement, chunk: Chunk) -> int:
    """The engine's number for a chunk: DualPipe's direction, DualPipeV's place on the V."""
    return chunk.direction if placement.schedule == "dualpipe" else chunk.vp_stage


def _neighbours(placement: Placement, chunk: Chunk) -> tuple[int | None, int | None]:
    """Pipeline ranks of the stages before and after ``chunk``'s, in its direction."""
    by_stage = {c.stage: c for c in placement.chunks() if c.mirror == chunk.mirror}
    before, after = by_stage.get(chunk.stage - 1), by_stage.get(chunk.stage + 1)
    return (before.pp_rank if before else None), (after.pp_rank if after else None)


# Set to a list to record each compute operation as ``(op, kind, start, end)`` in seconds
# (``benchmarks/pipeline.py``: measured operation times for the simulator); None records nothing.
TRACE: list | None = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _Step:
    """One ``forward_backward`` call on one rank."""

    def __init__(self, kwargs):
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        model, iterators = kwargs["model"], kwargs["data_iterator"]
        self.model = model if isinstance(model, list) else [model]
        self.iterators = iterators if isinstance(iterators, list) else [iterators] * len(self.model)
        self.forward_step_func = kwargs["forward_step_func"]
        self.num_microbatches = kwargs["num_microbatches"]
        self.forward_only = kwargs.get("forward_only", False)
        self.collect_non_loss_data = kwargs.get("collect_non_loss_data", False)
        self.first_val_step = kwargs.get("first_val_step")
        self.force_all_reduce = kwargs.get("force_all_reduce", False)
        self.pg_collection = kwargs.get("pg_collection")
        self.config = get_model_config(self.model[0])
        self.placement = placement_of(self.config)
        self.options = schedule_options_of(self.config)
        self.schedule = self.placement.schedule
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.rank = parallel_state.get_pipeline_model_parallel_rank()
        self.global_ranks = torch.distributed.get_process_group_ranks(self.group)
        self.cp_size = parallel_state.get_context_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq = kwargs["seq_length"] // (tp if self.config.sequence_parallel else 1) // self.cp_size
        self.shape = (seq, kwargs["micro_batch_size"], self.config.hidden_size)
        self.dtype = self.config.pipeline_dtype or self.config.params_dtype
        row = sorted(self.placement.rows[self.rank], key=lambda c: engine_chunk(self.placement, c))
        self.chunks = [_ChunkState(c, *_neighbours(self.placement, c)) for c in row]
        self.program = rank_program(self.schedule, self.placement.pp, self.num_microbatches, self.rank)
        self.reports: dict[int, object] = {}  # global micro-batch -> what the loss function reported
        self.num_tokens = torch.zeros((), dtype=torch.int)
        self.pending: list = []
        self.to_free: list[torch.Tensor] = []
        self.started = [False] * len(self.chunks)  # by engine chunk
        self.no_sync: dict[int, object] = {}
        self.overlap = self.options.fb_overlap and not self.forward_only
        self.split = self.options.zero_bubble and not self.forward_only

    # ---- bookkeeping ----
    def global_mb(self, c: int, m: int) -> int:
        return global_microbatch(self.schedule, c, m, self.num_microbatches)

    def first_microbatch(self, c: int) -> bool:
        from megatron.core.pipeline_parallel.schedules import check_first_val_step

        return check_first_val_step(self.first_val_step, self.forward_only, not self.started[c])

    def _local_before(self, c: int) -> _ChunkState:
        """This rank's chunk whose stage comes right before chunk ``c``'s (the turn of the V)."""
        s = self.chunks[c]
        return next(x for x in self.chunks if x.chunk.mirror == s.chunk.mirror and x.chunk.stage == s.chunk.stage - 1)

    # ---- communication, placed as the reference places it ----
    def _post(self, op, tensor, rank: int) -> None:
        self.pending.append(torch.distributed.P2POp(op, tensor, self.global_ranks[rank], self.group))

    def recv_f(self, c: int) -> None:
        s = self.chunks[c]
        if s.prev_rank in (None, self.rank):
            return  # the chunk embeds, or its input is this rank's other chunk's output
        buffer = torch.empty(self.shape, dtype=self.dtype, device=_device(), requires_grad=True)
        s.inputs[s.received_f] = buffer
        s.received_f += 1
        self._post(torch.distributed.irecv, buffer, s.prev_rank)

    def send_f(self, c: int) -> None:
        s = self.chunks[c]
        if s.next_rank in (None, self.rank):
            return
        output = s.outputs[s.sent_f]
        s.sent_f += 1
        self._post(torch.distributed.isend, output, s.next_rank)
        self.to_free.append(output)

    def recv_b(self, c: int) -> None:
        s = self.chunks[c]
        if self.forward_only or s.next_rank in (None, self.rank):
            return
        buffer = torch.empty(self.shape, dtype=self.dtype, device=_device())
        s.output_grads[s.received_b] = buffer
        s.received_b += 1
        self._post(torch.distributed.irecv, buffer, s.next_rank)

    def send_b(self, c: int) -> None:
        s = self.chunks[c]
        if self.forward_only or s.prev_rank in (None, self.rank):
            return
        grad = s.input_grads.pop(s.sent_b)
        s.sent_b += 1
        self._post(torch.distributed.isend, grad, s.prev_rank)

    def commit(self) -> None:
        """Post the queued sends and receives together and wait for all of them."""
        if not self.pending:
            return
        for request in torch.distributed.batch_isend_irecv(self.pending):
            request.wait()
        self.pending = []
        self._free(self.to_free)
        self.to_free = []

    def _free(self, tensors) -> None:
        from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

        for tensor in tensors:  # only its autograd graph is needed now
            deallocate_output_tensor(tensor, self.config.deallocate_pipeline_outputs)

    # ---- compute ----
    def _input(self, c: int, m: int):
        s = self.chunks[c]
        if s.prev_rank is None:
            return None
        if s.prev_rank == self.rank and m not in s.inputs:  # the turn: a copy, so the original frees
            source = self._local_before(c).outputs[m]
            s.inputs[m] = source.detach().clone().requires_grad_(True)
            self._free([source])
        return s.inputs[m]

    def _start(self, c: int) -> None:
        if not self.started[c] and self.config.param_sync_func is not None and not self.forward_only:
            vp = self.chunks[c].chunk.vp_stage
            self.config.param_sync_func[vp](self.model[vp].parameters())

    def _keep_forward(self, c: int, m: int, output, num_tokens, store) -> None:
        s = self.chunks[c]
        self.started[c] = True
        if s.chunk.loss:
            self.reports[self.global_mb(c, m)] = store[0] if store else None
            if num_tokens is not None:
                self.num_tokens += num_tokens.detach().to("cpu", torch.int)
        s.outputs[m] = output

    def forward(self, c: int, m: int) -> None:
        self._start(c)
        if self.overlap:
            from megatron_dsv3.pipeline.overlap import combined_step

            output, num_tokens, store, _ = combined_step(self, (c, m, self._input(c, m)), None)
        else:
            from megatron.core.pipeline_parallel.schedules import forward_step

            store = []
            chunk = self.chunks[c].chunk
            output, num_tokens = forward_step(
                self.forward_step_func, self.iterators[chunk.vp_stage], self.model[chunk.vp_stage],
                self.num_microbatches, self._input(c, m), store, self.config, self.cp_size,
                collect_non_loss_data=self.collect_non_loss_data, is_first_microbatch=self.first_microbatch(c),
                current_microbatch=self.global_mb(c, m), vp_stage=chunk.vp_stage, is_last_stage=chunk.loss,
            )
        self._keep_forward(c, m, output, num_tokens, store)

    def _backward_inputs(self, c: int, m: int):
        s = self.chunks[c]
        self._enable_grad_sync_if_due(c, m)
        output_grad = None if s.next_rank is None else s.output_grads.pop(m)
        return s.inputs.pop(m, None), s.outputs.pop(m), output_grad

    def _hand_back(self, c: int, m: int, grad) -> None:
        s = self.chunks[c]
        if s.prev_rank is None:
            return
        if s.prev_rank == self.rank:  # the turn: the chunk before waits for it here
            self._local_before(c).output_grads[m] = grad
        else:
            s.input_grads[m] = grad

    def backward(self, c: int, m: int, zb: bool) -> None:
        inputs, output, output_grad = self._backward_inputs(c, m)
        with WGRAD.defer() if zb and self.split else contextlib.nullcontext():
            if self.overlap:
                from megatron_dsv3.pipeline.overlap import combined_step

                grad = combined_step(self, None, (c, inputs, output, output_grad))[3]
            else:
                from megatron.core.pipeline_parallel.schedules import backward_step

                grad = backward_step(inputs, output, output_grad, self.config)
        self._hand_back(c, m, grad)

    def forward_backward(self, op: Op) -> None:
        if not self.overlap:
            self.forward(op.chunk, op.mb)
            self.backward(op.b_chunk, op.b_mb, zb=False)
            return
        from megatron_dsv3.pipeline.overlap import combined_step

        self._start(op.chunk)
        f_input = self._input(op.chunk, op.mb)
        inputs, output, output_grad = self._backward_inputs(op.b_chunk, op.b_mb)
        f_out, num_tokens, store, grad = combined_step(self, (op.chunk, op.mb, f_input),
                                                       (op.b_chunk, inputs, output, output_grad))
        self._keep_forward(op.chunk, op.mb, f_out, num_tokens, store)
        self._hand_back(op.b_chunk, op.b_mb, grad)

    def run_op(self, op: Op) -> None:
        if op.kind == "F" or (self.forward_only and op.kind == "FB"):
            self.forward(op.chunk, op.mb)
        elif self.forward_only:
            return  # backwards and weight gradients do not run in a forward-only step
        elif op.kind == "B":
            self.backward(op.chunk, op.mb, op.zb)
        elif op.kind == "W":
            if self.split:
                WGRAD.pop()
        else:
            self.forward_backward(op)

    # ---- gradient synchronisation ----
    def _enable_grad_sync_if_due(self, c: int, m: int) -> None:
        """DDP reduces a chunk's gradients from its last micro-batch's backward on: every weight
        gradient of an earlier micro-batch of that chunk is computed by then (checked below)."""
        if m == microbatches_per_chunk(self.schedule, self.num_microbatches) - 1 and c in self.no_sync:
            self.no_sync.pop(c).__exit__(None, None, None)

    def _enter_no_sync(self) -> None:
        """One ``no_sync`` context per chunk (``config.no_sync_func`` is a list by virtual stage)."""
        funcs = self.config.no_sync_func
        funcs = funcs if isinstance(funcs, list) else [funcs] * len(self.chunks)
        for c, s in enumerate(self.chunks):
            func = funcs[s.chunk.vp_stage]
            if func is not None:
                self.no_sync[c] = func()
                self.no_sync[c].__enter__()

    def run(self) -> list:
        WGRAD.clear()
        if not self.forward_only:
            self._enter_no_sync()
        self._skip_other_direction(before=True)
        for action in self.program:
            if action.kind == "op":
                self.commit()
                if TRACE is None:
                    with op_range(str(action.op)):
                        self.run_op(action.op)
                    continue
                _sync()
                start = time.perf_counter()
                with op_range(str(action.op)):
                    self.run_op(action.op)
                _sync()
                op = action.op
                TRACE.append((str(op), "Bz" if op.kind == "B" and op.zb and self.split else op.kind, start,
                              time.perf_counter()))
            else:
                getattr(self, action.kind)(action.chunk)
        self.commit()
        self._skip_other_direction(before=False)
        for context in self.no_sync.values():
            context.__exit__(None, None, None)
        if not self.forward_only:
            if len(WGRAD):
                raise RuntimeError("a deferred weight gradient was never computed")
            copies.sum_mirrored_token_counts(self)
            if self.config.finalize_model_grads_func is not None:
                total = self._total_tokens() if self.config.calculate_per_token_loss else None
                self.config.finalize_model_grads_func(self.model, total, pg_collection=self.pg_collection,
                                                      force_all_reduce=self.force_all_reduce)
            copies.sum_local_embedding_copies(self)
            copies.sum_mirrored_gradients(self)
            self._pool_mtp_metrics()
        return self._reports_for_megatron()

    def _pool_mtp_metrics(self) -> None:
        """Megatron logs the MTP loss from its tracker on the last pipeline rank, where 1F1B puts
        MTP; DualPipeV computes it on rank 0 (DualPipe on both end ranks, half the micro-batches
        each).  Every pipeline rank gets the tracker's tensors and Megatron's own reduction sums
        them over the pipeline group (then averages over data parallelism, as it always does)."""
        if not self.config.mtp_num_layers:
            return
        from megatron.core import parallel_state
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        tracker = MTPLossLoggingHelper.tracker
        for key in ("loss_values", "correct_values", "total_values"):
            if key not in tracker:
                tracker[key] = torch.zeros(self.config.mtp_num_layers, device=_device())
        tracker["reduce_group"] = self.group
        tracker["avg_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def _total_tokens(self):
        total = self.num_tokens.to(_device())
        torch.distributed.all_reduce(total, group=self.group)
        return total

    # ---- DualPipe's data: each direction takes half of the step's micro-batches ----
    def _skip_other_direction(self, before: bool) -> None:
        """Every chunk's iterator yields the step's M micro-batches (as for Megatron's interleaved
        schedule); under DualPipe direction 0 uses the first half and direction 1 the second."""
        if self.schedule != "dualpipe":
            return
        for s in self.chunks:
            iterator = self.iterators[s.chunk.vp_stage]
            if iterator is None or not self.placement.needs_batch(self.rank, s.chunk.vp_stage)[0]:
                continue
            if (s.chunk.direction == 1) == before:
                for _ in range(self.num_microbatches // 2):
                    next(iterator)

    # ---- where Megatron reads the losses ----
    def _reports_for_megatron(self) -> list:
        """The loss reports in micro-batch order on the last pipeline rank (where Megatron's
        ``train_step`` and ``evaluate`` reduce them), an empty list elsewhere."""
        last = self.placement.pp - 1
        holders = [r for r in self.placement.loss_ranks if r != last]
        gathered = dict(self.reports) if self.rank == last else {}
        for holder in holders:
            if self.rank == holder:
                reports = _to(self.reports, torch.device("cpu"))
                torch.distributed.send_object_list([reports], self.global_ranks[last], group=self.group)
            elif self.rank == last:
                received = [None]
                torch.distributed.recv_object_list(received, self.global_ranks[holder], group=self.group)
                gathered.update(_to(received[0], _device()))
        return [gathered[m] for m in sorted(gathered)] if self.rank == last else []


def _to(value, device):
    """Tensors in nested dicts and lists moved to ``device`` (loss reports cross ranks on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def dualpipe_forward_backward(**kwargs) -> list:
    """Megatron's ``forward_backward_func`` for the ``dualpipe`` and ``dualpipev`` schedules."""
    return _Step(kwargs).run()
