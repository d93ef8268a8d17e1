"""The DeepSeek-V3 model: presets, accounting, validation, the spec and its providers, building, HF names.

Everything about *what* the model is lives here; parallelism asks :mod:`megatron_dsv3.parallel`
where each part sits, and nothing here imports the recipe, argument, launch or training layers.
"""
