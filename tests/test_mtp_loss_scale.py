"""The MTP loss's gradient keeps its weight against the main loss's under context parallelism.

Megatron-LM issue #3943 (open) reports that with CP > 1 Megatron-Core divides the MTP loss gradient
by CP, and PR #3959 (closed) proposed multiplying the MTP backward scale by CP as
``forward_step_calc_loss`` does for the MoE auxiliary loss (``pipeline_parallel/schedules.py``).
The MoE auxiliary loss needs that factor because it is computed over the whole sequence (statistics
reduced over the tensor- and context-parallel group), so a rank's backward reaches only its share of
it.  The MTP loss is not: ``process_mtp_loss`` divides each rank's masked MTP loss by that rank's own
token count, exactly as the main loss is divided by the rank's own count (the 3-tuple ``loss_func``
of ``megatron-dsv3 train`` and of Megatron-LM's ``pretrain_gpt.py``).  Both are per-rank means, both
backward with ``1 / num_microbatches``, and DDP averages both over the data- and context-parallel
ranks, so no factor is missing; multiplying by CP would double the MTP gradient at CP 2.

CP > 1 cannot run on CPU (it needs Transformer Engine's attention), so this is proven in one
process: each CP rank's share of the batch (Megatron's zig-zag split, with a fake CP group size) goes
through Megatron's own ``process_mtp_loss`` and ``forward_step_calc_loss`` (which sets
``MTPLossAutoScaler``'s scale from ``cp_group_size`` and the micro-batch count), the ranks'
gradients are summed and scaled as DDP does (``1 / (dp x cp)``), and the result is compared in
float64 with an independent reference: the mean over sequences of (main mean + weight x MTP mean),
differentiated by autograd.  The MTP projection ``P`` reaches only the MTP loss, so its gradient is
the MTP term's scale alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.train.steps import loss_func

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

V, D, S, G, WEIGHT = 13, 4, 32, 2, 0.3  # vocabulary, hidden, sequence, sequences per step, MTP weight


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (G, S), generator=g)
    labels = torch.randint(0, V, (G, S), generator=g)
    mask = torch.ones(G, S, dtype=torch.float64)
    # Masked at the first position of each of the 2 x cp chunks (cp <= 4): there a CP rank's MTP roll takes
    # its neighbour's value, which a one-process roll cannot; masked, both rolls agree exactly, and every
    # rank holds as many tokens as the others.
    mask[:, :: S // 8] = 0
    return tokens, labels, mask


def _params():
    g = torch.Generator().manual_seed(1)
    return {n: torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
            for n, shape in (("E", (V, D)), ("W", (V, D)), ("P", (D, D)))}


def _token_losses(logits, labels):  # logits [s, b, V], labels [b, s] -> [b, s]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")


def _reference_gradients():
    """mean over sequences of (main mean + WEIGHT x MTP mean), on whole sequences, by autograd."""
    tokens, labels, mask = _data()
    p = _params()
    h = p["E"][tokens]                                          # [b, s, d]
    main = F.cross_entropy((h @ p["W"].T).transpose(1, 2), labels, reduction="none")
    mtp_labels = torch.roll(labels, -1, dims=1)
    mtp_mask = torch.roll(mask, -1, dims=1)
    mtp_mask[:, -1] = 0
    mtp = F.cross_entropy((torch.tanh(h @ p["P"]) @ p["W"].T).transpose(1, 2), mtp_labels, reduction="none")
    per_sequence = (main * mask).sum(1) / mask.sum(1) + WEIGHT * (mtp * mtp_mask).sum(1) / mtp_mask.sum(1)
    per_sequence.mean().backward()
    return {n: t.grad for n, t in p.items()}


def _rank_share(batch: dict, cp: int, rank: int, monkeypatch) -> dict:
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp == 1:
        return batch
    with monkeypatch.context() as m:  # a CP group of `cp` ranks, this one `rank`
        m.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        m.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=object())


def _megatron_gradients(cp: int, monkeypatch, *, world: int = 2):
    """Gradients after a step of ``G`` sequences on ``world`` ranks with context parallelism ``cp``."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer.multi_token_prediction import process_mtp_loss

    tokens, labels, mask = _data()
    dp = world // cp
    microbatches = G // dp  # Megatron's: global batch / (micro-batch 1 x dp); CP 2 doubles it
    config = SimpleNamespace(mtp_num_layers=1, mtp_loss_scaling_factor=WEIGHT, mtp_detach_heads=False,
                             calculate_per_token_loss=False, num_moe_experts=None, timers=None,
                             grad_scale_func=None)
    p = _params()
    total = {n: torch.zeros_like(t) for n, t in p.items()}
    for dp_rank in range(dp):
        for cp_rank in range(cp):
            for mb in range(microbatches):
                seq = dp_rank * microbatches + mb
                batch = {"tokens": tokens[seq:seq + 1], "labels": labels[seq:seq + 1], "loss_mask": mask[seq:seq + 1]}
                share = _rank_share(batch, cp, cp_rank, monkeypatch)
                h = p["E"][share["tokens"]].transpose(0, 1)     # [s, b, d]
                hidden = torch.cat([h, torch.tanh(h @ p["P"])])  # the main and the MTP hidden states
                h = process_mtp_loss(
                    hidden, share["labels"], share["loss_mask"],
                    output_layer=lambda x, weight=None, runtime_gather_output=None: (x @ p["W"].T, None),
                    output_weight=None, runtime_gather_output=None, is_training=False,
                    compute_language_model_loss=lambda labels_, logits: _token_losses(logits, labels_), config=config,
                    cp_group=None)
                main = _token_losses(h @ p["W"].T, share["labels"])
                output, _ = forward_step_calc_loss(
                    SimpleNamespace(), main, lambda out: loss_func(share["loss_mask"], out), config, None, False,
                    microbatches, [], cp_group_size=cp, is_last_stage=True)
                grads = torch.autograd.grad(output, list(p.values()))
                for n, grad in zip(p, grads):
                    total[n] += grad
    return {n: t / (dp * cp) for n, t in total.items()}  # DDP: summed over dp x cp, scaled by 1 / (dp x cp)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_mtp_gradient_keeps_its_weight_under_context_parallelism(cp, monkeypatch):
    world = 4 if cp == 4 else 2
    ours, reference = _megatron_gradients(cp, monkeypatch, world=world), _reference_gradients()
    # P: the MTP term alone, float64 throughout.  E, W: both terms; the main term passes through
    # loss_func's fp32 cast (as in training), hence a float32 tolerance.
    torch.testing.assert_close(ours["P"], reference["P"], rtol=1e-12, atol=1e-14)
    for name in ("E", "W"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_cp_factor_proposed_upstream_would_double_the_mtp_gradient(monkeypatch):
    """The test above can fail: with PR #3959's change (the MTP scale times CP) P's gradient doubles at CP 2."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    original = MTPLossAutoScaler.set_loss_scale
    monkeypatch.setattr(MTPLossAutoScaler, "set_loss_scale", staticmethod(lambda scale: original(scale * 2)))
    ours, reference = _megatron_gradients(2, monkeypatch), _reference_gradients()
    torch.testing.assert_close(ours["P"], 2 * reference["P"], rtol=1e-12, atol=1e-14)
