"""One training step of a preset under any parallel layout, with Megatron-Core's own machinery.

The pieces the parallel-equivalence tests need, run inside each process of
:func:`megatron_dsv3.testing.distributed.run_distributed`:

* :func:`init_parallel`: CPU mode, gloo, Megatron's parallel state (its embedding group from the
  placement) and RNG;
* :func:`build_chunks`: the model chunks this rank holds, built exactly as ``megatron-dsv3 train``
  builds them: the recipe composer's arguments (:mod:`megatron_dsv3.args.compose`), Megatron's
  parser, and Megatron's builder with the placement's roles (:mod:`megatron_dsv3.model.build`);
* :func:`save_weights` / :func:`load_weights`: Megatron's distributed checkpoint, which maps every
  parameter between layouts (a single-process reference and a TP/EP/PP/VPP run share one file);
* :func:`train_step`: Megatron's pipeline schedule (``get_forward_backward_func``) and
  ``finalize_model_grads`` over a fixed global batch, optionally followed by an optimizer step;
* :func:`save_gradients`: the gradients, resharded to full tensors through the same checkpoint
  format, so they compare one to one with the reference.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from megatron_dsv3.args.compose import megatron_argv
from megatron_dsv3.args.settings import parse_megatron_args
from megatron_dsv3.cpu import enable_cpu_mode
from megatron_dsv3.model.build import build_model_chunks
from megatron_dsv3.model.presets import ModelPreset, get_preset
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.parallel.placement import placement_for, placement_of
from megatron_dsv3.runtime.activation import activate
from megatron_dsv3.train.steps import loss_func


def _preset(preset: ModelPreset | str) -> ModelPreset:
    return get_preset(preset) if isinstance(preset, str) else preset


def init_parallel(layout: ParallelLayout, seed: int = 1234, *, cpu: bool = True, preset="dsv3-tiny") -> None:
    """Join the process group (gloo on CPU, NCCL on a GPU) and set up Megatron's parallel state.

    The embedding group holds the ranks the placement of ``preset`` under ``layout`` gives an
    embedding copy (as ``megatron-dsv3 train`` does through ``get_embedding_ranks``).
    """
    activate(source="test harness")
    if cpu:
        enable_cpu_mode()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if cpu else "nccl")
    world = torch.distributed.get_world_size()
    if world != layout.world_size:
        raise ValueError(f"layout needs {layout.world_size} processes, got {world}")
    placement = placement_for(_preset(preset), layout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=placement.vpp if placement.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        get_embedding_ranks=lambda pp_ranks, *_: [pp_ranks[r] for r in placement.embedding_group()],
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_chunks(
    preset: ModelPreset | str,
    layout: ParallelLayout,
    *,
    extra_args: tuple[str, ...] = (),
    ddp: bool = True,
    cpu: bool = True,
    backend: str = "local",
):
    """``(config, args, chunks)``: this rank's model chunks for ``preset`` under ``layout``.

    fp32 and no dropout unless ``extra_args`` say otherwise; with ``ddp`` each chunk is wrapped in
    Megatron's ``DistributedDataParallel`` as ``pretrain`` wraps it.
    """
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    argv = megatron_argv(_preset(preset), layout, backend=backend, cpu=cpu, extra=list(extra_args))
    args = parse_megatron_args(argv)
    model_config, chunks = build_model_chunks(args, wrap_with_ddp=ddp)
    config = model_config.transformer
    if ddp:
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
    return config, args, chunks


def _unwrap(chunk):
    while hasattr(chunk, "module"):  # DDP, then Float16Module
        chunk = chunk.module
    return chunk


def _sharded_state_dict(chunks):
    """One sharded state dict over all chunks.

    The checkpoint stores each tensor under its global key (``ShardedTensor.key``); the dict keys
    are the chunks' local names, which repeat across virtual stages, hence the chunk prefix.
    """
    merged = {}
    for index, chunk in enumerate(chunks):
        for name, item in _unwrap(chunk).sharded_state_dict().items():
            merged[f"chunk{index}.{name}"] = item
    return merged


def save_weights(chunks, directory: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), directory)


def _split_by_chunk(state: dict, num_chunks: int) -> list[dict]:
    per_chunk = [{} for _ in range(num_chunks)]
    for key, value in state.items():
        if not key.startswith("chunk"):  # the checkpoint's common state (args, iteration, ...)
            continue
        prefix, name = key.split(".", 1)
        per_chunk[int(prefix[len("chunk"):])][name] = value
    return per_chunk


def load_weights(chunks, directory: str) -> None:
    # One collective load for all chunks: the checkpoint validates that every tensor has a main
    # replica among the ranks taking part, which only holds across all virtual stages together.
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state_dict(chunks), directory)
    for chunk, chunk_state in zip(chunks, _split_by_chunk(state, len(chunks))):
        _unwrap(chunk).load_state_dict(chunk_state, strict=True)


def _grad_of(param):
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def save_gradients(chunks, directory: str) -> None:
    """The gradients of all parameters, written as a checkpoint of full (unsharded) tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = {id(p): p for chunk in chunks for p in _unwrap(chunk).parameters()}
    grads = {}
    for key, item in _sharded_state_dict(chunks).items():
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and id(item.data) in params:
            grad = _grad_of(params[id(item.data)])
            item.data = grad.detach().to(torch.float32).view_as(item.data)
            grads[key] = item
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(grads, directory)


