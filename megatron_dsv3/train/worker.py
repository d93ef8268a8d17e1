"""One training process: Megatron-LM's own ``pretrain`` with the ``dsv3`` spec.

This mirrors what stock ``pretrain_gpt.py`` does (parse and validate Megatron's arguments, build
the model config with ``gpt_config_from_args``, call ``megatron.training.pretrain``), so a recipe
trains the same way under ``megatron-dsv3 train`` and under ``pretrain_gpt.py``.  Run by
``megatron-dsv3 train`` directly (one process) or under ``torchrun`` (``python -m
megatron_dsv3.train.worker <megatron args>``).
"""

from __future__ import annotations

import sys

from megatron_dsv3.runtime.activation import activate
from megatron_dsv3.runtime.catalog import apply_group
from megatron_dsv3.train.steps import datasets_provider, embedding_ranks, forward_step


def run(argv: list[str]) -> None:
    activate(source="megatron-dsv3 train")

    apply_group("train")

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    saved = sys.argv
    sys.argv = ["megatron-dsv3-train"] + list(argv)
    try:
        args = parse_and_validate_args()
    finally:
        sys.argv = saved
    model_config = gpt_config_from_args(args)
    config = pretrain_cfg_container_from_args(args, model_config)
    pretrain(config, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             get_embedding_ranks=embedding_ranks)


if __name__ == "__main__":
    run(sys.argv[1:])
