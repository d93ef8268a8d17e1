"""DualPipe and DualPipeV without a model: the engine's per-rank programs against DeepSeek's reference,
the rules a configuration must meet, the simulator against the paper's bubble formulas, and the
``megatron-dsv3 schedule`` command.

``tests/data/dualpipe_reference_orders.json`` holds what DeepSeek's reference (deepseek-ai/DualPipe,
commit 3da1bbe) does on each rank, recorded by running its ``step()`` with compute and
communication replaced by recorders; its ``_provenance`` says how.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.schedule_rules import check_microbatches
from megatron_dsv3.pipeline.constraints import decide_options, resolve_options
from megatron_dsv3.pipeline.engine import global_microbatch, rank_ops, rank_program
from megatron_dsv3.pipeline.in_flight import deepseek_in_flight
from megatron_dsv3.pipeline.simulator import Costs, simulate

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

REFERENCE = json.loads((Path(__file__).parent / "data" / "dualpipe_reference_orders.json").read_text())


def _case(name: str) -> tuple[str, int, int]:
    schedule, p, m = re.fullmatch(r"(\w+) P=(\d+) M=(\d+)", name).groups()
    return schedule, int(p), int(m)


def _action(a) -> str:
    return str(a.op) if a.kind == "op" else f"{a.kind}{a.chunk}"


@pytest.mark.parametrize("name", sorted(REFERENCE["orders"]))
def test_engine_runs_each_ranks_operations_in_the_references_order(name):
    schedule, pp, m = _case(name)
    assert [[str(op) for op in rank_ops(schedule, pp, m, r)] for r in range(pp)] == REFERENCE["orders"][name]


@pytest.mark.parametrize("name", sorted(REFERENCE["programs"]))
def test_engine_sends_and_receives_where_the_reference_does(name):
    schedule, pp, m = _case(name)
    assert [[_action(a) for a in rank_program(schedule, pp, m, r)] for r in range(pp)] == REFERENCE["programs"][name]


@pytest.mark.parametrize("schedule,pp,m", [("dualpipev", 3, 7), ("dualpipev", 6, 13), ("dualpipe", 6, 12),
                                           ("dualpipe", 10, 24)])
def test_every_micro_batch_runs_forward_backward_and_weight_gradient_once_per_chunk(schedule, pp, m):
    """Sizes the reference recording does not cover: each chunk's micro-batches go forward, back and
    through their weight gradient exactly once, the weight gradient after its backward."""
    per_chunk = m // 2 if schedule == "dualpipe" else m
    for r in range(pp):
        ops = rank_ops(schedule, pp, m, r)
        forwards = Counter(op.forward for op in ops if op.forward)
        backwards = Counter(op.backward for op in ops if op.backward)
        expected = {(c, i): 1 for c in (0, 1) for i in range(per_chunk)}
        assert forwards == expected and backwards == expected
        split = [(op.chunk, op.mb) for op in ops if op.kind == "B" and op.zb]
        weights = [(op.chunk, op.mb) for op in ops if op.kind == "W"]
        assert sorted(split) == sorted(weights)
        position = {str(op): i for i, op in enumerate(ops)}
        for c, i in weights:
            assert position[f"B{c}.{i}z"] < position[f"W{c}.{i}"]


def test_dualpipe_directions_take_the_two_halves_of_the_batch():
    assert [global_microbatch("dualpipe", c, i, 8) for c in (0, 1) for i in range(4)] == list(range(8))
    assert [global_microbatch("dualpipev", 1, i, 8) for i in range(8)] == list(range(8))


@pytest.mark.parametrize("schedule,pp,m,words", [
    ("dualpipe", 3, 12, ["even number of pipeline ranks", "dualpipev"]),
    ("dualpipev", 1, 4, ["at least 2 pipeline ranks"]),
    ("dualpipev", 4, 7, ["at least 2 x pp = 8 micro-batches", "got 7"]),
    ("dualpipe", 4, 9, ["even number of at least 2 x pp = 8", "got 9"]),
])
def test_sizes_the_reference_refuses_are_errors_that_say_the_fix(schedule, pp, m, words):
    with pytest.raises(ConfigError) as err:
        check_microbatches(schedule, pp, m)
    assert all(w in str(err.value) for w in words) and "Fix:" in str(err.value)


def _options(**overrides):
    args = dict(ep=2, backend="local", zero_bubble=None, fb_overlap=None, recompute_granularity=None,
                recompute_modules=None, mtp_num_layers=1)
    args.update(overrides)
    return resolve_options("dualpipev", **args)


def test_options_default_to_zero_bubble_on_local_and_overlap_with_expert_parallelism():
    assert (_options().zero_bubble, _options().fb_overlap) == (True, True)
    assert _options(ep=1).fb_overlap is False
    assert _options(backend="transformer_engine").zero_bubble is False


@pytest.mark.parametrize("overrides,words", [
    (dict(backend="transformer_engine", zero_bubble=True, fb_overlap=True),
     ["no zero-bubble split on Transformer Engine", "--no-dualpipe-fb-overlap"]),
    (dict(ep=1, fb_overlap=True), ["expert parallelism (ep > 1)", "--no-dualpipe-fb-overlap"]),
    (dict(fb_overlap=True, recompute_granularity="full"), ["no full or `moe` recompute"]),
    (dict(fb_overlap=True, recompute_granularity="selective", recompute_modules=["moe"]), ["`moe` recompute"]),
    (dict(fb_overlap=True, mtp_num_layers=2), ["at most one MTP layer (got 2)"]),
])
def test_option_combinations_that_cannot_run_are_refused_with_the_fix(overrides, words):
    with pytest.raises(ConfigError) as err:
        _options(**overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


# Each requirement an option has, as the settings that break it (issue 13, item 3).
UNMET = [
    ("fb_overlap", dict(ep=1), "expert parallelism (ep > 1)"),
    ("fb_overlap", dict(recompute_granularity="full"), "no full or `moe` recompute (here full)"),
    ("fb_overlap", dict(recompute_granularity="selective", recompute_modules=["layernorm", "moe"]),
     "no full or `moe` recompute (here `moe`)"),
    ("fb_overlap", dict(mtp_num_layers=2), "at most one MTP layer (got 2)"),
]


@pytest.mark.parametrize("option,breaks,needs", UNMET, ids=[n for _, _, n in UNMET])
def test_a_default_passes_the_checks_an_explicit_value_does_and_resolves_off_naming_the_requirement(
        option, breaks, needs):
    """Left unset, ``fb_overlap`` used to become ``ep > 1`` unchecked: with EP 64 and a ``moe``
    recompute (the 671B H800 recipe) it resolved on and the overlapped step silently skipped the
    recompute.  Now the default meets the same requirements as ``true``: ``true`` is refused, the
    default resolves off and says which requirement failed."""
    with pytest.raises(ConfigError) as err:
        _options(**{option: True}, **breaks)
    assert needs in str(err.value)
    resolved = decide_options("dualpipev", **{**dict(ep=2, backend="local", zero_bubble=None, fb_overlap=None,
                                                     recompute_granularity=None, recompute_modules=None,
                                                     mtp_num_layers=1), **breaks})
    assert getattr(resolved.options, option) is False
    assert resolved.why[option] == f"off (default: needs {needs})"
    other = "fb_overlap" if option == "zero_bubble" else "zero_bubble"
    assert getattr(resolved.options, other) is True and resolved.why[other] == "on (default)"


def test_the_overlap_default_with_moe_recompute_and_expert_parallelism_is_off():
    """The 671B H800 recipe's case (EP 64, recompute [layernorm, mla_up_proj, moe]) through the plain API:
    no F&B overlap, so Transformer Engine's deferred weight GEMMs give the zero-bubble split."""
    options = _options(ep=64, backend="transformer_engine", recompute_granularity="selective",
                       recompute_modules=["layernorm", "mla_up_proj", "moe"])
    assert (options.zero_bubble, options.fb_overlap) == (True, False)