def load_gradients(chunks, directory: str) -> dict[str, torch.Tensor]:
    """Gradients saved by :func:`save_gradients`, by parameter name (``chunk<i>.<name>``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = {id(p) for chunk in chunks for p in _unwrap(chunk).parameters()}
    sharded = {
        k: v
        for k, v in _sharded_state_dict(chunks).items()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and id(v.data) in params
    }
    for v in sharded.values():
        v.data = torch.empty_like(v.data, dtype=torch.float32)
    return dist_checkpointing.load(sharded, directory)


def fixed_tokens(preset: ModelPreset | str, num_sequences: int, seed: int = 0, skew: float = 0.0):
    """``num_sequences`` random sequences of ``seq_length + 1`` tokens, the same on every rank.

    ``skew`` > 0 draws tokens from a Zipf-like distribution (a few tokens dominate), which makes
    routing unbalanced.
    """
    preset = _preset(preset)
    g = torch.Generator().manual_seed(seed)
    shape = (num_sequences, preset.seq_length + 1)
    if skew <= 0:
        return torch.randint(0, preset.vocab_size, shape, generator=g)
    weights = 1.0 / torch.arange(1, preset.vocab_size + 1, dtype=torch.float64) ** skew
    return torch.multinomial(weights, shape[0] * shape[1], replacement=True, generator=g).view(shape)


def _microbatches(tokens: torch.Tensor, micro_batch_size: int):
    for start in range(0, tokens.shape[0], micro_batch_size):
        seq = tokens[start : start + micro_batch_size]
        inputs, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        yield {
            "tokens": inputs,
            "labels": labels,
            "position_ids": torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs).contiguous(),
            "loss_mask": torch.ones_like(labels, dtype=torch.float32),
        }


def _forward_step(data_iterator, model):
    """Megatron's ``forward_step_func`` contract over :func:`_microbatches`; like ``megatron-dsv3
    train``'s, a chunk reads a micro-batch only if its placement role needs one."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    placement = placement_of(get_model_config(model))
    if not placement.needs_batch(parallel_state.get_pipeline_model_parallel_rank(), vp_stage)[0]:
        return model(None, None, None), partial(loss_func, None)
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def data_parallel_slice(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch (contiguous blocks per data-parallel rank)."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = tokens.shape[0] // dp
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def train_step(chunks, config, tokens: torch.Tensor, micro_batch_size: int, optimizer=None) -> dict:
    """Forward and backward over this rank's share of ``tokens``; gradients end up finalized.

    Returns ``{"loss_sum", "tokens"}`` summed over this rank's micro-batches (zero off the last
    pipeline stage and on tensor-parallel ranks other than 0, so that summing over ranks counts each
    token once), plus the optimizer's outcome when one is given.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    local = data_parallel_slice(tokens)
    num_microbatches = local.shape[0] // micro_batch_size
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    iterators = [iter(list(_microbatches(local, micro_batch_size))) for _ in chunks]
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=local.shape[1] - 1,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    counted = (parallel_state.get_pipeline_model_parallel_rank() == placement_of(config).report_rank
               and parallel_state.get_tensor_model_parallel_rank() == 0)
    loss_sum = sum(float(r["lm loss"][0]) for r in reports) if counted else 0.0
    ntok = sum(float(r["lm loss"][1]) for r in reports) if counted else 0.0
    result = {"loss_sum": loss_sum, "tokens": ntok}
    if optimizer is not None:
        update_successful, grad_norm, _ = optimizer.step()
        result.update(update_successful=update_successful, grad_norm=grad_norm)
    return result


def build_optimizer(chunks, *, lr: float, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    bf16: bool = False):
    """Megatron's Adam optimizer over ``chunks`` (fp32 master weights when ``bf16``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, clip_grad=clip_grad,
        adam_beta1=0.9, adam_beta2=0.95, bf16=bf16, fp16=False,
    )
    return get_megatron_optimizer(config, chunks)


def mtp_loss_and_reset() -> float | None:
    """The MTP loss Megatron tracked since the last call (None when MTP is off)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("loss_values")
    if values is None:
        return None
    value = float(values[0])
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return value


def pipeline_forward(chunks, config, batch: dict) -> torch.Tensor | None:
    """One micro-batch's forward through every stage in model order, any placement; no schedule.

    Each rank runs the stages it holds, receiving a stage's input from the rank that ran the one
    before (point-to-point over the pipeline group) and sending its output on.  Returns the per-token
    loss on the rank that holds the loss (Megatron's output with labels), None elsewhere.  For
    checking a placement before any schedule runs it; TP = CP = 1.
    """
    from megatron.core import parallel_state

    stages = placement_of(config).stages
    rank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    tokens, labels = batch["tokens"], batch["labels"]
    shape = (tokens.shape[1], tokens.shape[0], config.hidden_size)
    hidden = loss = None
    for i, stage in enumerate(stages):
        previous = stages[i - 1] if i else None
        if stage.pp_rank != rank:
            if previous is not None and previous.pp_rank == rank:
                torch.distributed.send(hidden.contiguous(), ranks[stage.pp_rank])
            continue
        if previous is not None and previous.pp_rank != rank:
            hidden = torch.empty(shape, dtype=config.params_dtype)
            torch.distributed.recv(hidden, ranks[previous.pp_rank])
        model = _unwrap(chunks[stage.vp_stage])
        if i:
            model.set_input_tensor(hidden)
        out = model(tokens, batch["position_ids"], None, labels=labels if stage.loss else None,
                    loss_mask=batch["loss_mask"] if stage.loss else None)
        if stage.loss:
            loss = out
        hidden = out
    return loss
