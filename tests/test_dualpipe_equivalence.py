"""DualPipe and DualPipeV train exactly what one process trains.

Each layout runs one training step through the DualPipe runner (Megatron's forward and backward
steps, DDP, ``finalize_model_grads``) over the same global batch from the same weights as the
single-process run; every gradient is resharded to a full tensor and compared with the
single-process one in fp32, and so is the expert-bias update.  DeepSeek's reference checks its own
schedules the same way (``torch.equal`` on the loss, gradients to a cosine difference below 1e-13 in
fp64; ``deepseek-ai/DualPipe``, ``examples/example_dualpipe.py``).  The options (zero-bubble split,
forward/backward overlap) are also compared with each other: they change when the work runs, not what
it computes.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.model.presets import get_preset
from megatron_dsv3.parallel import ParallelLayout as L
from megatron_dsv3.testing.equivalence import compare_layouts

# Eight decoder layers, so that every V and mirror placement up to 8 stages splits them evenly.
PRESET = get_preset("dsv3-tiny").with_overrides(num_layers=8)

LAYOUTS = {
    "dualpipev_pp2": L(pp=2, schedule="dualpipev"),
    "dualpipev_pp2_no_zero_bubble": L(pp=2, schedule="dualpipev", zero_bubble=False),
    "dualpipe_pp4": L(pp=4, schedule="dualpipe"),  # mirrors, and the two middle ranks turning round
    # EP = 2 inside the pipeline: the forward/backward pairs overlap (the default with EP) or not.
    "dualpipev_pp2_ep2_overlap": L(pp=2, ep=2, dp=2, schedule="dualpipev"),
    "dualpipev_pp2_ep2": L(pp=2, ep=2, dp=2, schedule="dualpipev", fb_overlap=False),
}
PAIRS = (("dualpipev_pp2", "dualpipev_pp2_no_zero_bubble"), ("dualpipev_pp2_ep2_overlap", "dualpipev_pp2_ep2"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # 8 sequences, one per micro-batch: 8 micro-batches per step (4 per data-parallel rank with EP).
    return compare_layouts(str(tmp_path_factory.mktemp("dualpipe")), LAYOUTS, preset=PRESET, global_batch=8,
                           micro_batch_size=1, pairs=PAIRS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_schedule_matches_the_single_process_loss_and_gradients(report, name):
    r = report[name]
    assert r["num_grads"] == r["num_params"]  # every parameter, experts, MTP and the mirrored copies' sums included
    assert r["loss_rel_err"] < 1e-6, r
    assert r["max_grad_rel_err"] < 1e-5, (r["worst_param"], r["max_grad_rel_err"])
    assert r["expert_bias_moved"] > 0 and r["expert_bias_max_abs_err"] == 0.0


@pytest.mark.parametrize("pair", PAIRS, ids=["zero_bubble", "fb_overlap"])
def test_schedule_options_change_when_work_runs_not_what_it_computes(report, pair):
    r = report[f"{pair[0]}~{pair[1]}"]
    assert r["losses"][0] == r["losses"][1]  # bit for bit
    assert r["max_grad_rel_err"] < 1e-6, (r["worst_param"], r["max_grad_rel_err"])


@pytest.mark.slow
@pytest.mark.parametrize("global_batch", [8, 9, 10])
def test_more_ranks_and_batch_sizes(tmp_path, global_batch):
    """DualPipeV on 4 ranks and DualPipe on 2 at M = 8, 10 and (DualPipeV only: DualPipe needs an
    even M) 9.  Run with ``pytest -m slow`` (about 2 minutes each)."""
    layouts = {"dualpipev_pp4": L(pp=4, schedule="dualpipev"), "dualpipev_pp2": L(pp=2, schedule="dualpipev")}
    if global_batch % 2 == 0:
        layouts["dualpipe_pp2"] = L(pp=2, schedule="dualpipe")
    report = compare_layouts(str(tmp_path), layouts, preset=PRESET, global_batch=global_batch, micro_batch_size=1)
    for name in layouts:
        r = report[name]
        assert r["loss_rel_err"] < 1e-6 and r["max_grad_rel_err"] < 1e-5, (name, r["worst_param"])
        assert r["expert_bias_max_abs_err"] == 0.0


def _two_steps(workdir, name, layout, preset, tokens, extra_args, reference):
    """Two steps from the same weights (no optimizer step; the expert bias moves after each).

    Megatron DDP only overlaps the reduction from the second step on: the first records how often
    each parameter's grad-ready hook fires (``golden_per_param_grad_ready_counts``) and reduces in
    ``finalize_model_grads``.  Returns, per step, whether each bucket group's reduction was already
    issued by the hooks when ``finalize_model_grads`` began."""
    import os

    from megatron_dsv3.pipeline import mirrors
    from megatron_dsv3.testing import parallel

    parallel.init_parallel(layout, preset=preset)
    _, _, chunks = parallel.build_chunks(preset, layout, extra_args=extra_args)
    mirror_groups = [mirrors.mirror_group(g) for c in chunks for g in c.bucket_groups + c.expert_parallel_bucket_groups]
    weights = os.path.join(workdir, "weights")
    parallel.save_weights(chunks, weights) if reference else parallel.load_weights(chunks, weights)
    config = chunks[0].config
    finalize, issued = config.finalize_model_grads_func, []

    def finalize_and_record(*args, **kwargs):
        groups = [g for c in chunks for g in c.bucket_groups + c.expert_parallel_bucket_groups]
        issued.append([g.grad_reduce_handle is not None for g in groups])
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = finalize_and_record
    for _ in range(2):
        step = parallel.train_step(chunks, config, tokens, micro_batch_size=1)
    parallel.save_gradients(chunks, os.path.join(workdir, f"grads-{name}"))
    parallel.save_weights(chunks, os.path.join(workdir, f"after-{name}"))
    return {**step, "issued": issued, "overlap_grad_reduce": chunks[0].ddp_config.overlap_grad_reduce,
            "mirror_group_sizes": [None if g is None else g.size() for g in mirror_groups]}


@pytest.mark.slow
def test_overlapped_grad_reduce_with_the_zero_bubble_split_and_data_parallelism(tmp_path):
    """``--overlap-grad-reduce`` with the B/W split and DP 2 (pp 2 x dp 2, 4 processes), DualPipeV and
    DualPipe: the second step's reductions all start from DDP's grad-ready hooks inside the schedule
    (each chunk's ``no_sync`` ends at its last backward; a deferred weight counts as ready at its
    ``W``), and its loss and gradients equal the single-process run's second step.  Before, DDP's
    hook asserted at the first deferring ``B`` and ``pipeline/constraints.py`` refused the pair.
    DualPipe's buckets reduce over the two copies and their data-parallel ranks (2 x DP = 4 ranks;
    with EP 2 its experts' over 2 x expert-DP = 2: the mirror sum inside the reduction, started by the
    same hooks; before, a separate exchange after ``finalize_model_grads``); with EP 2 the F&B
    overlap runs too.  Run with ``pytest -m slow`` (about 5 to 10 minutes on 2 busy cores)."""
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.testing.distributed import run_distributed
    from megatron_dsv3.testing.equivalence import _compare

    extra = ("--overlap-grad-reduce",)
    layouts = {"dualpipev_pp2_dp2": L(pp=2, dp=2, schedule="dualpipev", zero_bubble=True),
               "dualpipe_pp2_dp2": L(pp=2, dp=2, schedule="dualpipe", zero_bubble=True),
               # EP 2: the experts' buckets reduce over their own groups, and the F&B overlap is on too.
               "dualpipe_pp2_dp2_ep2": L(pp=2, dp=2, ep=2, schedule="dualpipe", zero_bubble=True)}
    mirror_sizes = {"dualpipev_pp2_dp2": {None}, "dualpipe_pp2_dp2": {4}, "dualpipe_pp2_dp2_ep2": {4, 2}}
    tokens = parallel.fixed_tokens(PRESET, 8, seed=0)  # 4 micro-batches per data-parallel rank
    ref = run_distributed(_two_steps, 1, str(tmp_path), "reference", L(), PRESET, tokens, extra, True)[0]
    losses = {}
    for name, layout in layouts.items():
        steps = run_distributed(_two_steps, layout.world_size, str(tmp_path), name, layout, PRESET, tokens,
                                extra, False)
        assert all(s["overlap_grad_reduce"] for s in steps)
        assert all(not any(s["issued"][0]) and all(s["issued"][1]) for s in steps), [s["issued"] for s in steps]
        sizes = {size for s in steps for size in s["mirror_group_sizes"]}
        assert sizes == mirror_sizes[name], (name, sizes)  # 2 x DP, and 2 x expert-DP (1 with EP 2)
        losses[name] = sum(s["loss_sum"] for s in steps) / sum(s["tokens"] for s in steps)
    report = run_distributed(_compare, 1, str(tmp_path), list(layouts), PRESET, extra)[0]
    ref_loss = ref["loss_sum"] / ref["tokens"]
    for name in layouts:
        r = report[name]
        assert r["num_grads"] == r["num_params"]
        assert abs(losses[name] - ref_loss) / abs(ref_loss) < 1e-6, (name, losses[name], ref_loss)
        assert r["max_grad_rel_err"] < 1e-5, (name, r["worst_param"], r["max_grad_rel_err"])
        assert r["expert_bias_moved"] > 0 and r["expert_bias_max_abs_err"] == 0.0, name
        print(name, "loss", losses[name], "reference", ref_loss, "max grad rel err", r["max_grad_rel_err"],
              r["worst_param"])


def _grads(chunks) -> dict:
    return {n: p.main_grad.clone() for c in chunks for n, p in c.named_parameters() if p.requires_grad}


def test_overlapped_step_runs_dispatch_and_combine_on_megatrons_comm_stream(megatron_single_process, monkeypatch):
    overlapped_step_uses_megatrons_comm_stream(monkeypatch, cpu=True)


def overlapped_step_uses_megatrons_comm_stream(monkeypatch, *, cpu: bool):
    """The overlapped step (what the runner runs for every F, B and F&B with overlap on) sets up
    Megatron's communication stream first, as Megatron's own overlapped schedules do
    (``set_streams``): every MoE dispatch and combine runs on it, and a forward then backward
    through it gives the gradients of Megatron's plain ``forward_step``/``backward_step``.  Without
    ``set_streams`` the nodes get no stream: on a GPU they run on the compute stream and the
    backward's ``record_stream(None)`` raises, and CPU mode's stand-ins do both.  One process, so
    EP = 1, where the dispatch is an identity and Megatron's freeing of a node's input after its
    forward would free the output too (why the overlap is refused without EP): freeing is off.
    ``cpu=False`` runs it on a GPU's real streams (``tests/test_gpu.py``, ``benchmarks/gpu_proof.py``)."""
    from types import SimpleNamespace

    import megatron.core.pipeline_parallel.utils as pipeline_utils
    from megatron.core.models.common.utils import TransformerLayerNode
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_dsv3.pipeline.overlap import combined_step
    from megatron_dsv3.testing import parallel

    monkeypatch.setattr(pipeline_utils, "_COMM_STREAM", None)  # as in a new process
    monkeypatch.setattr(TransformerLayerNode, "_resolve_free_input", staticmethod(lambda *args: False))
    config, _, chunks = parallel.build_chunks(PRESET.with_overrides(num_layers=2), L(), cpu=cpu)
    tokens = parallel.fixed_tokens(PRESET, 1, seed=4)
    if not cpu:
        tokens = tokens.cuda()
    streams = []
    for name in ("dispatch", "combine"):
        method = getattr(MoELayer, name)
        monkeypatch.setattr(MoELayer, name, lambda self, *a, _m=method, **k: (
            streams.append(torch.cuda.current_stream()), _m(self, *a, **k))[1])

    step = SimpleNamespace(  # the parts of a RankStep the overlapped step reads
        vp=lambda c: 0, model=chunks, config=config,
        forward_step_func=parallel._forward_step, iterators=[iter(parallel._microbatches(tokens, 1))],
        num_microbatches=1, first_microbatch=lambda c: True, global_mb=lambda c, m: m,
    )
    output = combined_step(step, (0, 0, None), None)[0]
    combined_step(step, None, (0, None, output, None))
    overlapped = _grads(chunks)
    assert pipeline_utils.get_comm_stream() is not None
    assert streams and all(s == pipeline_utils.get_comm_stream() for s in streams), streams
    n = len(streams)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    output, _ = forward_step(parallel._forward_step, iter(parallel._microbatches(tokens, 1)), chunks[0], 1, None,
                             [], config, 1, is_first_microbatch=True, current_microbatch=0)
    backward_step(None, output, None, config)
    plain = _grads(chunks)
    assert len(streams) == 2 * n and all(s == torch.cuda.default_stream() for s in streams[n:])
    worst = max(float((overlapped[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in plain.items())
    assert worst < 1e-6
