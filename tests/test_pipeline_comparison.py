"""DualPipe against Megatron's own answer, in the simulator: 1F1B with the expert all-to-all overlapped
(``combined_1f1b``), and the data-parallel gradient reduction (DualPipe's with its mirror sum)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_dsv3.pipeline.costs import Machine, ReductionCosts, reduction_costs
from megatron_dsv3.pipeline.dp_reduction import chunk_ms, step_with_reduction
from megatron_dsv3.pipeline.in_flight import forward_order, microbatch_group
from megatron_dsv3.pipeline.simulator import Costs, simulate

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 10), (8, 16), (16, 120)])
def test_ep_overlapped_1f1b_runs_megatrons_order_with_its_warmup_and_pairs(pp, m):
    """Each rank's order is Megatron's combined 1F1B (``get_pp_rank_microbatches`` with
    ``overlap_moe_expert_parallel_comm``, ``get_schedule_table``, two virtual stages): its warm-up
    forwards, then one overlapped forward-and-backward pair per remaining micro-batch, then the
    cool-down backwards, with micro-batch groups Megatron accepts for the sizes."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    group = microbatch_group(pp, m)
    assert group >= pp and (m % group == 0 or m % group >= pp)
    timeline = simulate("combined_1f1b", pp, m, Costs(FB=2.5))
    assert timeline.group == group
    for rank, row in enumerate(timeline.ranks):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
                               virtual_pipeline_model_parallel_size=2)
        total, _, warmup, remaining = get_pp_rank_microbatches(m, 2, group, overlap_moe_expert_parallel_comm=True,
                                                               p2p_communicator=comm)
        kinds = [i.kind for i in row]
        assert kinds == ["F"] * warmup + ["FB"] * remaining + ["B"] * warmup, rank
        forwards = [int(i.op[1]) for i in row if i.kind in ("F", "FB")]
        assert forwards == [c for _, c in get_schedule_table(m, 2, group)] == forward_order(m, 2, group)


def test_ep_overlap_gains_only_what_the_pairs_hide():
    """With pairs costing F + B (nothing hidden) the EP-overlapped order is no faster than interleaved
    1F1B; hiding the all-to-all makes it faster."""
    plain, hidden = Costs(F=1.0, B=2.0, W=1.0), Costs(F=1.0, B=2.0, W=1.0, FB=2.2)
    assert simulate("combined_1f1b", 4, 8, plain).step_time >= simulate("interleaved", 4, 8, plain).step_time
    assert simulate("combined_1f1b", 4, 8, hidden).step_time < simulate("interleaved", 4, 8, hidden).step_time


def _reduction(**overrides) -> ReductionCosts:
    fields = dict(dense_bytes=4e9, expert_bytes=1e9, dp=4, expert_dp=2, gbs=50.0, distributed_optimizer=True)
    return ReductionCosts(**{**fields, **overrides})


def test_reduction_is_a_ring_over_the_data_parallel_ranks_and_dualpipes_over_both_copies():
    """Ring collectives at ``gbs``: a reduce-scatter moves (n-1)/n of the bytes, an all-reduce twice that;
    DualPipe all-reduces over its two copies and their data-parallel ranks (2 x DP, 2 x expert DP)."""
    r = _reduction()
    ms = lambda nbytes, n, factor: factor * (n - 1) / n * nbytes / 50e6  # noqa: E731
    assert r.share_ms("1f1b") == pytest.approx(ms(4e9, 4, 1) + ms(1e9, 2, 1))
    assert _reduction(distributed_optimizer=False).share_ms("1f1b") == pytest.approx(ms(4e9, 4, 2) + ms(1e9, 2, 2))
    assert r.share_ms("dualpipe") == pytest.approx(ms(4e9, 8, 2) + ms(1e9, 4, 2))


@pytest.mark.parametrize("schedule", ["1f1b", "combined_1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_reduction_after_the_step_adds_every_chunk_and_overlapping_it_never_costs_more(schedule):
    timeline = simulate(schedule, 4, 8, Costs(FB=2.5))
    r = _reduction()
    chunks = 2 if schedule in ("combined_1f1b", "dualpipe", "dualpipev") else 1
    after = step_with_reduction(timeline, r, overlap=False)
    assert after == pytest.approx(timeline.step_time + chunks * chunk_ms(timeline, r))
    overlapped = step_with_reduction(timeline, r, overlap=True)
    assert timeline.step_time < overlapped <= after


def test_an_overlapped_reduction_starts_when_its_chunks_last_gradient_is_computed():
    """DualPipeV pp 2: rank 1's first chunk (stage 1) gets its last gradient well before the step ends,
    so a short reduction of it is hidden; the last chunk's reduction is not."""
    timeline = simulate("dualpipev", 2, 4, Costs(FB=2.5))
    tiny = _reduction(dense_bytes=1e3, expert_bytes=0.0)
    each = chunk_ms(timeline, tiny)
    assert step_with_reduction(timeline, tiny, overlap=True) == pytest.approx(timeline.step_time + each)


def test_reduction_costs_of_the_671b_model_count_its_parameters_once_per_rank_share():
    from megatron_dsv3.model.accounting import count
    from megatron_dsv3.model.presets import get_preset

    preset = get_preset("deepseek-v3")
    r = reduction_costs(preset, pp=16, ep=64, etp=1, dp=128, expert_dp=2, distributed_optimizer=True,
                        machine=Machine(tflops=400.0))
    counts = count(preset)
    total = (r.dense_bytes * 16 + r.expert_bytes * 16 * 64) / 4
    assert total == pytest.approx(counts.total_params + counts.mtp_params, rel=1e-9)
    assert r.expert_bytes * 16 * 64 / 4 > 0.9 * total  # routed experts are most of the model


def test_pipeline_benchmark_compares_dualpipe_with_1f1b_its_ep_overlapped_form_and_zb1p():
    result = subprocess.run([sys.executable, "benchmarks/pipeline.py", "--skip-measured"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ("1F1B ", "1F1B with EP overlap", "ZB1P (ZB-H1)", "DualPipe ", "DualPipeV"):
        assert row in out, row
    assert "DualPipe throughput against (reduction after / overlapped): 1F1B " in out
    assert "1F1B with EP overlap " in out.split("DualPipe throughput against")[1]
