"""Block-wise FP8 training (DeepSeek-V3 section 3.3): recipes, one quantizer, three backends.

* :mod:`~megatron_dsv3.fp8.recipes`: the named recipes (``deepseek``, ``te-blockwise``) as data;
* :mod:`~megatron_dsv3.fp8.quantize`: the quantizer every backend but Transformer Engine uses;
* :mod:`~megatron_dsv3.fp8.emulation` (any device, the reference) and
  :mod:`~megatron_dsv3.fp8.scaled_mm` (``torch._scaled_mm`` on SM90): the GEMMs;
* :mod:`~megatron_dsv3.fp8.linear`, :mod:`~megatron_dsv3.fp8.experts`: FP8 Linears for the local spec;
* :mod:`~megatron_dsv3.fp8.policy`: which Linears stay BF16;
* :mod:`~megatron_dsv3.fp8.te`: the recipes as Transformer Engine objects;
* :mod:`~megatron_dsv3.fp8.support`: what each backend and GPU can run (``check``'s refusals);
* :mod:`~megatron_dsv3.fp8.plan`: the resolved recipe + backend a config carries.

``docs/fp8.md`` explains them.  The quantizer, the GEMMs and the recipes import neither Megatron nor
Transformer Engine, so they run on a GPU machine that has only torch.
"""
