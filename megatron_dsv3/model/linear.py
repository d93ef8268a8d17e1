"""A linear layer replicated on every tensor-parallel rank, for MLA's down-projections.

DeepSeek-V3's MLA compresses the hidden state into small latents (q: 1536, kv: 512 + the 64-wide
rope key).  Megatron-Core's Transformer Engine spec keeps these down-projections whole on every
tensor-parallel rank (``TELinear``, ``parallel_mode="duplicated"``); its local spec splits them
column-wise and all-gathers the output instead, and that path drops part of the gradient of the
shared rope key when TP > 1 (the gather's backward keeps only the local slice, while every rank's
heads use the whole key).  Replicating the layer, as Transformer Engine does, is both faithful and
cheaper.  Under sequence parallelism each rank sees its own tokens, so the weight is marked
``sequence_parallel`` and Megatron's ``finalize_model_grads`` sums its gradient over the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class DuplicatedLinear(torch.nn.Module):
    """``y = x W^T``, the same ``W`` on every tensor-parallel rank; returns ``(y, None)``."""

    # MLASelfAttention accepts a down-projection class marked so (the `model` run-time change
    # `mla_accepts_replicated_down_projections`), as it accepts Transformer Engine's TELinear.
    replicated_over_tensor_parallel = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool = False,
        skip_bias_add: bool = False,
        is_expert: bool = False,
        tp_group=None,
        **unused,
    ):
        super().__init__()
        if bias:
            raise ValueError("MLA down-projections have no bias (DeepSeek-V3)")
        self.config = config
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            # Drawn from the default generator, which Megatron seeds identically on every TP rank.
            with torch.no_grad():
                init_method(self.weight)
        setattr(self.weight, "allreduce", True)
        setattr(self.weight, "tensor_model_parallel", False)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # Replicated over tensor-parallel ranks, like any non-TP tensor.
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, sharded_offsets=sharded_offsets
        )
