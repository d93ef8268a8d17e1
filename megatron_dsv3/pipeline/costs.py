"""A cost model for the pipeline simulator: a model's forward, backward and weight-gradient times per
micro-batch and rank, and the expert-parallel all-to-all they wait for, from the architecture and a
few machine numbers (``megatron-dsv3 schedule --recipe``; a recipe's figures: :mod:`megatron_dsv3.recipe.schedule`).

It is a model, not a measurement.  Its assumptions:

* Compute runs at ``tflops`` (achieved, per GPU) on the preset's training FLOPs
  (:mod:`megatron_dsv3.model.accounting`), spread evenly over the pipeline's stages.  A forward is a
  third of the training FLOPs, a backward two thirds, of which the weight-gradient part is the
  weights' share (attention scores and values have none).
* The all-to-all of each MoE layer moves, per token, one copy to each node the token is routed to
  (node-limited routing: ``group_topk`` nodes when the EP group spans at least that many, one of which
  may be the sender's own) over InfiniBand at ``ib_gbs`` GB/s per GPU; the NVLink forwarding inside a
  node is hidden, as DeepSeek-V3's dispatch kernels do (section 3.2.2).  An EP group within one node
  sends over NVLink at ``nvlink_gbs``.  Dispatch moves FP8 (1 byte per value) under FP8 training and
  BF16 otherwise; combine and both backward transfers move BF16.
* Without overlap a chunk's time is its compute plus its all-to-all.  DualPipe's overlapped
  forward-and-backward runs one micro-batch's compute during the other's all-to-all: ``FB`` is the
  larger of the two computes summed and the two all-to-alls summed.  Megatron's own schedules are
  modelled without their all-to-all overlap (``--overlap-moe-expert-parallel-comm``).
* A stage boundary sends the micro-batch's hidden states (BF16) at ``ib_gbs``.
* The data-parallel gradient reduction (:class:`ReductionCosts`) moves fp32 gradients over
  InfiniBand at ``ib_gbs`` in a ring: a reduce-scatter ((n-1)/n of the bytes) with the distributed
  optimizer, an all-reduce (twice that) without it, over the data-parallel ranks for the dense
  parameters and the expert data-parallel ranks for the experts' shares.  DualPipe all-reduces each
  stage over both copies and their data-parallel ranks (2 x DP, :mod:`megatron_dsv3.pipeline.mirrors`).

Default machine numbers: ``ib_gbs`` 50 and ``nvlink_gbs`` 160 are the bandwidths DeepSeek-V3's report
gives for its H800 cluster (arXiv 2412.19437v2, section 3.2.2); ``tflops`` defaults to 40% of the
GPU's dense peak (H100/H800/H200: 989 TFLOP/s BF16, 1979 FP8; NVIDIA's H100 datasheet), an assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_dsv3.model.accounting import count, expert_params
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.pipeline.simulator import Costs

DENSE_PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}
DEFAULT_EFFICIENCY = 0.4


@dataclass(frozen=True)
class Machine:
    tflops: float
    ib_gbs: float = 50.0
    nvlink_gbs: float = 160.0
    gpus_per_node: int = 8

    @classmethod
    def default(cls, precision: str, gpus_per_node: int = 8) -> "Machine":
        peak = DENSE_PEAK_TFLOPS["fp8" if precision == "fp8" else "bf16"]
        return cls(tflops=DEFAULT_EFFICIENCY * peak, gpus_per_node=gpus_per_node)


@dataclass(frozen=True)
class ModelCosts:
    """Milliseconds per micro-batch for one rank's share (``pp`` shares in all)."""

    forward_compute: float
    backward_compute: float
    weight_compute: float
    forward_a2a: float
    backward_a2a: float
    p2p: float

    def costs(self, overlap: bool) -> Costs:
        """The simulator's costs; ``overlap``: DualPipe's overlapped forward-and-backward."""
        f = self.forward_compute + self.forward_a2a
        b = self.backward_compute + self.backward_a2a
        pair = (max(self.forward_compute + self.backward_compute, self.forward_a2a + self.backward_a2a)
                if overlap else f + b)
        return Costs(F=f, B=b, W=self.weight_compute, FB=pair, C=self.p2p)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def remote_nodes(preset: ModelPreset, ep: int, gpus_per_node: int) -> float:
    """Nodes outside its own that a token's dispatch reaches, on average: the EP group spans
    ``n`` nodes, each token goes to ``min(group_topk, n)`` of them (node-limited routing), each being
    the sender's own node with probability ``1/n``."""
    nodes = math.ceil(ep / gpus_per_node)
    reached = min(preset.group_topk, nodes) if preset.num_groups > 1 else min(preset.moe_router_topk, nodes)
    return reached * (1 - 1 / nodes)


