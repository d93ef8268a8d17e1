"""RMSNorm for the local backend.

Megatron's local norm (``WrappedTorchNorm``) refuses sequence parallelism, which Megatron-Core
requires for MoE with tensor parallelism; so the local backend brings its own.  Under sequence
parallelism each rank normalises its own tokens and the weight's gradient is a partial sum:
marking the weight ``sequence_parallel`` makes Megatron's ``finalize_model_grads`` all-reduce it
over the tensor-parallel group, as it does for Transformer Engine's norms.

The arithmetic matches DeepSeek's reference (and HuggingFace's ``DeepseekV3RMSNorm``): normalise in
fp32, cast back, then scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
