"""Copies of weights a DeepSeek placement keeps, and how they stay equal.

* **Embedding copies on one rank.** Under DualPipeV rank 0 holds the embedding (stage 0) and MTP's
  copy of it (the last stage; and the output head's, when it is tied).  Megatron keeps such copies
  on different ranks and all-reduces their gradients over its embedding group; here they live in
  two chunks of one rank, so the sum is local.
* **DualPipe's mirrored stages.** Rank r holds stage r for the micro-batches entering at rank 0 and
  a copy of stage P-1-r for those entering at rank P-1 (arXiv 2412.19437v2, section 3.2.1).  The
  copies start equal (the copy receives the original's weights when the model is built), their
  gradients are summed inside DDP's data-parallel reduction (:mod:`megatron_dsv3.pipeline.mirrors`),
  and their experts' token counts between ranks r and P-1-r before Megatron updates the expert
  biases; the optimizer then moves both alike.  A checkpoint stores one copy: the copy's tensors
  are marked as replicas, and its parameters as shared, so that they are counted once in the
  gradient norm.

The embedding copies are summed after Megatron's ``finalize_model_grads``, as Megatron sums its own
(each copy's buffer then holds the reduced gradient where this rank's optimizer reads it).
"""

from __future__ import annotations

import torch

from megatron_dsv3.model.build import embedding_copies


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _grad(param):
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def sum_local_embedding_copies(step) -> None:
    copies = embedding_copies(step.model)
    grads = [_grad(p) for p in copies if _grad(p) is not None]
    if len(grads) < 2:
        return
    total = torch.stack(grads).sum(dim=0)
    for grad in grads:
        grad.copy_(total)


def _mirror_partner(step) -> int | None:
    return step.placement.pp - 1 - step.rank if step.placement.schedule == "dualpipe" else None


def _add_partners(step, originals: list[torch.Tensor], mirrors: list[torch.Tensor]) -> None:
    """``originals[i] += partner's mirrors[i]`` and ``mirrors[j] += partner's originals[j]``.

    Rank r's chunk 0 (stage r) and rank P-1-r's chunk 1 are copies of one stage, and the other way
    round, so both ranks send their originals then their mirrors and receive the partner's in the
    same order (one batch, matched in order on both sides).
    """
    partner = step.global_ranks[_mirror_partner(step)]
    from_originals = [torch.empty_like(t) for t in mirrors]
    from_mirrors = [torch.empty_like(t) for t in originals]
    ops = [torch.distributed.P2POp(torch.distributed.isend, t.contiguous(), partner, step.group)
           for t in originals + mirrors]
    ops += [torch.distributed.P2POp(torch.distributed.irecv, t, partner, step.group)
            for t in from_originals + from_mirrors]
    for request in torch.distributed.batch_isend_irecv(ops):
        request.wait()
    for grad, received in zip(mirrors, from_originals):
        grad.add_(received)
    for grad, received in zip(originals, from_mirrors):
        grad.add_(received)


def _original_and_mirror(step):
    row = step.placement.rows[step.rank]
    original = next(c for c in row if not c.mirror).vp_stage
    return _unwrap(step.model[original]), _unwrap(step.model[1 - original])


def sum_mirrored_token_counts(step) -> None:
    """Experts' token counts of both copies of a stage, summed before Megatron moves the expert biases."""
    if _mirror_partner(step) is None:
        return
    original, mirror = _original_and_mirror(step)
    counts = lambda m: [x.local_tokens_per_expert for x in m.modules() if hasattr(x, "local_tokens_per_expert")]  # noqa: E731
    _add_partners(step, counts(original), counts(mirror))
