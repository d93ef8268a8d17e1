"""Watching a run: the ``logging:`` and ``profiling:`` recipe keys, ``metrics.jsonl`` and ``megatron-dsv3 plot``.

One real ``megatron-dsv3 train`` run serves most claims: ``dsv3-tiny-cpu`` on 2 processes under
DualPipeV (PP 2, 4 micro-batches), 4 steps, with TensorBoard, an offline W&B run and the PyTorch
profiler over step 3.  What it wrote is read back with TensorBoard's own event reader and W&B's
own transaction-log reader (``wandb leet inspect``), and held against the progress lines.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from test_train_job import _train

from megatron_dsv3.pipeline.engine import rank_program

STEPS, WARMUP, LR, MIN_LR = 4, 2, 3.0e-3, 3.0e-4  # _train sets lr_warmup_iters=2
TOKENS = 4 * 64  # global batch 4 x seq 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("monitored")
    result = _train(run_dir, f"training.train_iters={STEPS}", "training.micro_batch_size=1",
                    "training.global_batch_size=4", "model.seq_length=64", "training.eval_iters=1",
                    f"checkpoint.save_interval={STEPS}", "parallel.pp=2", "parallel.world_size=2",
                    "parallel.schedule=dualpipev", f"logging.tensorboard_dir={run_dir / 'tensorboard'}",
                    "logging.wandb_project=dsv3-tests", "logging.wandb_mode=offline",
                    "profiling.torch_profiler=true", "profiling.step_start=2", "profiling.step_end=3", nproc=2)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, result.stdout, records


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_tensorboard_scalars_of_a_run_equal_its_printed_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, stdout, records = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("lm loss", "mtp_1 loss", "learning-rate")}
    for r in records:
        step = r["iteration"]
        assert f"[megatron-dsv3] step {step}/{STEPS} | loss {r['lm_loss']:.4f}" in stdout
        assert scalars["lm loss"][step] == _f32(r["lm_loss"]), step  # TensorBoard keeps float32
        assert scalars["mtp_1 loss"][step] == _f32(r["mtp_1_loss"]), step
        assert scalars["learning-rate"][step] == _f32(r["learning_rate"]), step


def test_an_offline_wandb_run_has_the_same_history(run):
    run_dir, _, records = run
    logs = list((run_dir / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    inspected = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(logs[0])],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    history = {}
    for line in inspected.stdout.splitlines():
        entry = json.loads(line)
        if entry.get("type") == "history":
            history[entry["history"]["item"]["_step"]] = entry["history"]["item"]
    for r in records:
        row = history[r["iteration"]]
        assert row["lm loss"] == r["lm_loss"] and row["mtp_1 loss"] == r["mtp_1_loss"]
        assert row["learning-rate"] == _f32(r["learning_rate"])


def test_metrics_hold_the_mtp_loss_learning_rate_balance_loss_and_expert_load_of_every_moe_layer(run):
    _, _, records = run
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        i = r["iteration"]
        # Linear warmup, then cosine decay to min_lr over train_iters (Megatron's schedule, written out).
        expected = LR * i / WARMUP if i <= WARMUP else \
            MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (i - WARMUP) / (STEPS - WARMUP)))
        assert r["learning_rate"] == pytest.approx(expected, rel=1e-9)
        assert 0 < r["mtp_1_loss"] < 10 and r["seq_load_balancing_loss"] > 0
        # MoE layers 2-4 (one dense first layer) on both pipeline ranks, and the MTP module's.
        load = r["expert_load_max_violation"]
        assert list(load) == ["2", "3", "4", "mtp1"]
        for value in load.values():
            # max / mean - 1 of token counts: mean = tokens x top-4 / 16 experts, so (v + 1) x mean counts tokens.
            count = (value + 1) * TOKENS * 4 / 16
            assert value >= 0 and count == round(count), value


def test_the_profiler_trace_of_a_dualpipev_run_names_its_operations_in_schedule_order(run):
    run_dir = run[0]
    for rank in (0, 1):
        trace = json.load(gzip.open(run_dir / "torch_profile" / f"rank-{rank}.json.gz"))
        ranges = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                         and re.fullmatch(r"[FBW]\d+\.\d+z?(&B\d+\.\d+)?", e.get("name", ""))), key=lambda e: e["ts"])
        expected = [str(a.op) for a in rank_program("dualpipev", 2, 4, rank) if a.kind == "op"]
        assert [e["name"] for e in ranges] == expected, rank  # one profiled step
        assert "F0.3&B1.1" in expected and any(n.startswith("W") for n in expected)


def test_plot_draws_loss_mtp_loss_throughput_learning_rate_and_expert_load_of_runs(run, tmp_path):
    from megatron_dsv3.cli import main
    from megatron_dsv3.train.plot import draw, read_run

    run_dir, _, records = run
    out = tmp_path / "runs.png"
    assert main(["plot", str(run_dir), str(run_dir / "metrics.jsonl"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = draw([read_run(run_dir)])
    loss, speed, lr, heat = fig.axes[:4]
    assert loss.get_ylabel() == "loss (nats per token)" and speed.get_ylabel() == "tokens per second (global batch)"
    assert all(ax.get_xlabel() == "step (optimizer iteration)" for ax in (loss, speed, lr, heat))
    lines = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
    assert lines[f"{run_dir.name}: LM loss"] == [r["lm_loss"] for r in records]
    assert lines[f"{run_dir.name}: MTP loss (depth 1)"] == [r["mtp_1_loss"] for r in records]
    grid = heat.get_images()[0].get_array()
    assert np.array_equal(grid, [[r["expert_load_max_violation"][layer] for r in records]
                                 for layer in ("2", "3", "4", "mtp1")])
    assert [t.get_text() for t in heat.get_yticklabels()] == ["layer 2", "layer 3", "layer 4", "MTP 1"]


@pytest.mark.quick
def test_the_kept_expert_load_is_the_all_reduced_count_the_bias_update_moves_the_bias_by(megatron_single_process):
    import importlib

    import torch

    from megatron_dsv3.runtime import metrics_changes
    from megatron_dsv3.runtime.catalog import group_changes
    from megatron_dsv3.runtime.registry import apply_changes, revert_changes

    class Router(torch.nn.Module):
        def __init__(self, layer, counts, mtp=False):
            super().__init__()
            self.layer_number, self.is_mtp_layer = layer, mtp
            self.register_buffer("expert_bias", torch.zeros(len(counts)))
            self.register_buffer("local_tokens_per_expert", torch.tensor(counts, dtype=torch.float32))

    counts = {"2": [5.0, 1, 1, 1], "3": [2.0, 2, 2, 2], "mtp1": [0.0, 0, 3, 5]}
    chunk = torch.nn.Sequential(Router(2, counts["2"]), Router(3, counts["3"]), Router(1, counts["mtp1"], mtp=True))
    config = type("Config", (), {"num_layers": 4, "moe_router_bias_update_rate": 0.01})()
    changes = [c for c in group_changes("train") if c.name == "expert_bias_update_keeps_the_expert_load"]
    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    apply_changes(changes)
    try:
        finalize_model_grads._update_router_expert_bias([chunk], config)
        _, load = metrics_changes.STEP.take()
    finally:
        revert_changes(changes)
    assert load == counts
    for layer, router in zip(counts, chunk):
        c = np.array(counts[layer], dtype=np.float64)
        # Megatron's rule, unchanged: bias += rate * sign(mean - load).
        assert torch.equal(router.expert_bias, torch.tensor(0.01 * np.sign(c.mean() - c), dtype=torch.float32))
        assert metrics_changes.max_violation(load[layer]) == c.max() / c.mean() - 1


@pytest.mark.quick
def test_logging_and_profiling_keys_become_megatrons_own_arguments(monkeypatch, tmp_path):
    """Parsed by Megatron's own parser (what stock pretrain_gpt.py gets from `megatron-dsv3 args`)."""
    import os

    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.args.settings import parse_megatron_args
    from megatron_dsv3.recipe import load_recipe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WANDB_MODE", "online")  # restored after the test; the plugin sets it below
    recipe = load_recipe("dsv3-tiny-cpu", [
        "training.train_iters=40", "data.source=mock", "logging.tensorboard_dir=/runs/x/tb",
        "logging.tensorboard_log_interval=5", "logging.wandb_project=dsv3", "logging.wandb_entity=team",
        "logging.wandb_mode=offline", "logging.timing_log_level=2", "profiling.torch_profiler=true",
        "profiling.step_start=3", "profiling.step_end=5", "profiling.ranks=[0]", "profiling.record_shapes=true"])
    args = parse_megatron_args(recipe_argv(recipe)[2:])
    assert (args.tensorboard_dir, args.tensorboard_log_interval, args.timing_log_level) == ("/runs/x/tb", 5, 2)
    assert (args.wandb_project, args.wandb_entity, args.wandb_exp_name) == ("dsv3", "team", "dsv3-tiny-cpu")
    assert os.environ["WANDB_MODE"] == "offline"  # Megatron's wandb.init reads it
    assert (args.profile, args.use_pytorch_profiler, args.profile_step_start, args.profile_step_end) == (True, True, 3, 5)
    assert args.profile_ranks == [0] and args.pytorch_profiler_collect_shapes


@pytest.mark.parametrize("overrides, words", [
    (["profiling.torch_profiler=true"], "profiling.torch_profiler writes its trace next to logging.tensorboard_dir"),
    (["profiling.torch_profiler=true", "logging.tensorboard_dir=tb", "profiling.step_end=10"], "is not after"),
    (["profiling.nsys=true"], "profiling.nsys needs a GPU"),
    (["profiling.memory_snapshot=m.pickle"], "profiling.memory_snapshot needs a GPU"),
    (["profiling.nvtx_ranges=true"], "profiling.nsys is off"),
    (["logging.wandb_project=p", "checkpoint.save=null", "checkpoint.load=null", "checkpoint.save_interval=null"],
     "logging.wandb_project needs a folder"),
    (["logging.wandb_mode=offlne"], "offline"),
])
@pytest.mark.quick
def test_logging_and_profiling_keys_a_run_cannot_use_are_refused_with_the_fix(overrides, words):
    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.errors import ConfigError
    from megatron_dsv3.recipe import load_recipe

    with pytest.raises(ConfigError) as err:
        recipe_argv(load_recipe("dsv3-tiny-cpu", ["training.train_iters=40", *overrides]))
    assert words in str(err.value) and "Fix:" in str(err.value)
