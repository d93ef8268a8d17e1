"""megatron-dsv3: DeepSeek-V3 layer specs, presets and launch plumbing for Megatron-Core.

``megatron_dsv3.dsv3`` is what Megatron's ``--spec megatron_dsv3 dsv3`` (or, with the start-up
hook, ``--spec dsv3``) resolves to.  Importing this package imports neither torch nor Megatron.
"""

__version__ = "0.1.0"


def dsv3(config, vp_stage=None, pp_rank=None):
    """The DeepSeek-V3 block spec for the layers the calling pipeline stage holds.

    Megatron-Core 0.19 calls it as ``dsv3(model_config, vp_stage=...)`` once per virtual stage
    (``megatron/training/models/gpt.py``).  Returns a ``TransformerBlockSubmodules`` whose
    ``mtp_block_spec`` holds the Multi-Token Prediction spec built from the same layers.
    """
    from megatron_dsv3.spec.layers import dsv3_block_spec

    return dsv3_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
