"""The routed experts of one expert-parallel rank as two grouped GEMMs (the local backend's ``--moe-grouped-gemm``).

Megatron-Core 0.19 has no grouped-GEMM experts without Transformer Engine: its local provider
always builds ``SequentialMLP``, one small GEMM per expert and projection (and its legacy
``GroupedMLP`` was removed in 0.17).  :class:`GroupedExperts` computes what ``SequentialMLP``
computes, DeepSeekMoE's routed experts ``FFN_e(x) = W2_e (SiLU(W1g_e x) * W1u_e x)`` weighted by the
gate values (arXiv 2412.19437v2, section 2.1.2), with the weights of all local experts stacked and
one ``grouped_mm`` per projection and GEMM (:mod:`megatron_dsv3.model.grouped_gemm`), the way
torchtitan runs DeepSeek-V3's experts.

It keeps what the sequential experts promise:

* the same numbers: each expert's weights are initialised with the same random draws, the
  activation is Megatron's (fused SwiGLU with the gate values, or the unfused GLU), and in fp32 on
  the CPU outputs and gradients equal ``SequentialMLP``'s bit for bit;
* the same distributed checkpoint: :meth:`GroupedExperts.sharded_state_dict` writes the keys,
  global shapes, offsets and replicas of ``SequentialMLP``'s (``experts.experts.linear_fc1.weight``
  as (experts, 2 x FFN, hidden) with SwiGLU's gate and up halves sharded separately over expert
  tensor parallelism, and each linear's empty ``_extra_state``), so a checkpoint saved under either
  loads under the other; a plain state dict of ``SequentialMLP`` (per-expert names, as
  :mod:`megatron_dsv3.model.hf_names` has them) loads too, its experts stacked;
* the same sharding: expert parallelism picks the local experts, expert tensor parallelism splits
  fc1's rows and fc2's columns as Megatron's column and row parallel linears do, and the token
  dispatcher does all the communication, as for Megatron's experts;
* DualPipe's W: the grouped weight GEMMs queue in the zero-bubble queue like every other linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_geglu import quick_gelu, weighted_bias_quick_geglu_impl
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_object_for_checkpoint

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.grouped_gemm import GroupedLinear, init_expert_weights, require_grouped_mm

_FIX = "use --dsv3-experts sequential (recipe model.experts: sequential)"


def check_config_for_grouped_experts(config) -> None:
    """Refuse, by name, what :class:`GroupedExperts` does not implement (none of it is DeepSeek-V3's)."""
    refused = {
        "add_bias_linear (expert biases; DeepSeek-V3 has none, use --disable-bias-linear)": config.add_bias_linear,
        "moe_latent_size": config.moe_latent_size is not None,
        "use_te_activation_func (Transformer Engine's activation modules)": config.use_te_activation_func,
        "Transformer Engine FP8 (--fp8-format) on the local backend": bool(config.fp8),
        "recompute of `moe_act`": "moe_act" in (config.recompute_modules or ())
        and config.recompute_granularity == "selective",
    }
    used = [name for name, on in refused.items() if on]
    if used:
        raise ConfigError(f"the local backend's grouped experts do not support {', '.join(used)}", fix=_FIX,
                          key="--dsv3-experts")


class GroupedExperts(MegatronModule):
    """``SequentialMLP``'s computation for ``num_local_experts`` experts in two grouped GEMMs
    (see the module docstring); built by Megatron's ``MoELayer`` like any experts class."""

    linear_class = GroupedLinear  # FP8's subclass swaps it (megatron_dsv3.fp8.experts)

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name: str | None = None):
        super().__init__(config=config)
        check_config_for_grouped_experts(config)
        require_grouped_mm()
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = dict(tp_size=self.tp_group.size(), tp_rank=self.tp_group.rank())
        ffn, glu = config.moe_ffn_hidden_size, config.gated_linear_unit
        self.linear_fc1 = self.linear_class(num_local_experts, config.hidden_size, ffn * (2 if glu else 1),
                                            config=config, parallel="column", init_method=config.init_method,
                                            stride=2 if glu else 1, **tp)
        self.linear_fc2 = self.linear_class(num_local_experts, ffn, config.hidden_size, config=config,
                                            parallel="row", init_method=config.output_layer_init_method, **tp)
        if config.perform_initialization:
            init_expert_weights([self.linear_fc1, self.linear_fc2], num_local_experts)
        self.register_load_state_dict_pre_hook(_load_sequential_layout)

    # ---- compute ----
    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """``SequentialMLP.forward``'s contract: tokens sorted by local expert, their counts and gate
        values in; the experts' weighted outputs in the same order out, and no bias."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ConfigError("moe_apply_probs_on_input works only with top-1 routing",
                                  fix="drop --moe-apply-probs-on-input", key="--moe-apply-probs-on-input")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        hidden = self.activation(self.linear_fc1(rows, tokens_per_expert), probs.reshape(-1))
        output = self.linear_fc2(hidden, tokens_per_expert)
        return output.view(*shape[:-1], output.shape[-1]), None

    def activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The activation times the gate values, as Megatron's ``MLP.forward`` computes them for an
        expert (its fused weighted SwiGLU / quick-GeGLU, or the unfused GLU then the product)."""
        c = self.config
        if c.bias_activation_fusion:
            if c.activation_func == F.silu and c.gated_linear_unit:
                return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1), c.activation_func_fp8_input_store)
            if c.activation_func == quick_gelu and c.gated_linear_unit:
                return weighted_bias_quick_geglu_impl(h, None, probs.unsqueeze(-1), c.activation_func_fp8_input_store,
                                                      c.glu_linear_offset, c.activation_func_clamp_value)
            raise ConfigError("with bias_activation_fusion Megatron's experts fuse only SwiGLU and quick-GeGLU",
                              fix="pass --no-bias-swiglu-fusion, or --swiglu", key="--bias-swiglu-fusion")
        if c.gated_linear_unit:
            gate, linear = torch.chunk(h, 2, dim=-1)
            if (clamp := c.activation_func_clamp_value) is not None:
                gate, linear = gate.clamp(min=None, max=clamp), linear.clamp(min=-clamp, max=clamp)
            out = c.activation_func(gate) * (linear + c.glu_linear_offset)
        else:
            out = c.activation_func(h)
        return (out * probs.unsqueeze(-1)).to(out.dtype)

    def backward_dw(self):
        """As Megatron's local linears: nothing (the zero-bubble W runs through ``model.wgrad``)."""

    # ---- checkpoints: SequentialMLP's layout ----
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The ``ShardedTensor``s ``SequentialMLP.sharded_state_dict`` makes, from the stacked weights."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards"):
            raise ConfigError("singleton_local_shards checkpoints store one tensor per expert, which the grouped"
                              " experts do not write", fix=_FIX, key="--dsv3-experts")
        axis, ep_rank, ep_size = len(sharded_offsets), self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size, dp_rank = self.tp_group.rank(), self.tp_group.size(), self.dp_group.rank()
        experts = (axis, ep_rank, ep_size)  # axis 0 of the stacked weight: this rank's experts
        replica = (0, 0, dp_rank)  # sharded over expert TP, replicated over expert DP

        def tensor(key, data, *offsets, replica_id=replica):
            return ShardedTensor.from_rank_offsets(key, data, *sharded_offsets, experts, *offsets,
                                                   replica_id=replica_id, prepend_axis_num=axis)

        fc1_key, fc2_key = f"{prefix}experts.linear_fc1.weight", f"{prefix}experts.linear_fc2.weight"
        state = {f"{prefix}linear_fc2.weight": tensor(fc2_key, self.linear_fc2.weight, (axis + 2, tp_rank, tp_size))}
        if self.config.gated_linear_unit:
            def build(key, data, replica_id, flattened_range):
                gate, up = (half.contiguous() for half in torch.chunk(data, 2, dim=1))
                return [tensor(key, gate, (axis + 1, tp_rank, 2 * tp_size), replica_id=replica_id),
                        tensor(key, up, (axis + 1, tp_size + tp_rank, 2 * tp_size), replica_id=replica_id)]

            state[f"{prefix}linear_fc1.weight"] = ShardedTensorFactory(
                fc1_key, self.linear_fc1.weight, build, _cat_gate_and_up, replica)
        else:
            state[f"{prefix}linear_fc1.weight"] = tensor(fc1_key, self.linear_fc1.weight, (axis + 1, tp_rank, tp_size))
        # SequentialMLP's linears each save an empty _extra_state; written so that it can load ours.
        for i in range(self.num_local_experts):
            offsets = (*sharded_offsets, (axis, ep_rank * self.num_local_experts + i, ep_size * self.num_local_experts))
            for fc in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}local_experts.{i}.{fc}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{fc}._extra_state", offsets, replica_id=(0, tp_rank, dp_rank))
        return state


def _cat_gate_and_up(halves):
    with torch.no_grad():
        return torch.cat(halves, dim=1)


def _load_sequential_layout(module, state_dict, prefix, *args) -> None:
    """Accept ``SequentialMLP``'s per-expert state: its empty ``_extra_state`` entries are dropped,
    its per-expert weights (``local_experts.<e>.linear_fc1.weight``) stacked."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.") and k.endswith("._extra_state")]:
        del state_dict[key]
    for fc in ("linear_fc1", "linear_fc2"):
        keys = [f"{prefix}local_experts.{e}.{fc}.weight" for e in range(module.num_local_experts)]
        present = [k for k in keys if k in state_dict]
        if not present:
            continue
        if len(present) != len(keys):
            missing = sorted(set(keys) - set(present))
            raise KeyError(f"a per-expert state dict for {prefix}{fc} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        state_dict[f"{prefix}{fc}.weight"] = torch.stack([state_dict.pop(k) for k in keys])
