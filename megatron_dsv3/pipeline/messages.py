"""The activations and gradients a DualPipe(V) rank sends and receives, posted where DeepSeek's
reference posts them (``deepseek-ai/DualPipe``: ``_recv_forward``/``_send_forward``/... queued, then
committed together before the next compute operation).

Each chunk keeps, by its micro-batch number, the inputs it received, the outputs it made, the output
gradients it received and the input gradients it made (:class:`ChunkData`).  At the turn of the V
(DualPipeV's last rank) the stage before is this rank's other chunk: nothing travels, the runner hands
tensors across itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

from megatron_dsv3.parallel.placement import Chunk, Placement
from megatron_dsv3.pipeline.rank_step import RankStep, device


def neighbours(placement: Placement, chunk: Chunk) -> tuple[int | None, int | None]:
    """Pipeline ranks of the stages before and after ``chunk``'s, in its direction."""
    by_stage = {c.stage: c for c in placement.chunks() if c.mirror == chunk.mirror}
    before, after = by_stage.get(chunk.stage - 1), by_stage.get(chunk.stage + 1)
    return (before.pp_rank if before else None), (after.pp_rank if after else None)


@dataclass
class ChunkData:
    """What one chunk keeps during a step, by its micro-batch number."""

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


class Messages:
    """The engine's ``recv_f``/``send_f``/``recv_b``/``send_b`` actions and their ``commit``."""

    def __init__(self, step: RankStep):
        self.step = step
        self.data = [ChunkData(c, *neighbours(step.placement, c)) for c in step.chunks]
        self.pending: list = []
        self.to_free: list[torch.Tensor] = []

    def _post(self, op, tensor: torch.Tensor, rank: int) -> None:
        self.pending.append(torch.distributed.P2POp(op, tensor, self.step.global_ranks[rank], self.step.group))

    def recv_f(self, c: int) -> None:
        s = self.data[c]
        if s.prev_rank in (None, self.step.rank):
            return  # the chunk embeds, or its input is this rank's other chunk's output
        buffer = torch.empty(self.step.shape, dtype=self.step.dtype, device=device(), requires_grad=True)
        s.inputs[s.received_f] = buffer
        s.received_f += 1
        self._post(torch.distributed.irecv, buffer, s.prev_rank)

    def send_f(self, c: int) -> None:
        s = self.data[c]
        if s.next_rank in (None, self.step.rank):
            return
        output = s.outputs[s.sent_f]
        s.sent_f += 1
        self._post(torch.distributed.isend, output, s.next_rank)
        self.to_free.append(output)

    def recv_b(self, c: int) -> None:
        s = self.data[c]
        if self.step.forward_only or s.next_rank in (None, self.step.rank):
            return
        buffer = torch.empty(self.step.shape, dtype=self.step.dtype, device=device())
        s.output_grads[s.received_b] = buffer
        s.received_b += 1
        self._post(torch.distributed.irecv, buffer, s.next_rank)

    def send_b(self, c: int) -> None:
        s = self.data[c]
        if self.step.forward_only or s.prev_rank in (None, self.step.rank):
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
        self.free(self.to_free)
        self.to_free = []

    def free(self, tensors) -> None:
        """Outputs whose values are no longer needed, only their autograd graphs (Megatron's
        ``deallocate_pipeline_outputs``)."""
        for tensor in tensors:
            deallocate_output_tensor(tensor, self.step.config.deallocate_pipeline_outputs)

    def local_before(self, c: int) -> ChunkData:
        """This rank's chunk whose stage comes right before chunk ``c``'s (the turn of the V)."""
        s = self.data[c]
        return next(x for x in self.data if x.chunk.mirror == s.chunk.mirror and x.chunk.stage == s.chunk.stage - 1)