def test_on_transformer_engine_the_split_gives_way_to_the_overlap_unless_asked_for():
    """Megatron's overlapped step runs TE's deferred weight GEMMs inside the pair, so on TE the split and
    the F&B overlap exclude each other: by default the overlap wins (it hides the all-to-all), an
    explicit split turns the overlap's default off, asking for both is an error naming the fix."""
    te = dict(backend="transformer_engine")
    both = decide_options("dualpipev", **{**dict(ep=2, zero_bubble=None, fb_overlap=None, recompute_granularity=None,
                                                 recompute_modules=None, mtp_num_layers=1), **te})
    assert (both.options.zero_bubble, both.options.fb_overlap) == (False, True)
    assert both.why["zero_bubble"] == "off (default: needs no F&B overlap on Transformer Engine)"
    assert (_options(zero_bubble=True, **te).zero_bubble, _options(zero_bubble=True, **te).fb_overlap) == (True, False)
    assert _options(fb_overlap=False, **te).zero_bubble is True
    with pytest.raises(ConfigError, match="no zero-bubble split on Transformer Engine"):
        _options(zero_bubble=True, fb_overlap=True, **te)


@pytest.mark.parametrize("schedule,pp,m,peak", [("dualpipe", 4, 8, 5), ("dualpipe", 8, 16, 9),
                                                ("dualpipev", 4, 8, 9), ("dualpipev", 8, 16, 17)])
