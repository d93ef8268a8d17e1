"""Building a DeepSeek-V3 model: Megatron's own builder, with each chunk's roles from the placement.

``megatron-dsv3 train``, stock ``pretrain_gpt.py`` and the tests all build through here: Megatron's
``gpt_config_from_args`` names :class:`DSV3ModelBuilder` for ``dsv3`` specs (the ``launch`` change
``dsv3_models_are_built_for_their_placement``), ``pretrain`` calls its ``build_distributed_models``,
and :func:`build_model_chunks` makes the same call the way ``setup_model_and_optimizer`` does.
"""

from __future__ import annotations

from megatron.training.models.gpt import GPTModelBuilder

from megatron_dsv3.model.options import options_of
from megatron_dsv3.parallel.placement import placement_of

BUILDER = "megatron_dsv3.model.build.DSV3ModelBuilder"


class DSV3ModelBuilder(GPTModelBuilder):
    """``GPTModelBuilder`` whose chunks take ``pre_process``/``post_process`` from the placement.

    Megatron decides them as "first rank and first virtual stage" / "last rank and last virtual
    stage", which is the placement's answer for 1F1B and interleaved and the wrong one for
    DualPipe(V).  Before the chunks are wrapped, the copies a DeepSeek placement keeps are made
    equal (:func:`_equalise_copies`), then the hooks the config's options name run (an FP8 recipe's
    BF16 policy, :func:`megatron_dsv3.fp8.policy.keep_bf16_modules`).
    """

    def __init__(self, model_config):
        super().__init__(model_config)
        for hook in (_equalise_copies, *options_of(model_config).pre_wrap_hooks):
            if hook not in model_config.pre_wrap_hooks:
                model_config.pre_wrap_hooks.append(hook)

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        chunk = placement_of(self._model_config).chunk(pg_collection.pp.rank(), vp_stage)
        return super().build_model(pg_collection, pre_process=chunk.embedding, post_process=chunk.loss,
                                   vp_stage=vp_stage)


def _equalise_copies(chunks):
    """DualPipe's mirrored stage copies receive their original's weights (from rank P-1-r) and are
    marked as replicas; then every extra embedding copy on a rank takes the weights of the chunk
    that embeds the tokens (DualPipeV's rank 0: the MTP copy; Megatron's first/last-rank
    all-reduce of such copies has no second rank to read them from)."""
    placement = placement_of(chunks[0].config)
    if placement.schedule == "dualpipe":
        _copy_mirrors(chunks, placement)
    return _copy_local_embeddings(chunks)


def _copy_mirrors(chunks, placement) -> None:
    import torch
    from megatron.core import parallel_state

    rank = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    partner = torch.distributed.get_process_group_ranks(group)[placement.pp - 1 - rank]
    original_vp = next(c for c in placement.rows[rank] if not c.mirror).vp_stage
    original, mirror = chunks[original_vp], chunks[1 - original_vp]
    ops = [torch.distributed.P2POp(torch.distributed.isend, p.data.contiguous(), partner, group)
           for p in original.parameters()]
    received = [torch.empty_like(p.data) for p in mirror.parameters()]
    ops += [torch.distributed.P2POp(torch.distributed.irecv, r, partner, group) for r in received]
    for request in torch.distributed.batch_isend_irecv(ops):
        request.wait()
    with torch.no_grad():
        for p, r in zip(mirror.parameters(), received):
            p.copy_(r)
    _mark_as_replica(mirror)


def _mark_as_replica(model) -> None:
    """A mirrored copy: counted once in the gradient norm (``shared``), saved as a replica."""
    for param in model.parameters():
        param.shared = True
    sharded_state_dict = model.sharded_state_dict

    def replica_sharded_state_dict(*args, **kwargs):
        from megatron.core.dist_checkpointing.mapping import ShardedBase

        state = sharded_state_dict(*args, **kwargs)

        def mark(item):
            if isinstance(item, dict):
                for value in item.values():
                    mark(value)
            elif isinstance(item, (list, tuple)):
                for value in item:
                    mark(value)
            elif isinstance(item, ShardedBase):
                rid = item.replica_id
                item.replica_id = (rid[0] + 1, *rid[1:]) if isinstance(rid, tuple) else rid + 1

        mark(state)
        return state

    model.sharded_state_dict = replica_sharded_state_dict


def embedding_copies(chunks) -> list:
    """This rank's copies of the word embedding, one per chunk that holds one: the embedding
    itself, MTP's copy, or a tied output head's weight on a chunk that does not embed."""
    copies = []
    for chunk in chunks:
        while hasattr(chunk, "module"):  # DDP, Float16Module
            chunk = chunk.module
        if hasattr(chunk, "embedding"):
            copies.append(chunk.embedding.word_embeddings.weight)
        elif getattr(chunk, "share_embeddings_and_output_weights", False) and getattr(chunk, "post_process", False):
            copies.append(chunk.output_layer.weight)
    return copies


def _copy_local_embeddings(chunks):
    """Every extra embedding copy on this rank takes the weights of the chunk that embeds the tokens."""
    import torch

    source = next((c for c in chunks if getattr(c, "pre_process", False)), None)
    if source is None:
        return chunks
    weight = source.embedding.word_embeddings.weight
    with torch.no_grad():
        for copy in embedding_copies(chunks):
            if copy is not weight:
                copy.copy_(weight)
    return chunks


def use_dsv3_builder(model_config):
    """``model_config`` (a ``GPTModelConfig`` for a ``dsv3`` spec), to be built by :class:`DSV3ModelBuilder`."""
    model_config.builder = BUILDER
    return model_config


def model_config_from_args(args):
    """The ``GPTModelConfig`` stock ``pretrain_gpt.py`` makes from parsed arguments (the plugin active,
    so the config carries its placement and names this builder)."""
    from megatron.training.argument_utils import gpt_config_from_args

    return use_dsv3_builder(gpt_config_from_args(args))


def build_model_chunks(args, *, wrap_with_ddp: bool = True, quiet: bool = True):
    """``(model_config, chunks)``: this rank's model chunks, built as ``pretrain`` builds them.

    The same calls as Megatron's ``setup_model_and_optimizer`` (the configuration-container path of
    ``pretrain``): ``GPTModelConfig`` from the arguments, then the config's builder's
    ``build_distributed_models`` with the DDP, optimizer, distributed and RNG settings the same
    arguments give.  The plugin must be active and Megatron's parallel state initialised.
    """
    import contextlib
    import io

    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    model_config = model_config_from_args(args)
    cfg = pretrain_cfg_container_from_args(args, model_config)
    builder = model_config.get_builder_cls()(model_config)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        chunks = builder.build_distributed_models(
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
            ddp_config=cfg.ddp,
            overlap_param_gather_with_optimizer_step=cfg.optimizer.overlap_param_gather_with_optimizer_step,
            use_megatron_fsdp=cfg.dist.use_megatron_fsdp,
            use_torch_fsdp2=cfg.dist.use_torch_fsdp2,
            wrap_with_ddp=wrap_with_ddp,
            data_parallel_random_init=cfg.rng.data_parallel_random_init,
        )
    return model_config, chunks
