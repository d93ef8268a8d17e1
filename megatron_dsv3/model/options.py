"""What megatron-dsv3 adds to a Megatron ``TransformerConfig``: one attribute, set in one place.

Megatron's config has no field for a plugin's choices, so the few the model needs travel as one
frozen :class:`ModelOptions` under the attribute ``dsv3_options``, attached where the arguments
become a config (``megatron_dsv3.args.settings.transformer_config``, which stock ``pretrain_gpt.py``
reaches through the ``launch`` change ``configs_carry_the_dualpipe_placement``).  The model reads it
and knows nothing of who chose:

* ``provider``: the spec provider class every Linear comes from (FP8's, ``megatron_dsv3.fp8.provider``);
  None lets :func:`megatron_dsv3.model.providers.provider_for` choose from the backend;
* ``pre_wrap_hooks``: functions the builder runs on the built chunks before Megatron wraps them
  (FP8's BF16 policy, ``megatron_dsv3.fp8.policy.keep_bf16_modules``);
* ``fp8_plan``: the FP8 plan (``megatron_dsv3.fp8.plan.FP8Plan``), read by FP8's own modules only.

(The pipeline placement travels as Megatron's own layout object, ``megatron_dsv3.parallel.megatron_layout``,
because Megatron asks that object where layers go.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ATTRIBUTE = "dsv3_options"


@dataclass(frozen=True)
class ModelOptions:
    provider: type | None = None
    pre_wrap_hooks: tuple[Callable, ...] = ()
    fp8_plan: Any = None


def attach_options(config, options: ModelOptions | None):
    """Give a Megatron ``TransformerConfig`` the plugin's options (None: the defaults); returns it."""
    setattr(config, ATTRIBUTE, options or ModelOptions())
    return config


def options_of(config) -> ModelOptions:
    """The options a ``TransformerConfig`` (or ``GPTModelConfig``) carries; the defaults if none."""
    config = getattr(config, "transformer", config)
    return getattr(config, ATTRIBUTE, None) or ModelOptions()