def test_activations_in_flight_are_the_papers(schedule, pp, m, peak):
    """DualPipe holds PP+1 chunk activations (arXiv 2412.19437v2, Table 2); DualPipeV PP+1 over its 2P stages
    (2P+1 half chunks; the ``deepseek-ai/DualPipe`` README)."""
    assert max(len(deepseek_in_flight(schedule, pp, r, m)) for r in range(pp)) == peak


# ---- the simulator against the paper's bubble table (arXiv 2412.19437v2, Table 2) ----
@pytest.mark.parametrize("pp,m", [(4, 8), (4, 16), (8, 16), (8, 24)])
@pytest.mark.parametrize("f,b,w,fb", [(1.0, 2.0, 1.0, 3.0), (2.0, 3.0, 1.0, 4.0), (1.5, 2.5, 1.0, 3.0)])
def test_simulated_bubbles_equal_the_papers_formulas(pp, m, f, b, w, fb):
    """Bubble (the most idle rank) with free transfers: 1F1B (P-1)(F+B), interleaved (P-1)(F+B)/v,
    ZB1P (P-1)(F+B-2W), DualPipe (P/2-1)(F&B+B-3W), DualPipeV (P-1)(F&B+B-3W)/2 (half-size chunks)
    — the DeepSeek ones with F = B - W and F&B >= B, where the paper's formula (Table 2) is exact."""
    c = Costs(F=f, B=b, W=w, FB=fb)
    assert simulate("1f1b", pp, m, c).bubble == pytest.approx((pp - 1) * (f + b))
    assert simulate("interleaved", pp, m, c, vpp=2).bubble == pytest.approx((pp - 1) * (f + b) / 2)
    assert simulate("zb1p", pp, m, c).bubble == pytest.approx((pp - 1) * (f + b - 2 * w))
    if f == b - w:
        assert simulate("dualpipe", pp, m, c).bubble == pytest.approx((pp / 2 - 1) * (fb + b - 3 * w))
        assert simulate("dualpipev", pp, m, c).bubble == pytest.approx((pp - 1) * (fb + b - 3 * w) / 2)
    busy = m * (f + b)  # every schedule does the same work per rank
    for schedule in ("1f1b", "zb1p"):
        t = simulate(schedule, pp, m, c)
        assert all(t.step_time - t.idle(r) == pytest.approx(busy) for r in range(pp))


