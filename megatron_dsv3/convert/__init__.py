"""HuggingFace DeepSeek-V3 checkpoints to Megatron and back (``megatron-dsv3 convert``, docs/checkpoints.md).

* :mod:`~megatron_dsv3.convert.hf_config`: the one mapping between an HF ``config.json`` and a preset;
* :mod:`~megatron_dsv3.convert.hf_layout`: what a released checkpoint folder holds, checked whole on open;
* :mod:`~megatron_dsv3.convert.hf_reader` / :mod:`~megatron_dsv3.convert.hf_writer`: safetensors
  checkpoints as released, read and written a tensor at a time (FP8 dequantised on read);
* :mod:`~megatron_dsv3.convert.meta_model`: the target Megatron model on the meta device, in one
  process, and the checkpoint chunks its parameters become;
* :mod:`~megatron_dsv3.convert.megatron_writer` / :mod:`~megatron_dsv3.convert.megatron_reader`:
  Megatron ``torch_dist`` checkpoints, written and read a parameter at a time;
* :mod:`~megatron_dsv3.convert.run`: the two directions, with the output written atomically.

The names (and shapes) between the two sides are :mod:`megatron_dsv3.model.hf_names`, the one table.
"""