def model_costs(preset: ModelPreset, *, pp: int, ep: int, micro_batch_size: int, precision: str,
                machine: Machine) -> ModelCosts:
    counts = count(preset)
    tokens = micro_batch_size * preset.seq_length
    training = (counts.flops_per_token + counts.mtp_flops_per_token) * tokens / pp
    attention = counts.attention_flops_per_token * tokens / pp
    per_ms = machine.tflops * 1e9  # FLOP per millisecond
    forward = training / 3 / per_ms
    weight = (training - attention) / 3 / per_ms

    moe_layers = (preset.num_moe_layers + preset.mtp_num_layers * (preset.num_moe_layers > 0)) / pp
    h = preset.hidden_size
    if ep > 1 and preset.num_moe_layers:
        if ep <= machine.gpus_per_node:  # NVLink: every other EP rank a token is routed to
            copies, bandwidth = preset.moe_router_topk * (1 - 1 / ep), machine.nvlink_gbs
        else:
            copies, bandwidth = remote_nodes(preset, ep, machine.gpus_per_node), machine.ib_gbs
        dispatch = 1 if precision == "fp8" else 2
        per_token_fwd, per_token_bwd = copies * h * (dispatch + 2), copies * h * (2 + 2)
        to_ms = tokens * moe_layers / (bandwidth * 1e6)  # bytes -> ms at GB/s
        forward_a2a, backward_a2a = per_token_fwd * to_ms, per_token_bwd * to_ms
    else:
        forward_a2a = backward_a2a = 0.0
    p2p = tokens * h * 2 / (machine.ib_gbs * 1e6) if pp > 1 else 0.0
    return ModelCosts(forward_compute=forward, backward_compute=2 * forward, weight_compute=weight,
                      forward_a2a=forward_a2a, backward_a2a=backward_a2a, p2p=p2p)


@dataclass(frozen=True)
class ReductionCosts:
    """The data-parallel gradient reduction of one rank's share of the model (1F1B's on as many ranks)."""

    dense_bytes: float  # fp32 gradients of the share's dense (non-expert) parameters
    expert_bytes: float  # and of its routed experts (its 1/ep of them)
    dp: int
    expert_dp: int
    gbs: float
    distributed_optimizer: bool

    def share_ms(self, schedule: str) -> float:
        """Milliseconds to reduce one share under ``schedule``: DualPipe all-reduces over its copies and
        their data-parallel ranks; the others reduce-scatter (distributed optimizer) or all-reduce over DP."""
        mirrored = schedule == "dualpipe"
        all_reduce = mirrored or not self.distributed_optimizer
        groups = ((self.dense_bytes, self.dp), (self.expert_bytes, self.expert_dp))
        return sum(_ring_ms(nbytes, n * (2 if mirrored else 1), all_reduce, self.gbs) for nbytes, n in groups)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _ring_ms(nbytes: float, ranks: int, all_reduce: bool, gbs: float) -> float:
    if ranks <= 1:
        return 0.0
    return (2 if all_reduce else 1) * (ranks - 1) / ranks * nbytes / (gbs * 1e6)


def reduction_costs(preset: ModelPreset, *, pp: int, ep: int, etp: int, dp: int, expert_dp: int,
                    distributed_optimizer: bool, machine: Machine) -> ReductionCosts:
    counts = count(preset)
    moe_layers = preset.num_moe_layers + preset.mtp_num_layers * (preset.num_moe_layers > 0)
    routed = moe_layers * preset.num_routed_experts * expert_params(preset)
    dense = counts.total_params + counts.mtp_params - routed
    return ReductionCosts(dense_bytes=4 * dense / pp, expert_bytes=4 * routed / (pp * ep * etp), dp=dp,
                          expert_dp=expert_dp, gbs=machine.ib_gbs, distributed_optimizer=distributed_optimizer)
