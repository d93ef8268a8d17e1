"""Per-GPU memory estimate of a recipe, for its most loaded pipeline rank.

Every term is a count times a byte size; ``docs/recipes.md`` has the same model as tables.  A test
holds the activation formula against the tensors autograd actually keeps in a built model
(dsv3-tiny on CPU: within 2%).

**Parameters a rank holds** (per pipeline rank, over its virtual stages; sizes from
:mod:`megatron_dsv3.model.accounting`): MLA up-projections and output projection, the dense MLP and the
shared experts divided by TP; the MLA down-projections (replicated under TP), RMSNorms and the
router kept whole; routed experts ``E * 3 h f_e / (ep * etp)``.  The embedding ``V h / tp`` sits on
the chunk holding ``E``, the output head ``V h / tp`` and the final norm on the chunk holding ``L``,
an MTP depth (``3h + 2h^2 / tp`` plus one layer) on the chunk holding ``m``, which also gets an
embedding copy (Megatron builds one wherever ``pre_process or mtp_process``).

**Bytes per parameter**: weights 2 (bf16; fp32 recipes 4); fp32 main gradients 4; optimizer states
12 (fp32 master weights + Adam m and v; fp32 recipes have no master copy: 8), divided with
``use_distributed_optimizer`` by the data-parallel size ``dp * cp`` for dense parameters and by the
expert-data-parallel size ``world / (pp * ep * etp)`` for routed experts.

**Activations** of one micro-batch of ``T = micro_batch_size * seq_length / cp`` tokens, per token
and layer, ``b`` = 2 bytes per value (4 for fp32 recipes).  Values of size ``h`` and the latents
are divided by TP under sequence parallelism, head-sharded values by TP always:

* RMSNorm over ``x`` values: its input and its output (the next operator's input), ``2b x``; the
  local backend's norm also keeps an fp32 copy of the input and the normalised tensor
  (``(4 + 2b) x``); ``layernorm`` recompute keeps only the input (``b x``).  Input and pre-MLP
  norms over ``h``; latent norms over ``q_lora + kv_lora`` (recomputed with ``mla_up_proj`` when
  Transformer Engine fuses them into the up-projections), plus the rope key ``d_rope``;
* attention: q, k, v ``n (2 (d_nope + d_rope) + d_v) / tp`` (dropped by ``mla_up_proj``), output
  ``n d_v / tp``.  Fused attention (Transformer Engine, or PyTorch SDPA on a GPU) keeps no scores;
  on CPU, SDPA's math path keeps the fp32 softmax ``4 n s / tp`` bytes (dropped by ``core_attn``);
* dense MLP: fc1 output and activation ``3 f / tp`` (dropped by ``mlp``);
* MoE: router scores in fp32 and int64 routing indices, ``4 E + 32 top_k`` bytes; routed experts,
  ``top_k * etp`` token copies of ``h + 3 f_e / etp`` (fc1 input, fc1 output, activation;
  ``moe_act`` drops ``f_e``); shared experts ``3 n_s f_e / tp`` (dropped by ``shared_experts``);
  ``moe`` keeps only the layer's MoE input;
* loss, per output head (the main one and one per MTP depth): final norm and the fp32 softmax,
  ``4 V / tp`` bytes; an MTP depth adds its two input norms, the ``2h`` projection input and one layer.

Full recompute keeps the ``h`` input of each recompute unit (``uniform``: every ``num_layers``
layers; ``block``: the first ``num_layers`` layers of each chunk) plus, once per rank, the full
activations of one unit being recomputed.  Experts are assumed perfectly balanced.

**Micro-batches in flight**: at its first backward, rank ``r`` holds ``min(pp - r, M)`` micro-batches
under 1F1B, and the first ``2 (pp - r - 1) + (vpp - 1) pp + 1`` forwards of Megatron's interleaved
order (see :mod:`megatron_dsv3.pipeline.in_flight`), with ``M = global batch / (micro batch x dp)``
(the final batch size when the batch ramps up).

**Fixed overhead**: 6 GiB on a GPU: about 1 GiB of CUDA context and kernels (PyTorch, cuBLAS,
Transformer Engine), 1.5 GiB of NCCL buffers for the 6-8 process groups Megatron creates, 0.5 GiB of
transient MoE dispatch and gradient-bucket buffers, and 3 GiB (4% of 80 GiB) for the caching
allocator's fragmentation, which long MoE runs (variable token counts per expert) accumulate.
1 GiB on CPU (interpreter, PyTorch and Megatron).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_dsv3.model.accounting import attention_params, dense_mlp_params, expert_params
from megatron_dsv3.model.backends import planned_backend
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.parallel.placement import Chunk, placement_for
from megatron_dsv3.pipeline.in_flight import in_flight
from megatron_dsv3.recipe.sizes import num_microbatches, parallel_layout

GIB = 1024**3
OVERHEAD_GIB = {"cuda": 6.0, "cpu": 1.0}


@dataclass(frozen=True)
class RankMemory:
    """Memory of one pipeline rank (all ranks of a pipeline stage hold the same), in GiB."""

    pp_rank: int
    dense_params: int
    expert_params: int
    in_flight: int
    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states + self.activations + self.overhead


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per component for the most loaded rank (``pp_rank``), and every pipeline rank."""

    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    overhead: float
    total: float
    pp_rank: int
    ranks: tuple[RankMemory, ...]

    def rows(self) -> list[tuple[str, float]]:
        return [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states), ("activations", self.activations),
                ("overhead", self.overhead), ("total", self.total)]


