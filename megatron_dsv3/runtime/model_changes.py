"""Run-time changes applied whenever a ``dsv3`` spec is built (group ``model``)."""

from __future__ import annotations

from megatron_dsv3.runtime.registry import megatron_change, original, replace

_RESOLVER = "megatron.core.transformer.mla_qk_norm_config.QKNormConfigResolver._resolve_mla_qk_layernorm"


@megatron_change(
    group="model",
    targets=[_RESOLVER],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="QKNormConfigResolver._resolve_mla_qk_layernorm keeps linear_q_proj a plain "
    "linear when q_lora_rank is None",
)
def uncompressed_query_has_no_extra_norm():
    """MLA without query compression (``q_lora_rank=None``, DeepSeek-V2-Lite) gets no query norm.

    DeepSeek-V2-Lite projects queries straight from the normalised hidden state (``q = W_q h``);
    only the compressed key/value latent is normalised.  With ``qk_layernorm=True`` (needed for that
    kv norm) Megatron-Core 0.19 swaps ``linear_q_proj`` for a fused norm+linear, which adds a second,
    learnable RMSNorm in front of the query projection under Transformer Engine and fails outright
    ("qk_layernorm requires TransformerEngine ...") on the local backend.  The replacement keeps the
    spec's plain ``linear_q_proj`` when there is no ``q_lora_rank``; every other case is unchanged.
    """
    resolve = original(_RESOLVER)

    def _resolve_mla_qk_layernorm(self):
        if self.has_q_lora:
            return resolve(self)
        from megatron.core.transformer.identity_op import IdentityOp

        kv_norm = self.submodules.kv_layernorm or IdentityOp
        if self._is_trivial(kv_norm):
            linear_kv_up_proj = self._mla_fused_linear_or_default(
                self.submodules.linear_kv_up_proj, "linear_kv_up_proj"
            )
        else:
            linear_kv_up_proj = self._non_fused_or_default(
                self.submodules.linear_kv_up_proj, "linear_kv_up_proj"
            )
        return self._result(
            linear_q_proj=self._non_fused_or_default(self.submodules.linear_q_proj, "linear_q_proj"),
            linear_q_up_proj=IdentityOp,
            linear_kv_up_proj=linear_kv_up_proj,
            q_layernorm=IdentityOp,
            kv_layernorm=kv_norm,
        )

    replace(_RESOLVER, _resolve_mla_qk_layernorm)


@megatron_change(
    group="model",
    targets=["megatron.core.transformer.multi_latent_attention.Linear"],
    versions="megatron-core 0.19.x without Transformer Engine installed",
    fixed_upstream_when="MLASelfAttention accepts a local replicated linear for its down-projections "
    "(multi_latent_attention.Linear is no longer None without TE)",
)
def mla_accepts_replicated_down_projections():
    """MLA accepts the local backend's replicated down-projection (``DuplicatedLinear``).

    ``MLASelfAttention`` only builds down-projections from a fixed list of classes; without
    Transformer Engine the list's replicated member (``multi_latent_attention.Linear``, ModelOpt's
    linear) is ``None``.  The local ``dsv3`` spec replicates the down-projections as TE does (see
    ``megatron_dsv3/spec/linear.py`` for the gradient bug of the column-split alternative), so the
    module-level name is pointed at that class.  With Transformer Engine installed the name already
    holds ModelOpt's replicated linear and is left alone; the local spec then uses it.
    """
    from megatron.core.transformer import multi_latent_attention

    if multi_latent_attention.Linear is None:
        from megatron_dsv3.spec.linear import DuplicatedLinear

        replace("megatron.core.transformer.multi_latent_attention.Linear", DuplicatedLinear)


@megatron_change(
    group="model",
    targets=["megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler.set_loss_scale"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="MoEAuxLossAutoScaler.backward's default scale has the schedule's shape [1]",
)
def moe_aux_loss_scale_keeps_any_shape():
    """The MoE auxiliary-loss scale can be set after a backward that ran outside the schedule.

    A backward through an MoE layer outside Megatron's pipeline schedule (a model called directly,
    as a test or a custom loop does) leaves ``MoEAuxLossAutoScaler.main_loss_backward_scale`` as a
    0-dim tensor; the schedules then set a 1-element scale with ``copy_``, which fails ("output
    with shape [] doesn't match the broadcast shape [1]").  The replacement copies when the shapes
    agree and otherwise stores the new scale, which is what the next backward reads either way.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def set_loss_scale(scale):
        current = MoEAuxLossAutoScaler.main_loss_backward_scale
        if current is None or current.shape != scale.shape:
            MoEAuxLossAutoScaler.main_loss_backward_scale = scale
        else:
            current.copy_(scale)

    replace("megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler.set_loss_scale", set_loss_scale)
