"""Run-time changes of CPU mode (group ``cpu``): Megatron's collectives on the gloo backend.

Megatron-Core calls some collectives in forms NCCL accepts and gloo does not: split sizes given as
tensors, and all-gathers of differently sized pieces (expert tensor parallelism gathers each rank's
tokens, whose counts differ).  These changes give gloo the same calls in forms it takes, with
NCCL's results.  Applied with the rest of the group by
:func:`megatron_dsv3.runtime.cpu_mode.enable_cpu_mode`, never on a GPU run.
"""

from __future__ import annotations

import torch

from megatron_dsv3.runtime.registry import megatron_change, original, replace


@megatron_change(
    targets=["torch.distributed.all_to_all_single"],
    versions="megatron-core 0.19.x with torch <= 2.14 (gloo)",
    fixed_upstream_when="gloo's all_to_all_single accepts split sizes given as tensors",
)
def gloo_all_to_all_takes_split_lists():
    """Split sizes given to ``all_to_all_single`` as tensors become Python lists.

    Megatron's all-to-all token dispatcher passes the per-rank token counts of expert parallelism
    as tensors (NCCL accepts them); the gloo backend needs lists of ints.
    """
    all_to_all_single = original("torch.distributed.all_to_all_single")

    def all_to_all_single_with_lists(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    replace("torch.distributed.all_to_all_single", all_to_all_single_with_lists)


@megatron_change(
    targets=["torch.distributed.all_gather"],
    versions="megatron-core 0.19.x with torch <= 2.14 (gloo)",
    fixed_upstream_when="gloo's all_gather accepts output tensors of different sizes",
)
def gloo_all_gather_takes_uneven_sizes():
    """``all_gather`` into pieces of different sizes works on gloo as it does on NCCL.

    With expert tensor parallelism Megatron's dispatcher gathers every ETP rank's tokens with
    ``gather_from_sequence_parallel_region(..., output_split_sizes=...)``, an ``all_gather`` into a
    list of tensors whose first dimensions differ (the ranks' token counts).  NCCL takes that; gloo
    refuses it ("invalid tensor size").  Here every piece is padded along its first dimension to the
    largest, gathered, and the padding dropped: the same values in the same places.
    """
    all_gather = original("torch.distributed.all_gather")

    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or async_op or tensor.dim() == 0:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        if any(t.shape[1:] != tensor.shape[1:] for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)  # gloo's own error
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(gathered, padded, group=group)
        for out, piece in zip(tensor_list, gathered):
            out.copy_(piece[: out.shape[0]])
        return None

    replace("torch.distributed.all_gather", all_gather_uneven)