def test_simulator_counts_transfers_and_overlap():
    free, costly = Costs(), Costs(C=0.5)
    assert simulate("1f1b", 4, 8, costly).step_time > simulate("1f1b", 4, 8, free).step_time
    assert simulate("dualpipe", 4, 8, Costs(FB=2.0)).step_time < simulate("dualpipe", 4, 8, free).step_time
    # Without the split backward DualPipe loses the weight gradients that fill its bubbles.
    assert simulate("dualpipev", 4, 8, zero_bubble=False).bubble > simulate("dualpipev", 4, 8).bubble


def test_simulator_refuses_impossible_costs():
    with pytest.raises(ConfigError, match="W <= B"):
        simulate("1f1b", 4, 8, Costs(B=1.0, W=2.0))


# ---- megatron-dsv3 schedule ----
def _schedule(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.cli", "schedule", *argv], capture_output=True,
                          text=True, timeout=120)


def test_schedule_command_compares_the_schedules_in_a_table():
    result = _schedule("--pp", "4", "--microbatches", "8")
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()}
    for name in ("1F1B", "interleaved 1F1B", "ZB1P (ZB-H1)", "DualPipe", "DualPipeV"):
        assert name in rows, result.stdout
    assert re.search(r"DualPipe\s+26\s+2\s", rows["DualPipe"]) and re.search(r"1F1B\s+33\s+9\s", rows["1F1B"])


def test_schedule_json_gives_the_engines_order_for_every_rank(tmp_path):
    result = _schedule("--schedule", "dualpipev", "--pp", "4", "--microbatches", "10", "--json")
    assert result.returncode == 0, result.stderr
    [timeline] = json.loads(result.stdout)["schedules"]
    assert timeline["ranks"] == [[str(op) for op in rank_ops("dualpipev", 4, 10, r)] for r in range(4)]
    assert timeline["bubble"] == pytest.approx(3 * 2 / 2) and timeline["peak_activations"] == 9