@dataclass(frozen=True)
class _Setup:
    """What the formulas need besides the preset."""

    layout: ParallelLayout
    world_size: int
    seq: int
    tokens: int  # per micro-batch on this rank, before the sequence-parallel split
    act_bytes: int
    fused_norms: bool  # Transformer Engine's norms (fused into the next linear where it can)
    math_attention: bool  # attention that keeps its softmax probabilities (SDPA on CPU)
    granularity: str
    modules: frozenset
    method: str | None
    unit: int


# ---- parameters ----
def mla_split_params(p: ModelPreset) -> int:
    """MLA weights Megatron splits over TP: q (up-)projection, kv up-projection, output projection."""
    n = p.num_attention_heads
    q = (p.q_lora_rank or p.hidden_size) * n * p.qk_head_dim
    kv_up = p.kv_lora_rank * n * (p.qk_nope_head_dim + p.v_head_dim)
    return q + kv_up + n * p.v_head_dim * p.hidden_size


def layer_params(p: ModelPreset, moe: bool, lay: ParallelLayout) -> tuple[float, float]:
    """``(dense, routed-expert)`` parameters of one decoder layer on one rank."""
    replicated = attention_params(p) - mla_split_params(p) + 2 * p.hidden_size
    split = mla_split_params(p)
    if not moe:
        return replicated + (split + dense_mlp_params(p)) / lay.tp, 0.0
    replicated += p.hidden_size * p.num_routed_experts  # router
    split += p.num_shared_experts * expert_params(p)
    experts = p.num_routed_experts * expert_params(p) / (lay.ep * lay.etp)
    return replicated + split / lay.tp, experts


def chunk_params(p: ModelPreset, chunk: Chunk, lay: ParallelLayout) -> tuple[float, float]:
    h, table = p.hidden_size, p.vocab_size * p.hidden_size / lay.tp
    dense = expert = 0.0
    for i in chunk.decoders:
        d, e = layer_params(p, i >= p.first_k_dense, lay)
        dense, expert = dense + d, expert + e
    if chunk.embedding:
        dense += table
    if chunk.loss:
        dense += h + (0 if p.tie_embeddings and chunk.embedding else table)
    if chunk.mtp:
        d, e = layer_params(p, p.num_moe_layers > 0, lay)
        dense += chunk.mtp * (d + 3 * h + 2 * h * h / lay.tp) + (0 if chunk.embedding else table)
        expert += chunk.mtp * e
    return dense, expert


