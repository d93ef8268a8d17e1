"""Run-time changes applied whenever a ``dsv3`` spec is built (group ``model``)."""

from __future__ import annotations

from megatron_dsv3.runtime.registry import megatron_change, original, replace

_RESOLVER = "megatron.core.transformer.mla_qk_norm_config.QKNormConfigResolver._resolve_mla_qk_layernorm"


@megatron_change(
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
    targets=["megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="MLASelfAttention accepts any replicated linear for its down-projections, not "
    "only the classes in its fixed list (TELinear, ModelOpt's Linear, column-parallel linears)",
)
def mla_accepts_replicated_down_projections():
    """MLA accepts a down-projection class its spec provider marks as replicated over TP.

    ``MLASelfAttention.__init__`` builds ``linear_q_down_proj`` / ``linear_kv_down_proj`` only from a
    fixed list of classes, compared by identity (``TELinear``; ``Linear``, ``TEColumnParallelLinear``,
    ``ColumnParallelLinear``) and raises ``Unsupported linear_q_down_proj`` for anything else.  The
    ``dsv3`` spec takes its down-projections from its provider (``provider.linear()``), so an FP8 or
    deferred-weight-gradient provider can swap them: the local backend's is ``DuplicatedLinear``,
    replicated on every tensor-parallel rank as Transformer Engine's spec does (see
    ``megatron_dsv3/model/linear.py`` for the gradient bug of the column-split alternative).  While
    an ``MLASelfAttention`` whose down-projection classes carry ``replicated_over_tensor_parallel``
    is being built, the list's ``Linear`` entry names that class (its kwargs, ``gather_output=False``
    and no TP group, are what a replicated linear needs); afterwards the module's name is restored.
    Down-projections Megatron knows are built exactly as before.
    """
    from megatron.core.transformer import multi_latent_attention

    init = original("megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__")

    def __init__(self, config, submodules, *args, **kwargs):
        replicated = {
            cls for cls in (submodules.linear_q_down_proj, submodules.linear_kv_down_proj)
            if getattr(cls, "replicated_over_tensor_parallel", False)
        }
        if not replicated:
            return init(self, config, submodules, *args, **kwargs)
        if len(replicated) > 1:
            raise TypeError(f"the q and kv down-projections must be one replicated class, got {replicated}")
        saved = multi_latent_attention.Linear
        multi_latent_attention.Linear = replicated.pop()
        try:
            return init(self, config, submodules, *args, **kwargs)
        finally:
            multi_latent_attention.Linear = saved

    replace("megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__", __init__)


@megatron_change(
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