def test_schedule_plot_writes_a_picture(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pipeline.png"
    result = _schedule("--pp", "2", "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_schedule_on_a_recipe_uses_its_sizes_and_cost_model():
    result = _schedule("--recipe", "deepseek-v3-671b-h800-2048", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    # The recipe keeps its `moe` recompute, so its DualPipe runs without the overlap (fb_overlap: false).
    assert (data["pp"], data["ep"], data["microbatches"], data["fb_overlap"]) == (16, 64, 120, False)
    step = {s["schedule"]: s.get("step_time") for s in data["schedules"]}
    # 120 micro-batches are not a multiple of 16: Megatron's interleaved orders need a micro-batch group
    # of 20 (--microbatch-group-size-per-virtual-pipeline-stage), the smallest it accepts for them.
    groups = {s["schedule"]: s.get("microbatch_group") for s in data["schedules"]}
    assert groups["interleaved"] == groups["combined_1f1b"] == 20 and step["interleaved"] < step["1f1b"]
    assert step["dualpipe"] < step["zb1p"] < step["1f1b"]


def test_schedule_errors_name_the_problem():
    bad = _schedule("--schedule", "dualpipe", "--pp", "3")
    assert bad.returncode == 2 and "even number of pipeline ranks" in bad.stderr
    unknown = _schedule("--schedule", "dualpipe2")
    assert unknown.returncode == 2 and "did you mean 'dualpipe'" in unknown.stderr


# ---- where users set them: recipes and Megatron's arguments ----
def _check(*overrides: str):
    from megatron_dsv3.recipe import load_recipe, recipe_report

    return recipe_report(load_recipe("dsv3-tiny-cpu", list(overrides)))


@pytest.mark.parametrize("overrides,words", [
    (["parallel.schedule=dualpipev"], ["needs parallel.pp >= 2"]),
    (["parallel.world_size=2", "parallel.pp=2", "parallel.schedule=dualpipev", "training.global_batch_size=8"],
     ["dualpipev on pp=2 needs a number of at least 2 x pp = 4 micro-batches per step, got 2"]),
    (["parallel.zero_bubble=true"], ["an option of the dualpipe and dualpipev schedules"]),
    (["parallel.world_size=2", "parallel.pp=2", "parallel.schedule=dualpipev", "parallel.fb_overlap=true"],
     ["forward/backward overlap needs expert parallelism"]),
])
def test_recipe_check_refuses_what_the_schedule_cannot_run(overrides, words):
    report = _check(*overrides)
    assert not report.ok
    assert all(w in report.render() for w in words), report.render()


def test_recipe_check_shows_the_dualpipev_placement():
    report = _check("parallel.world_size=2", "parallel.pp=2", "parallel.schedule=dualpipev")
    assert report.ok and "DualPipeV: rank r holds stages r and 2pp-1-r" in report.render()


def test_recipe_check_prints_the_resolved_options_and_why():
    text = _check("parallel.world_size=2", "parallel.pp=2", "parallel.schedule=dualpipev",
                  "parallel.zero_bubble=false").render()
    assert "options    zero bubble off (set: parallel.zero_bubble: false, --no-dualpipe-zero-bubble)" in text
    assert "           F&B overlap off (default: needs expert parallelism (ep > 1))" in text, text


@pytest.mark.parametrize("overrides", [[], ["parallel.fb_overlap=null"]], ids=["as shipped", "default"])
def test_the_h800_recipe_keeps_its_moe_recompute_and_its_estimate(overrides):
    """Its 79.6-of-80-GiB estimate counts the `moe` recompute; the overlap that would skip it is off."""
    from megatron_dsv3.recipe import load_recipe, recipe_report

    report = recipe_report(load_recipe("deepseek-v3-671b-h800-2048", overrides))
    text = report.render()
    assert report.ok and "moe" in report.recipe.training.recompute.modules, text
    assert "F&B overlap off (" in text and report.memory.total < 80


def _parse(monkeypatch, *extra: str):
    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args
    from megatron_dsv3.parallel import ParallelLayout

    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = megatron_argv("dsv3-tiny", ParallelLayout(pp=2), backend="local", cpu=True,
                         extra=["--global-batch-size", "8", *extra])
    return parse_megatron_args(argv)


def test_megatron_arguments_carry_the_schedule_and_its_resolved_options(monkeypatch):
    from megatron_dsv3.args.settings import schedule_options

    args = _parse(monkeypatch, "--pipeline-schedule", "dualpipev")
    assert args.pipeline_schedule == "dualpipev" and args.virtual_pipeline_model_parallel_size == 2
    options = schedule_options(args)
    assert (options.zero_bubble, options.fb_overlap) == (True, False)  # local backend, ep = 1


@pytest.mark.parametrize("extra,words", [
    (["--pipeline-schedule", "dualpipe", "--log-params-norm"], ["--log-params-norm", "dualpipev"]),
    (["--pipeline-schedule", "dualpipev", "--dualpipe-fb-overlap"], ["expert parallelism (ep > 1)"]),
    (["--dualpipe-zero-bubble"], ["dualpipe"]),
])
def test_megatron_arguments_the_schedule_cannot_run_are_refused(monkeypatch, extra, words):
    with pytest.raises(ConfigError) as err:
        _parse(monkeypatch, *extra)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("extra", [["--dualpipe-zero-bubble"], []], ids=["split asked for", "split left to default"])
def test_megatron_arguments_overlap_grad_reduce_keeps_the_zero_bubble_split(monkeypatch, extra):
    """``--overlap-grad-reduce`` and the B/W split run together (DDP counts a deferred weight as ready
    at its W: ``runtime/ddp_changes.py``); before, the split was refused or resolved off."""
    from megatron_dsv3.args.settings import schedule_options

    args = _parse(monkeypatch, "--pipeline-schedule", "dualpipev", "--overlap-grad-reduce", *extra)
    assert args.overlap_grad_reduce and schedule_options(args).zero_bubble is True
