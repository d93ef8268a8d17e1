"""DualPipe and DualPipeV: one schedule engine, two placements (arXiv 2412.19437v2, section 3.2.1).

DeepSeek's reference (``deepseek-ai/DualPipe``) writes the two schedules as two classes that repeat
each other.  They differ only in where the micro-batches turn back, which is a matter of placement
(:mod:`megatron_dsv3.parallel.placement`):

* **DualPipeV** on P ranks runs one V over 2P stages.  A rank's position on the V is its rank
  ``k = r`` of ``n = P``; chunk 0 runs down the V (stage r), chunk 1 back up (stage 2P-1-r); the
  last rank turns the micro-batches round locally, and all M micro-batches enter at rank 0.
* **DualPipe** on P ranks runs two Vs of P/2 ranks each, one per direction, meeting in the middle:
  a rank's position is ``k = min(r, P-1-r)`` of ``n = P/2``, its "down" chunk is the direction whose
  first stage is nearer (chunk ``phase XOR (r >= P/2)``), the two middle ranks turn the
  micro-batches round by sending them to each other, and each direction takes M/2 micro-batches.

With M' micro-batches per V (M, or M/2), a rank runs eight numbered phases (the reference's steps,
as in the paper's figure): down-chunk ``d`` and up-chunk ``u`` are chunk 0 and 1 of the V.

    1. nF0        2(n-k-1) forwards down the V
    2. nF0F1      k+1 times: a forward down, a forward up
    3. nB1W1F1    n-k-1 times: an input-gradient backward up, a weight gradient, a forward up
    4. nF0B1F1B0  M'-2n+k+1 times: forward down & backward up, forward up & backward down
    5. nB1F1B0    n-k-1 times: a backward up, forward up & backward down
    6. nB1B0      k+1 times: backward up, backward down (the later half with the weight split off)
    7. nWB0       n-k-1 times: a weight gradient, an input-gradient backward down
    8. nW         k+1 weight gradients

Each rank's program is these operations plus the point-to-point sends and receives placed exactly
where the reference places them (which keeps every pair of ranks matching its messages in the same
order).  :func:`rank_ops` gives the operations alone; the simulator and the real run
(:mod:`megatron_dsv3.pipeline.runner`) both use this one list.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.schedule_rules import check_microbatches


@dataclass(frozen=True)
class Op:
    """One compute operation: ``F`` (forward), ``B`` (backward; ``zb``: input gradient only),
    ``W`` (the weight gradient of an earlier ``zb`` backward) or ``FB`` (a forward and a backward
    overlapped).  ``chunk``/``mb`` name the forward (or the only) part, ``b_chunk``/``b_mb`` the
    backward part of an ``FB``."""

    kind: str
    chunk: int
    mb: int
    zb: bool = False
    b_chunk: int | None = None
    b_mb: int | None = None

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.chunk}.{self.mb}&B{self.b_chunk}.{self.b_mb}"
        return f"{self.kind}{self.chunk}.{self.mb}" + ("z" if self.zb else "")

    @property
    def forward(self) -> tuple[int, int] | None:
        return (self.chunk, self.mb) if self.kind in ("F", "FB") else None

    @property
    def backward(self) -> tuple[int, int] | None:
        if self.kind == "B":
            return (self.chunk, self.mb)
        return (self.b_chunk, self.b_mb) if self.kind == "FB" else None


@dataclass(frozen=True)
class Action:
    """A step of a rank's program: a compute ``op``, or a ``recv_f``/``recv_b``/``send_f``/``send_b``
    of chunk ``chunk`` (forward activations, output gradients; sends carry the next outgoing one)."""

    kind: str
    chunk: int | None = None
    op: Op | None = None


class _Program:
    """Builds one rank's program; ``phase`` 0/1 is the down/up chunk of the rank's V."""

    def __init__(self, schedule: str, pp: int, num_microbatches: int, rank: int):
        check_microbatches(schedule, pp, num_microbatches)
        self.dual = schedule == "dualpipe"
        self.second_half = self.dual and rank >= pp // 2
        if self.dual:
            self.n, self.k, self.per_v = pp // 2, min(rank, pp - 1 - rank), num_microbatches // 2
        else:
            self.n, self.k, self.per_v = pp, rank, num_microbatches
        self.turns = self.k == self.n - 1  # the rank where the micro-batches turn round
        self.actions: list[Action] = []
        self.forwards = [0, 0]
        self.backwards = [0, 0]
        self.pending_w: list[tuple[int, int]] = []

    def chunk(self, phase: int) -> int:
        return phase ^ self.second_half

    # ---- communication ----
    def recv_f(self, phase: int) -> None:
        self.actions.append(Action("recv_f", self.chunk(phase)))

    def send_f(self, phase: int) -> None:
        self.actions.append(Action("send_f", self.chunk(phase)))

    def recv_b(self, phase: int) -> None:
        self.actions.append(Action("recv_b", self.chunk(phase)))

    def send_b(self, phase: int) -> None:
        self.actions.append(Action("send_b", self.chunk(phase)))

    # ---- compute ----
    def _next(self, counters: list[int], phase: int) -> tuple[int, int]:
        c = self.chunk(phase)
        counters[c] += 1
        return c, counters[c] - 1

    def f(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_f(phase)
        c, m = self._next(self.forwards, phase)
        self.actions.append(Action("op", op=Op("F", c, m)))
        if send:
            self.send_f(phase)

    def b(self, phase: int, zb: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_b(phase)
        c, m = self._next(self.backwards, phase)
        if zb:
            self.pending_w.append((c, m))
        self.actions.append(Action("op", op=Op("B", c, m, zb=zb)))
        if send:
            self.send_b(phase)

    def fb(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if recv0:
            self.recv_f(phase0)
        self.recv_b(phase1)
        c0, m0 = self._next(self.forwards, phase0)
        c1, m1 = self._next(self.backwards, phase1)
        self.actions.append(Action("op", op=Op("FB", c0, m0, b_chunk=c1, b_mb=m1)))
        self.send_f(phase0)
        self.send_b(phase1)

    def w(self) -> None:
        c, m = self.pending_w.pop(0)  # first in, first out
        self.actions.append(Action("op", op=Op("W", c, m)))

    # ---- the eight phases ----
    def build(self) -> list[Action]:
        n, k, dual, turns = self.n, self.k, self.dual, self.turns
        # 1. nF0
        for _ in range(2 * (n - k - 1)):
            self.f(0)
        # 2. nF0F1: the next down-forward's receive is posted early, with the up-forward's.
        self.recv_f(0)
        for i in range(k + 1):
            self.f(0, recv=False, send=dual and turns)
            self.recv_f(0)
            self.f(1, send=not turns or i < k)
            if not (dual and turns):
                self.send_f(0)
        # 3. nB1W1F1
        for _ in range(n - k - 1):
            self.b(1, zb=True)
            self.recv_f(1)
            self.w()
            self.f(1, recv=False)
        # 4. nF0B1F1B0
        for i in range(self.per_v - 2 * n + k + 1):
            if i == 0 and turns:
                # The reference does not overlap these two, to shorten the bubble.
                self.f(0, recv=False, send=False)
                self.send_f(1)
                self.b(1, send=False)
                self.send_f(0)
                self.send_b(1)
            else:
                self.fb(0, 1, recv0=i > 0)
            self.fb(1, 0)
        # 5. nB1F1B0
        for _ in range(n - k - 1):
            self.b(1)
            self.fb(1, 0)
        # 6. nB1B0: the second half of the backwards leaves its weight gradients for later.
        zb = False
        for i in range(k + 1):
            if i == (k + 1) // 2 and k % 2 == 1:
                zb = True
            self.b(1, zb=zb)
            if i == (k + 1) // 2 and k % 2 == 0:
                zb = True
            self.b(0, zb=zb)
        # 7. nWB0
        for _ in range(n - k - 1):
            self.w()
            self.b(0, zb=True)
        # 8. nW
        for _ in range(k + 1):
            self.w()
        assert not self.pending_w
        return self.actions


def rank_program(schedule: str, pp: int, num_microbatches: int, rank: int) -> list[Action]:
    """Rank ``rank``'s program under ``schedule`` (``dualpipe`` or ``dualpipev``)."""
    if schedule not in DEEPSEEK_SCHEDULES:
        raise ValueError(f"not a DeepSeek schedule: {schedule}")
    return _Program(schedule, pp, num_microbatches, rank).build()


def rank_ops(schedule: str, pp: int, num_microbatches: int, rank: int) -> list[Op]:
    """Rank ``rank``'s compute operations, in order."""
    return [a.op for a in rank_program(schedule, pp, num_microbatches, rank) if a.kind == "op"]


def microbatches_per_chunk(schedule: str, num_microbatches: int) -> int:
    """Micro-batches each chunk runs: all M under DualPipeV, M/2 per direction under DualPipe."""
    return num_microbatches // 2 if schedule == "dualpipe" else num_microbatches


def global_microbatch(schedule: str, chunk: int, mb: int, num_microbatches: int) -> int:
    """The step's micro-batch a chunk's ``mb``-th one is: DualPipe's direction 1 takes the second half."""
    return mb + (num_microbatches // 2 if schedule == "dualpipe" and chunk == 1 else 0)
