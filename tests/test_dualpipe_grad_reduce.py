"""DualPipe(V)'s data-parallel gradient reduction: Megatron DDP with the zero-bubble split.

One process, Megatron's own ``DistributedDataParallel`` around a linear whose weight gradient the
split defers (:mod:`megatron_dsv3.model.wgrad`) and a parameter it does not defer.  The multi-process
proofs (pp 2 x dp 2, loss and gradients against one process) are in
``tests/test_dualpipe_equivalence.py`` (slow).
"""

from __future__ import annotations

import torch


def _ddp_with_a_deferrable_linear():
    """A DDP-wrapped module ``y = (x W^T) * s`` (``W`` deferrable, ``s`` not) with ``--overlap-grad-reduce``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv3.model.wgrad import DeferrableColumnParallelLinear

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = DeferrableColumnParallelLinear(8, 4, config=config, init_method=torch.nn.init.normal_,
                                                         bias=False, gather_output=True)
            self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4))

        def forward(self, x):
            return self.linear(x)[0] * self.scale

    torch.manual_seed(0)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=None)
    return DistributedDataParallel(config, ddp_config, Module())


def _expected(module, x):
    weight, scale = module.linear.weight.detach().double(), module.scale.detach().double()
    h = x.double() @ weight.t()
    dy = torch.ones(x.shape[0], 4, dtype=torch.float64)
    return (dy * scale).t() @ x.double(), (dy * h).sum(0)


def test_ddp_counts_a_deferred_weight_as_ready_at_its_w_and_its_bucket_starts_reducing_there(
        megatron_single_process):
    """With ``--overlap-grad-reduce``, a deferring ``B`` leaves the weight's gradient to its ``W``:
    DDP's grad-ready hook does not count the weight at the ``B`` (Megatron's hook asserted there:
    ``param.grad`` None), counts it when the ``W`` gives it its gradient, and from the second step on
    (Megatron records the counts in the first) the bucket's reduction starts at that ``W``, inside
    the schedule.  ``main_grad`` then holds the float64 reference gradient of both parameters."""
    from megatron_dsv3.model.wgrad import WGRAD

    ddp = _ddp_with_a_deferrable_linear()
    (group,) = ddp.bucket_groups
    weight, scale = ddp.module.linear.weight, ddp.module.scale
    x = torch.randn(5, 8)
    for step in range(2):
        ddp.zero_grad_buffer()
        WGRAD.clear()
        with WGRAD.defer():
            ddp(x).sum().backward()
        assert weight not in group.per_param_grad_ready_counts, step  # withheld at its B
        assert group.per_param_grad_ready_counts.get(scale) == 1, step  # not deferred: ready at the B
        assert group.grad_reduce_handle is None, step
        WGRAD.pop()  # the W
        assert group.per_param_grad_ready_counts.get(weight) == 1, step
        assert (group.grad_reduce_handle is not None) == (step == 1), step  # started by the hook at the W
        ddp.finish_grad_sync()
        want_w, want_s = _expected(ddp.module, x)
        torch.testing.assert_close(weight.main_grad.double(), want_w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scale.main_grad.double(), want_s, rtol=1e-6, atol=1e-6)


def _steps_with_the_optimizer(layout, preset, tokens, steps: int, clip_grad: float) -> dict:
    """``steps`` DualPipe training steps with Megatron's Adam, gradient clipping and the expert-bias
    update; after each, this rank's parameters and buffers next to its mirror partner's."""
    from megatron.core import parallel_state

    from megatron_dsv3.pipeline import mirrors
    from megatron_dsv3.testing import parallel

    parallel.init_parallel(layout, preset=preset)
    config, _, chunks = parallel.build_chunks(preset, layout, extra_args=("--overlap-grad-reduce",))
    optimizer = parallel.build_optimizer(chunks, lr=1e-2, clip_grad=clip_grad)
    groups = [g for c in chunks for g in c.bucket_groups + c.expert_parallel_bucket_groups]
    sizes = [torch.distributed.get_world_size(mirrors.mirror_group(g)) for g in groups]
    ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    partner = ranks[len(ranks) - 1 - parallel_state.get_pipeline_model_parallel_rank()]
    records = []
    for _ in range(steps):
        step = parallel.train_step(chunks, config, tokens, micro_batch_size=1, optimizer=optimizer)
        state = [{**{n: p.detach().clone() for n, p in c.module.named_parameters()},
                  **{n: b.clone() for n, b in c.module.named_buffers() if n.endswith("expert_bias")}} for c in chunks]
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, state)
        theirs = everyone[partner]
        differing = [f"chunk{i}.{n}" for i, mine in enumerate(state) for n, t in mine.items()
                     if not torch.equal(t, theirs[i][n])]
        moved = max(float(t.abs().max()) for s in state for n, t in s.items() if n.endswith("expert_bias"))
        records.append({**step, "grad_norm": float(step["grad_norm"]), "differing": differing,
                        "compared": sum(len(s) for s in state), "expert_bias_moved": moved})
    return {"mirror_group_sizes": sizes, "steps": records}


def test_dualpipe_copies_stay_bit_identical_through_optimizer_steps_clipping_and_bias_updates(tmp_path):
    """DualPipe on 2 ranks (each holds a stage and the other rank's stage's copy), ``--overlap-grad-reduce``
    and the B/W split, three steps of Megatron's Adam with gradient clipping active (clip 0.05) and
    the expert-bias update: every bucket reduces over the copies and their data-parallel ranks
    (2 x DP = 2 ranks), and after every step each parameter and expert bias equals its copy's bit for
    bit.  Before, the copies' gradients were exchanged after ``finalize_model_grads``."""
    from megatron_dsv3.model.presets import get_preset
    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.distributed import run_distributed

    preset = get_preset("dsv3-tiny").with_overrides(num_layers=4)
    layout = ParallelLayout(pp=2, schedule="dualpipe")
    tokens = parallel.fixed_tokens(preset, 4, seed=3)
    results = run_distributed(_steps_with_the_optimizer, 2, layout, preset, tokens, 3, 0.05)
    for rank, result in enumerate(results):
        assert result["mirror_group_sizes"] and set(result["mirror_group_sizes"]) == {2}, result["mirror_group_sizes"]
        for i, step in enumerate(result["steps"]):
            assert step["update_successful"] and step["grad_norm"] > 0.05, (rank, i, step["grad_norm"])  # clipped
            assert step["compared"] > 50 and not step["differing"], (rank, i, step["differing"][:5])
        assert result["steps"][-1]["expert_bias_moved"] > 0
