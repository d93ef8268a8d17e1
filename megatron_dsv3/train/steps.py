"""The per-step functions Megatron's ``pretrain`` needs for a GPT model: batches, loss, data sets.

They do what Megatron-LM's ``pretrain_gpt.py`` does for plain (unpacked) pre-training data, which
is the only data this job feeds: a batch comes from the data iterator on tensor-parallel rank 0 and
is broadcast to the other ranks of the group.  Which chunk needs what comes from the placement
(:mod:`megatron_dsv3.parallel.placement`): the chunk with the embedding needs tokens, the chunk
with the loss labels and loss mask, and the chunk holding Multi-Token Prediction tokens too.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_dsv3.args.settings import running_job_placement

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _needs_batch(vp_stage) -> tuple[bool, bool]:
    """(needs tokens, needs labels) for this rank's chunk ``vp_stage``."""
    from megatron.core import parallel_state

    return running_job_placement().needs_batch(parallel_state.get_pipeline_model_parallel_rank(), vp_stage)


def get_batch(data_iterator, vp_stage=None) -> dict | None:
    """This rank's micro-batch, or None on a middle pipeline stage that needs none."""
    from megatron.core import parallel_state

    needs_tokens, _ = _needs_batch(vp_stage)
    if not needs_tokens:
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    batch = None
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        sample = next(data_iterator)
        batch = {k: sample[k].contiguous() for k in _KEYS}
        batch["loss_mask"] = batch["loss_mask"].float()
    if group.size() > 1:
        holder = [batch]
        torch.distributed.broadcast_object_list(holder, src=src, group=group)
        batch = holder[0]
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        # This rank's zig-zag share of each sequence, as Megatron's pretrain_gpt.py does.
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token loss, the token count, and the report Megatron logs as ``lm loss``."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.core.utils import get_attr_wrapped_model

    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage)
    if batch is None:
        tokens = labels = loss_mask = position_ids = None
    else:
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask, position_ids = batch["loss_mask"], batch["position_ids"]
    if return_schedule_plan:
        plan = model.build_schedule_plan(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
        return plan, partial(loss_func, loss_mask)
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron GPT data sets from the ``--data-path`` (or ``--mock-data``) arguments."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import get_args
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )

    def built_here() -> bool:
        return parallel_state.get_tensor_model_parallel_rank() == 0 and _needs_batch(vp_stage)[0]

    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, built_here, config
    ).build()


datasets_provider.is_distributed = True


def embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """Megatron's embedding group: the ranks whose copies of the word embedding Megatron keeps
    equal (where the tokens are embedded, where MTP embeds the shifted tokens, where a tied output
    head reuses it; a single rank under DeepSeek's schedules, which sum their copies themselves)."""
    from megatron.training import get_args

    tied = not get_args().untie_embeddings_and_output_weights
    return [pp_ranks[r] for r in running_job_placement().embedding_group(tied=tied)]