# ---- activations ----
def _norm(s: _Setup, values: float, recomputed: bool = False, output: bool = True) -> float:
    """Bytes per token an RMSNorm over ``values`` keeps: its input (Transformer Engine) or an fp32
    copy of the input and the normalised tensor (the local ``RMSNorm``), plus its output as the next
    operator's input; recomputed (``layernorm``), only the input."""
    b = s.act_bytes
    if recomputed:
        return b * values
    return ((b if s.fused_norms else 4 + b) + (b if output else 0)) * values


def layer_activation_terms(p: ModelPreset, moe: bool, s: _Setup) -> dict[str, float]:
    """Bytes per token of one decoder layer's saved activations, by tensor (see the module doc)."""
    lay, b = s.layout, s.act_bytes
    seq_split = lay.tp if lay.sp else 1
    h = p.hidden_size / seq_split
    heads = p.num_attention_heads / lay.tp
    keep = lambda module, value: 0.0 if module in s.modules else value  # noqa: E731
    # Transformer Engine fuses the latent norms into the up-projections, inside mla_up_proj's recompute.
    latent_recomputed = s.fused_norms and "mla_up_proj" in s.modules
    latents = ((p.q_lora_rank or 0) + p.kv_lora_rank) / seq_split
    terms = {
        "input norm": _norm(s, h, "layernorm" in s.modules),
        "q/kv latents": _norm(s, latents, latent_recomputed) + b * p.qk_rope_head_dim,
        "q, k, v": b * keep("mla_up_proj", heads * (2 * p.qk_head_dim + p.v_head_dim)),
        "attention output": b * heads * p.v_head_dim,
        "softmax probs": keep("core_attn", 4.0 * heads * s.seq) if s.math_attention else 0.0,
        "pre-MLP norm": _norm(s, h, "layernorm" in s.modules),
    }
    if not moe:
        terms["MLP"] = b * keep("mlp", 3 * p.ffn_hidden_size / lay.tp)
        return terms
    if "moe" in s.modules:
        return terms
    f = p.moe_ffn_hidden_size / lay.etp
    copies = p.moe_router_topk * lay.etp / seq_split
    # fp32 scores and int64 routing indices (top-k ids, the routing map and the permutation).
    terms["router"] = (4.0 * p.num_routed_experts + 32.0 * p.moe_router_topk) / seq_split
    terms["routed experts"] = b * copies * (p.hidden_size + 2 * f + keep("moe_act", f))
    terms["shared experts"] = b * keep("shared_experts", 3 * p.num_shared_experts * p.moe_ffn_hidden_size / lay.tp)
    return terms


def head_activation_terms(p: ModelPreset, s: _Setup) -> dict[str, float]:
    """Bytes per token of an output head with its loss, and of one MTP depth's own tensors."""
    h = p.hidden_size / (s.layout.tp if s.layout.sp else 1)
    return {
        "final norm": _norm(s, h),
        "softmax (fp32)": 4.0 * p.vocab_size / s.layout.tp,
        "mtp norms and projection input": 2 * _norm(s, h, output=False) + s.act_bytes * 2 * h,
    }


def _layer_bytes(p: ModelPreset, moe: bool, s: _Setup) -> float:
    return s.tokens * sum(layer_activation_terms(p, moe, s).values())


def _input_bytes(p: ModelPreset, s: _Setup) -> float:
    """A layer input kept by full recompute."""
    return s.tokens * s.act_bytes * p.hidden_size / (s.layout.tp if s.layout.sp else 1)


