"""Build a DeepSeek-V3 ``GPTModel`` stage from a config, as Megatron's training builder does."""

from __future__ import annotations

from megatron_dsv3 import dsv3


def build_gpt_model(
    config,
    *,
    vocab_size: int,
    seq_length: int,
    vp_stage: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    share_embeddings: bool = False,
):
    """One pipeline (virtual) stage of the model, built from the ``dsv3`` spec.

    ``pre_process``/``post_process`` default to "first/last stage" from Megatron's parallel state.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = dsv3(config, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings,
        position_embedding_type="rope",
        mtp_block_spec=spec.mtp_block_spec,
        vp_stage=vp_stage,
    )
