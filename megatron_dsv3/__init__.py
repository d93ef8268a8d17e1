"""megatron-dsv3: DeepSeek-V3 layer specs, presets, schedules and launch plumbing for Megatron-Core.

``megatron_dsv3.dsv3`` is what Megatron's ``--spec megatron_dsv3 dsv3`` (or, with the start-up
hook, ``--spec dsv3``) resolves to.  Importing this package imports neither torch nor Megatron.
"""

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.runtime.activation import activated_by

__version__ = "0.1.0"


def dsv3(config, vp_stage=None, pp_rank=None):
    """The DeepSeek-V3 block spec for the layers the calling pipeline chunk holds.

    Megatron-Core 0.19 calls it as ``dsv3(model_config, vp_stage=...)`` once per virtual stage
    (``megatron/training/models/gpt.py``).  Returns a ``TransformerBlockSubmodules`` whose
    ``mtp_block_spec`` holds the Multi-Token Prediction spec built from the same layers.  The
    plugin must be active (the start-up hook, the patch, or ``megatron_dsv3.launch.activate()``):
    the fixes Megatron needs for these layers are applied then, not while a spec is built.
    """
    # lazy: importing the package (as Megatron's --spec resolution and the start-up hook do) must not
    # import torch or Megatron; the spec needs both.
    from megatron_dsv3.model.spec import dsv3_block_spec

    if activated_by() is None:
        raise ConfigError(
            "megatron-dsv3 is not active in this process, so the dsv3 spec cannot be built: the"
            " start-up hook did not run (MEGATRON_DSV3_HOOK=0, or an editable install without"
            " `megatron-dsv3 hook install`) and pretrain_gpt.py is not patched",
            fix="run `megatron-dsv3 hook install`, apply patches/megatron-lm-core_r0.19.x-pretrain_gpt.patch,"
            " or call megatron_dsv3.launch.activate() before building the model",
            key="spec",
        )
    return dsv3_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