def chunk_activations(p: ModelPreset, chunk: Chunk, s: _Setup) -> tuple[float, float]:
    """``(bytes per micro-batch, bytes of one recompute unit)`` for a chunk."""
    layers = [_layer_bytes(p, i >= p.first_k_dense, s) for i in chunk.decoders]
    stored, unit = sum(layers), 0.0
    if s.granularity == "full" and layers:
        if s.method == "uniform":
            stored = math.ceil(len(layers) / s.unit) * _input_bytes(p, s)
            unit = max(sum(layers[i:i + s.unit]) for i in range(0, len(layers), s.unit))
        else:  # block: the first `unit` layers keep only their inputs
            k = min(s.unit, len(layers))
            stored = k * _input_bytes(p, s) + sum(layers[k:])
            unit = max(layers[:k])
    head = head_activation_terms(p, s)
    loss = s.tokens * (head["final norm"] + head["softmax (fp32)"])
    if chunk.loss:
        stored += loss
    if chunk.mtp:
        own = s.tokens * head["mtp norms and projection input"]
        stored += chunk.mtp * (own + _layer_bytes(p, p.num_moe_layers > 0, s) + loss)
    return stored, unit


# ---- the estimate ----
def _setup(recipe, lay: ParallelLayout, world_size: int) -> _Setup:
    p, rc = recipe.preset, recipe.training.recompute
    return _Setup(
        layout=lay, world_size=world_size, seq=p.seq_length,
        tokens=recipe.training.micro_batch_size * p.seq_length // lay.cp,
        act_bytes=2 if recipe.precision == "bf16" else 4,
        fused_norms=planned_backend(recipe.backend, recipe.is_cpu) == "transformer_engine",
        math_attention=recipe.is_cpu,
        granularity=rc.granularity,
        modules=frozenset(rc.modules if rc.granularity == "selective" else ()),
        method=rc.method, unit=rc.num_layers or 1,
    )


def _rank_memory(recipe, placement, row: list[Chunk], s: _Setup, microbatches: int) -> RankMemory:
    p, lay = recipe.preset, s.layout
    dense = sum(chunk_params(p, c, lay)[0] for c in row)
    expert = sum(chunk_params(p, c, lay)[1] for c in row)
    weight = 2 if recipe.precision == "bf16" else 4
    opt = 12 if recipe.precision == "bf16" else 8
    dense_dp, expert_dp = lay.dp * lay.cp, s.world_size // (lay.pp * lay.ep * lay.etp)
    if recipe.training.use_distributed_optimizer:
        states = opt * (dense / dense_dp + expert / expert_dp)
    else:
        states = opt * (dense + expert)
    per_chunk = [chunk_activations(p, c, s) for c in row]
    flight = in_flight(placement, row[0].pp_rank, microbatches)
    activations = sum(per_chunk[v][0] for v in flight) + max(u for _, u in per_chunk)
    return RankMemory(
        pp_rank=row[0].pp_rank, dense_params=round(dense), expert_params=round(expert),
        in_flight=len(flight), parameters=weight * (dense + expert) / GIB,
        gradients=4 * (dense + expert) / GIB, optimizer_states=states / GIB,
        activations=activations / GIB, overhead=OVERHEAD_GIB[recipe.hardware.device],
    )


def estimate_memory(recipe, world_size: int | None = None) -> "MemoryEstimate":
    """Memory per GPU of ``recipe`` at ``world_size`` (default: the recipe's), most loaded rank first.

    The recipe is not validated here; :func:`megatron_dsv3.recipe.report.recipe_report` does both.
    """
    ws = recipe.world_size(world_size)
    lay = parallel_layout(recipe, ws)
    s = _setup(recipe, lay, ws)
    m = num_microbatches(recipe, lay)
    placement = placement_for(recipe.preset, lay)
    ranks = tuple(_rank_memory(recipe, placement, row, s, m) for row in placement.rows)
    worst = max(ranks, key=lambda r: r.total)
    return MemoryEstimate(
        parameters=worst.parameters, gradients=worst.gradients, optimizer_states=worst.optimizer_states,
        activations=worst.activations, overhead=worst.overhead, total=worst.total,
        pp_rank=worst.pp_rank, ranks=ranks,
    )
