"""Recipes: loading, validation errors, Megatron arguments, the memory model, the shipped recipes.

Paper numbers cited here are from the DeepSeek-V3 report (arXiv 2412.19437v2); Megatron behaviour is read
from megatron-core 0.19.2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from types import SimpleNamespace

import pytest

import megatron_dsv3.data
from megatron_dsv3.args.compose import recipe_argv
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.accounting import count
from megatron_dsv3.parallel import placement_for
from megatron_dsv3.pipeline.in_flight import megatron_in_flight as in_flight
from megatron_dsv3.recipe import (
    estimate_memory,
    load_recipe,
    loads_recipe,
    parallel_layout,
    recipe_report,
    shipped_recipes,
    validate_recipe,
)
from megatron_dsv3.recipe.schema import Recipe, schema_fields, yaml_name

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def placement(preset, layout):
    return placement_for(preset, layout).rows

SHIPPED = [
    "deepseek-v3-671b-h800-2048",
    "deepseek-v3-671b-h100-1024",
    "deepseek-v2-lite-8gpu",
    "dsv3-proxy-1gpu",
    "dsv3-tiny-cpu",
]
FAKE_DATA_ARGS = ["--data-path", "/cache/dsv3-corpus_text_document", "--tokenizer-type",
                  "SentencePieceTokenizer", "--tokenizer-model", "/cache/dsv3.model", "--split", "98,2,0"]


@pytest.fixture(autouse=True)
def embedded_data(monkeypatch):
    """``megatron_dsv3.data.default_data_args`` is written elsewhere; these tests pin its output."""
    calls = []

    def default_data_args(cache_dir=None):
        calls.append(cache_dir)
        return list(FAKE_DATA_ARGS)

    monkeypatch.setattr(megatron_dsv3.data, "default_data_args", default_data_args, raising=False)
    return calls


def write(tmp_path, text: str, name: str = "broken.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


TINY = """
name: tiny
model:
  preset: dsv3-tiny
backend: local
precision: fp32
hardware:
  device: cpu
parallel:
  world_size: 1
  tp: 1
  pp: 1
  ep: 1
training:
  micro_batch_size: 4
  global_batch_size: 16
  train_iters: 10
data:
  source: mock
"""


def line_of(path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ---- the shipped recipes ----
def test_shipped_recipes_are_the_five_documented_ones():
    assert sorted(shipped_recipes()) == sorted(SHIPPED)
    for path in shipped_recipes().values():
        assert path.read_text().startswith("#"), f"{path.name} must start with a comment citing its sources"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_at_its_own_world_size(name):
    recipe = load_recipe(name)
    layout = validate_recipe(recipe)
    assert layout.world_size == recipe.parallel.world_size
    report = recipe_report(recipe)
    assert report.ok, report.render()


def test_tiny_cpu_recipe_also_validates_with_two_processes():
    recipe = load_recipe("dsv3-tiny-cpu")
    layout = validate_recipe(recipe, world_size=2)
    assert (layout.dp, layout.ep) == (2, 1)
    assert recipe_report(recipe, world_size=2).ok


@pytest.mark.parametrize("name", ["deepseek-v3-671b-h800-2048", "deepseek-v3-671b-h100-1024"])
def test_671b_recipes_are_estimated_to_fit_80_gb(name):
    recipe = load_recipe(name)
    memory = estimate_memory(recipe)
    assert recipe.hardware.gpu_memory_gb == 80
    assert memory.total <= 80, recipe_report(recipe).render()
    assert recipe_report(recipe, gpu_memory_gb=80).fits


def test_h800_recipe_uses_the_papers_parallelism_and_hyper_parameters():
    """arXiv 2412.19437v2 sections 3.2 and 4.2: PP16, EP64 over 8 nodes, ZeRO-1, no TP; AdamW 0.9/0.95,
    wd 0.1, lr 2.2e-4, clip 1.0, batch ramp to 15360 over 469B tokens, seq 4K, MTP 0.3, bias update 0.001,
    seq-aux 1e-4; DualPipe.
    The ramp starts at 4096, not the paper's 3072: DualPipe needs 2 x PP = 32 micro-batches per DP rank."""
    r = load_recipe("deepseek-v3-671b-h800-2048")
    lay = parallel_layout(r)
    assert (r.parallel.world_size, lay.tp, lay.pp, lay.ep, lay.dp) == (2048, 1, 16, 64, 128)
    assert lay.ep // r.hardware.gpus_per_node == 8 and r.training.use_distributed_optimizer
    t, p = r.training, r.preset
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.lr, t.clip_grad) == (0.9, 0.95, 0.1, 2.2e-4, 1.0)
    assert (t.rampup_batch_size[0], t.global_batch_size) == (4096, 15360) and r.parallel.schedule == "dualpipe"
    assert t.rampup_batch_size[0] // (t.micro_batch_size * lay.dp) == 2 * lay.pp
    assert t.rampup_batch_size[2] * p.seq_length == pytest.approx(469e9, rel=1e-6)
    assert (p.seq_length, p.rope_type, p.mtp_loss_scaling_factor) == (4096, "rope", 0.3)
    assert (p.expert_bias_update_rate, p.seq_aux_loss_coeff) == (1e-3, 1e-4)
    assert {"layernorm", "mla_up_proj"} <= set(t.recompute.modules)


def test_h800_layout_puts_embedding_on_the_first_stage_and_mtp_with_the_loss_on_the_last():
    """Under DualPipe the first and the last stage share rank 0 (and their mirrors rank 15), as in the paper."""
    r = load_recipe("deepseek-v3-671b-h800-2048")
    where = placement_for(r.preset, parallel_layout(r))
    chunks = where.stages
    assert chunks[0].embedding and chunks[0].decoders == (0, 1, 2)
    assert chunks[-1].mtp == 1 and chunks[-1].loss and chunks[-1].decoders == (59, 60)
    assert [i for c in chunks for i in c.decoders] == list(range(61))
    assert where.loss_ranks == where.embedding_ranks() == (0, 15)
    assert {c.stage for c in where.rows[0]} == {c.stage for c in where.rows[15]} == {0, 15}


def test_h100_layout_gives_four_virtual_stages_per_rank():
    r = load_recipe("deepseek-v3-671b-h100-1024")
    rows = placement(r.preset, parallel_layout(r))
    assert len(rows) == 8 and all(len(row) == 4 for row in rows)
    assert sorted(i for row in rows for c in row for i in c.decoders) == list(range(61))
    assert rows[7][3].mtp == 1 and rows[7][3].loss and rows[0][0].embedding


def test_check_report_shows_stages_experts_batch_sizes_and_a_memory_verdict():
    r = load_recipe("deepseek-v3-671b-h800-2048")
    text = recipe_report(r).render()
    assert "256 routed experts / EP 64 = 4 per EP rank" in text and "spans 8 nodes" in text
    assert "expert-DP = world / (PP x EP x ETP) = 2" in text and "DP x CP = 128" in text
    assert "micro-batch 1 x DP 128 x 120 micro-batches per step" in text and "32 -> 120" in text
    assert "DualPipe: rank r holds stage r and a mirrored copy of stage pp-1-r" in text
    assert "embedding, decoders 0-2 (dense)" in text and "decoders 59-60, mtp, output head + loss" in text
    assert re.search(r"total\s+\d+\.\d+\s+of 80 GiB: fits", text) and text.endswith("result     OK")


def test_check_says_does_not_fit_on_a_smaller_gpu_and_is_not_ok():
    report = recipe_report(load_recipe("deepseek-v3-671b-h800-2048"), gpu_memory_gb=40)
    assert report.fits is False and not report.ok and report.error is None
    assert "DOES NOT FIT" in report.render()


# ---- Megatron's parser on the produced arguments ----
def parse(recipe, argv, world_size, monkeypatch):
    from conftest import gpu_machine

    from megatron_dsv3.args.settings import parse_megatron_args
    from megatron_dsv3.cpu import cpu_mode

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    assert argv[:2] == ["--spec", "dsv3"]
    context = cpu_mode() if recipe.is_cpu else gpu_machine(monkeypatch)
    with context:
        return parse_megatron_args(argv[2:])


def test_auto_backend_is_chosen_on_the_machine_that_runs_the_job(monkeypatch):
    """Arguments made on a login node say `auto`; a machine without TE resolves it to local."""
    recipe = load_recipe("dsv3-proxy-1gpu", ["backend=auto"])
    argv = recipe_argv(recipe)
    assert argv[argv.index("--dsv3-backend") + 1] == "auto" and "--transformer-impl" not in argv
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    from megatron_dsv3.args.settings import parse_megatron_args

    args = parse_megatron_args(argv[2:])  # this machine: no GPU, no Transformer Engine
    assert args.transformer_impl == "local"
    assert not args.moe_grouped_gemm and not args.gradient_accumulation_fusion


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_args_parse_with_megatrons_parser_into_the_intended_layout(name, monkeypatch):
    recipe = load_recipe(name)
    argv = recipe_argv(recipe)
    args = parse(recipe, argv, recipe.parallel.world_size, monkeypatch)
    par, t, p = recipe.parallel, recipe.training, recipe.preset
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (par.tp, par.pp)
    assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (par.ep, par.etp)
    assert args.context_parallel_size == par.cp
    assert args.data_parallel_size == parallel_layout(recipe).dp
    chunks = placement_for(p, parallel_layout(recipe)).vpp  # DualPipe(V): two per rank
    assert args.virtual_pipeline_model_parallel_size == (chunks if chunks > 1 else None)
    assert args.sequence_parallel == par.sp
    # DualPipe(V) keep the layout for their own placement (Megatron would read its stages as one per rank).
    deepseek = par.schedule in ("dualpipe", "dualpipev")
    assert (args.dsv3_pipeline_layout if deepseek else args.pipeline_model_parallel_layout) == par.layout
    assert (args.num_layers, args.num_experts, args.seq_length) == (p.num_layers, p.num_routed_experts, p.seq_length)
    assert (args.mtp_num_layers or 0) == p.mtp_num_layers
    assert args.micro_batch_size == t.micro_batch_size
    assert args.bf16 == (recipe.precision == "bf16")
    assert args.use_distributed_optimizer == t.use_distributed_optimizer
    assert args.recompute_granularity == (None if t.recompute.granularity == "none" else t.recompute.granularity)
    assert (args.recompute_modules or []) == t.recompute.modules or t.recompute.granularity != "selective"
    assert (args.train_iters, args.train_samples) == (t.train_iters, t.train_samples)
    assert args.lr == t.lr and args.ckpt_format == recipe.checkpoint.format
    requested = argv[argv.index("--dsv3-backend") + 1]
    # `auto` is chosen when the job starts; hopper_gpu() makes Transformer Engine usable here.
    assert args.transformer_impl == ("transformer_engine" if requested == "auto" else requested)
    # `model.experts: auto` is grouped wherever it runs: TEGroupedMLP, or grouped_mm on the local backend.
    assert args.moe_grouped_gemm == (recipe.model.experts != "sequential")
    if t.rampup_batch_size:
        assert args.step_batch_size_schedule.endswith(f":{t.global_batch_size}")
    else:
        assert args.global_batch_size == t.global_batch_size


def test_tiny_cpu_recipe_args_parse_with_two_processes(monkeypatch):
    recipe = load_recipe("dsv3-tiny-cpu")
    args = parse(recipe, recipe_argv(recipe, world_size=2), 2, monkeypatch)
    assert args.data_parallel_size == 2 and args.expert_model_parallel_size == 1
    assert args.distributed_backend == "gloo" and args.transformer_impl == "local"
    assert args.data_path == [FAKE_DATA_ARGS[1]]
    assert (args.save, args.load, args.save_interval, args.train_iters) == ("runs/dsv3-tiny", "runs/dsv3-tiny", 200, 200)


def test_args_start_with_spec_and_end_with_the_raw_megatron_args(tmp_path):
    path = write(tmp_path, TINY + "megatron_args: [--log-throughput, --seed, 7]\n")
    argv = recipe_argv(load_recipe(path))
    assert argv[:2] == ["--spec", "dsv3"]
    assert argv[-3:] == ["--log-throughput", "--seed", "7"]
    assert "--dsv3-cpu" in argv and "--bf16" not in argv


def test_a_raw_scheduler_flag_is_refused_for_the_recipe_key_that_says_it(tmp_path):
    # The recipe passes --override-opt_param-scheduler (or --use-checkpoint-...); Megatron asserts on both.
    assert "--override-opt_param-scheduler" in recipe_argv(load_recipe(write(tmp_path, TINY)))
    path = write(tmp_path, TINY + "megatron_args: [--use-checkpoint-opt-param-scheduler]\n")
    with pytest.raises(ConfigError) as err:
        recipe_argv(load_recipe(path))
    assert "checkpoint.use_checkpoint_opt_param_scheduler: true" in err.value.fix
    assert err.value.key == "checkpoint.use_checkpoint_opt_param_scheduler" and "broken.yaml" in str(err.value)


def test_bf16_on_cpu_passes_the_check_and_gives_megatron_bf16(tmp_path):
    # Megatron's bf16 path runs in CPU mode (tests/test_cpu_bf16.py); the distributed optimizer does not.
    argv = recipe_argv(load_recipe(write(tmp_path, TINY.replace("precision: fp32", "precision: bf16"))))
    assert "--dsv3-cpu" in argv and "--bf16" in argv
    path = write(tmp_path, TINY.replace("precision: fp32", "precision: bf16").replace(
        "  train_iters: 10", "  train_iters: 10\n  use_distributed_optimizer: true"))
    with pytest.raises(ConfigError, match="use_distributed_optimizer=true with hardware.device=cpu"):
        recipe_argv(load_recipe(path))


def test_layout_string_replaces_the_virtual_stage_flag():
    """validate_args: at most one of --num-virtual-stages-per-pipeline-rank and --pipeline-model-parallel-layout."""
    argv = recipe_argv(load_recipe("deepseek-v3-671b-h100-1024"))
    assert "--pipeline-model-parallel-layout" in argv
    assert "--num-virtual-stages-per-pipeline-rank" not in argv


def test_batch_ramp_becomes_a_step_schedule_with_the_old_ramps_batch_sizes():
    """Megatron 0.19 ignores --rampup-batch-size; the schedule must give the batch the old ramp gave:
    start + incr * floor(consumed / (samples / steps)), then the global batch."""
    from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator

    r = load_recipe("deepseek-v3-671b-h800-2048")
    argv = recipe_argv(r)
    schedule = argv[argv.index("--step-batch-size-schedule") + 1]
    assert "--global-batch-size" not in argv and "--rampup-batch-size" not in argv
    calc = StepBatchsizeNumMicroBatchesCalculator(
        micro_batch_size=1, data_parallel_size=128, decrease_batch_size_if_needed=False, rank=1,
        schedule=schedule, seq_length=r.preset.seq_length)
    start, incr, samples = r.training.rampup_batch_size
    per_step = samples / ((r.training.global_batch_size - start) // incr)
    for consumed in (0, 10**6, 28_625_488, 28_625_489, 60_000_000, 114_501_952, 114_501_953, 3 * 10**9):
        expected = min(start + incr * math.floor(consumed / per_step), r.training.global_batch_size)
        assert calc._get_batch_size_for_samples(consumed) == expected, consumed


def test_data_sources_map_to_megatron_data_arguments(tmp_path, embedded_data):
    mock = recipe_argv(load_recipe(write(tmp_path, TINY, "mock.yaml")))
    assert mock[mock.index("--mock-data"):][:5] == ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096"]
    embedded = load_recipe(write(tmp_path, TINY.replace("source: mock", "source: embedded\n  cache_dir: /c"), "e.yaml"))
    argv = recipe_argv(embedded)
    assert argv[argv.index("--data-path"):][:len(FAKE_DATA_ARGS)] == FAKE_DATA_ARGS
    assert embedded_data == ["/c"]
    files = TINY.replace("source: mock", "source: files\n  paths: [0.3, /d/a, 0.7, /d/b]\n  tokenizer_type: GPT2BPETokenizer")
    argv = recipe_argv(load_recipe(write(tmp_path, files, "f.yaml")))
    assert argv[argv.index("--data-path"):][:5] == ["--data-path", "0.3", "/d/a", "0.7", "/d/b"]


# ---- broken recipes: file:line, key path, value, fix ----
def test_wrong_type_names_file_line_key_and_value(tmp_path):
    path = write(tmp_path, TINY.replace("  tp: 1", "  tp: two"))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:{line_of(path, 'tp: two')}:" in text
    assert "parallel.tp='two'" in text and "an integer" in text and "Fix:" in text


def test_unknown_key_is_an_error_that_suggests_the_closest_key(tmp_path):
    path = write(tmp_path, TINY.replace("  tp: 1", "  tpp: 1"))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:{line_of(path, 'tpp:')}:" in text and "parallel.tpp" in text
    assert "did you mean 'parallel.tp'?" in text


def test_unknown_model_field_suggests_a_preset_field(tmp_path):
    path = write(tmp_path, TINY.replace("  preset: dsv3-tiny", "  preset: dsv3-tiny\n  num_layer: 8"))
    with pytest.raises(ConfigError, match=r"did you mean 'model.num_layers'\?") as err:
        load_recipe(path)
    assert f"{path}:{line_of(path, 'num_layer:')}:" in str(err.value)


def test_ep_not_dividing_the_experts_is_an_error_at_the_ep_line(tmp_path):
    path = write(tmp_path, TINY.replace("world_size: 1", "world_size: 3").replace("ep: 1", "ep: 3"))
    with pytest.raises(ConfigError) as err:
        recipe_argv(load_recipe(path))
    text = str(err.value)
    assert f"{path}:{line_of(path, 'ep: 3')}:" in text
    assert "parallel.ep=3 does not divide model.num_routed_experts=16" in text and "Fix:" in text


def test_pp_not_dividing_the_layers_is_an_error_at_the_pp_line(tmp_path):
    path = write(tmp_path, TINY.replace("world_size: 1", "world_size: 3").replace("pp: 1", "pp: 3"))
    report = recipe_report(load_recipe(path))
    assert not report.ok
    text = str(report.error)
    assert f"{path}:{line_of(path, 'pp: 3')}:" in text and "parallel.pp" in text
    assert "model.num_layers=4" in text and "parallel.layout" in text
    assert "INVALID" in report.render()


def test_a_top_level_schedule_section_points_to_parallel_schedule(tmp_path):
    path = write(tmp_path, TINY + "schedule:\n  name: dualpipev\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:{line_of(path, 'schedule:')}:" in text
    assert "parallel.schedule" in text and "schedule: dualpipev" in text


def test_unknown_recipe_name_lists_the_shipped_recipes_with_did_you_mean():
    with pytest.raises(ConfigError) as err:
        load_recipe("dsv3-tiny-cpus")
    text = str(err.value)
    assert all(name in text for name in SHIPPED) and "did you mean 'dsv3-tiny-cpu'?" in text


def test_invalid_pipeline_layout_is_rejected_by_megatrons_layout_class(tmp_path):
    text = TINY.replace("world_size: 1", "world_size: 2").replace("pp: 1", "pp: 2\n  layout: 'Ett|tL'")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        validate_recipe(load_recipe(path))
    assert f"{path}:{line_of(path, 'layout:')}:" in str(err.value) and "parallel.layout" in str(err.value)
    good = write(tmp_path, text.replace("'Ett|tL'", "'Ett|ttmL'"), "good.yaml")
    assert validate_recipe(load_recipe(good)).pp == 2


@pytest.mark.parametrize("change, key, words", [
    (("global_batch_size: 16", "global_batch_size: 18"), "global_batch_size:", "not divisible by micro_batch_size x dp"),
    (("  tp: 1", "  tp: 2"), "world_size:", "parallel.world_size=1 is not divisible by parallel.tp x pp x cp"),
    (("source: mock", "source: files"), "source:", "data.source=files needs data.paths"),
    (("train_iters: 10", "train_iters: 10\n  train_samples: 160"), "train_iters:", "exactly one of"),
    (("global_batch_size: 16", "global_batch_size: 16\n  recompute: {granularity: selective, modules: [mla_up]}"),
     "recompute:", "did you mean 'mla_up_proj'?"),
])
def test_inconsistent_recipe_errors_name_line_key_and_fix(tmp_path, change, key, words):
    path = write(tmp_path, TINY.replace(*change))
    with pytest.raises(ConfigError) as err:
        recipe_argv(load_recipe(path))
    text = str(err.value)
    assert words in text and "Fix:" in text
    assert re.search(rf"{re.escape(str(path))}:\d+:", text)
    if key != "source:":
        assert f"{path}:{line_of(path, key)}:" in text


def test_interleaved_schedule_needs_micro_batches_in_multiples_of_pp(tmp_path):
    """schedules.py raises at the first step when the last group of micro-batches is smaller than pp."""
    text = load_recipe("deepseek-v3-671b-h100-1024").source
    path = write(tmp_path, open(text).read().replace("global_batch_size: 8192", "global_batch_size: 8256"))
    with pytest.raises(ConfigError) as err:
        validate_recipe(load_recipe(path))
    assert f"{path}:{line_of(path, 'global_batch_size:')}:" in str(err.value)
    assert "multiple of pp=8" in str(err.value) and "gives 129" in str(err.value)


# ---- the memory model ----
def test_memory_estimate_matches_a_hand_calculation_for_the_tiny_cpu_recipe():
    """dsv3-tiny, fp32, one CPU process, no recompute, micro-batch 4 x 128 tokens, every tensor listed.

    Measured on the built model with saved-tensor hooks (megatron-core 0.19.2, local backend): 58.35 MB
    of activations; the formula gives 57.51 MB."""
    r = load_recipe("dsv3-tiny-cpu")
    m = estimate_memory(r)
    c = count(r.preset)
    params = c.total_params + c.mtp_params  # pp = 1: MTP shares the embedding and the head
    gib = 1024**3
    assert m.parameters * gib == pytest.approx(4 * params)
    assert m.gradients * gib == pytest.approx(4 * params)
    assert m.optimizer_states * gib == pytest.approx(8 * params)  # fp32: Adam m and v, no master copy
    h, n, s, v = 128, 4, 128, 4096
    norm = 3 * h  # local RMSNorm: input, normalised, output (fp32)
    attention = (norm + 3 * (64 + 32) + 16  # input norm; q and kv latent norms; rope key
                 + n * (48 + 48 + 32) + n * 32 + n * s  # q, k, v; attention output; softmax probs
                 + norm)  # pre-MLP norm
    dense = attention + 3 * 384
    router = (4 * 16 + 4 * 8 * 4) // 4  # fp32 scores, 4 int64 routing indices per chosen expert
    moe = attention + 4 * (h + 3 * 64) + 3 * 64 + router  # routed (top-4), shared
    head = 3 * h + v  # final norm, fp32 softmax
    mtp = 2 * 2 * h + 2 * h + moe + head  # enorm, hnorm, projection input, block, its own head
    tokens = 4 * 128
    expected = 4 * tokens * (dense + 3 * moe + head + mtp)
    assert m.activations * gib == pytest.approx(expected)
    assert m.overhead == 1.0
    assert m.total == pytest.approx(m.parameters + m.gradients + m.optimizer_states + m.activations + 1.0)


def saved_activation_bytes(preset: str, micro_batch_size: int, variants: list[list[str]]) -> list[int]:
    """Run in a fresh process: bytes of the distinct tensors autograd keeps from one forward pass of
    the built model (parameters excluded), per list of extra Megatron arguments."""
    import torch

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import _microbatches, build_chunks, fixed_tokens, init_parallel

    init_parallel(ParallelLayout())
    batch = next(_microbatches(fixed_tokens(preset, micro_batch_size), micro_batch_size))
    results = []
    for extra in variants:
        _, _, (model,) = build_chunks(preset, ParallelLayout(), extra_args=tuple(extra), ddp=False)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept.setdefault(storage.data_ptr(), storage)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
        results.append(sum(storage.nbytes() for storage in kept.values()))
    return results


def test_activation_estimate_matches_the_tensors_a_built_model_keeps():
    """The independent reference: Megatron's GPTModel built from the dsv3 spec (local backend, CPU),
    whose saved tensors are counted with autograd hooks, without and with selective recompute."""
    from megatron_dsv3.testing.distributed import run_distributed

    recompute = ["--recompute-granularity", "selective", "--recompute-modules", "moe", "core_attn"]
    measured = run_distributed(saved_activation_bytes, 1, "dsv3-tiny", 4, [[], recompute])[0]
    r = load_recipe("dsv3-tiny-cpu")
    plain = estimate_memory(r).activations * 1024**3
    r.training.recompute = dataclasses.replace(r.training.recompute, granularity="selective",
                                               modules=["moe", "core_attn"])
    less = estimate_memory(r).activations * 1024**3
    assert plain == pytest.approx(measured[0], rel=0.03)
    assert less == pytest.approx(measured[1], rel=0.03)


def test_parameters_held_by_all_stages_add_up_to_the_model():
    """Over the 16 stages of the H800 recipe (TP 1), dense + EP x expert parameters = the model
    (accounting.count) + MTP + the embedding copy Megatron builds on the MTP stage, twice under
    DualPipe (each stage and its mirror)."""
    r = load_recipe("deepseek-v3-671b-h800-2048")
    m = estimate_memory(r)
    c, p = count(r.preset), r.preset
    held = sum(rank.dense_params + rank.expert_params * 64 for rank in m.ranks)
    copies = placement_for(p, parallel_layout(r)).param_copies
    assert copies == 2
    assert held == pytest.approx(copies * (c.total_params + c.mtp_params + p.vocab_size * p.hidden_size), rel=1e-9)
    assert len(m.ranks) == 16 and m.pp_rank == max(m.ranks, key=lambda x: x.total).pp_rank


def test_micro_batches_in_flight_match_megatrons_schedules():
    """get_pp_rank_microbatches: warmup forwards + 1 before the first backward; get_schedule_table: chunk order."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    from megatron_dsv3.pipeline.in_flight import forward_order

    for pp, vpp, mb in [(4, 1, 8), (16, 1, 120), (2, 1, 1), (4, 2, 8), (8, 4, 128), (4, 3, 4)]:
        for rank in range(pp):
            comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: rank),
                                   virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
            total, _, warmup, _ = get_pp_rank_microbatches(mb, vpp, pp, p2p_communicator=comm)
            assert len(in_flight(pp, rank, vpp, mb)) == min(warmup + 1, total)
        if vpp > 1:
            assert forward_order(mb, vpp, pp) == [chunk for _, chunk in get_schedule_table(mb, vpp, pp)]


def test_distributed_optimizer_shards_dense_states_over_dp_and_experts_over_expert_dp():
    r = load_recipe("deepseek-v3-671b-h800-2048")
    sharded = estimate_memory(r).ranks[1]
    r.training.use_distributed_optimizer = False
    whole = estimate_memory(r).ranks[1]
    gib = 1024**3
    assert whole.optimizer_states * gib == pytest.approx(12 * (whole.dense_params + whole.expert_params), rel=1e-6)
    assert sharded.optimizer_states * gib == pytest.approx(
        12 * (whole.dense_params / 128 + whole.expert_params / 2), rel=1e-6)  # expert-DP = 2048/(16*64)


def test_more_recompute_lowers_the_activation_estimate():
    r = load_recipe("deepseek-v3-671b-h800-2048")
    totals = []
    for rc in ([], ["layernorm", "mla_up_proj"], ["layernorm", "mla_up_proj", "moe"]):
        r.training.recompute = dataclasses.replace(r.training.recompute, granularity="selective" if rc else "none",
                                                   modules=rc)
        totals.append(estimate_memory(r).ranks[1].activations)
    assert totals[0] > totals[1] > totals[2]
    r.training.recompute = dataclasses.replace(r.training.recompute, granularity="full", modules=[],
                                               method="uniform", num_layers=1)
    assert estimate_memory(r).ranks[1].activations < totals[2]


# ---- schema and docs ----
def _key_paths(cls, prefix=""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in schema_fields(cls):
        path = prefix + yaml_name(f)
        yield path
        if dataclasses.is_dataclass(hints[f.name]) and f.name != "model":
            yield from _key_paths(hints[f.name], path + ".")


def test_every_schema_key_has_a_doc_line_and_appears_in_docs_recipes_md():
    import pathlib

    docs = (pathlib.Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    paths = list(_key_paths(Recipe))
    assert "parallel.ep" in paths and "training.recompute.modules" in paths and "megatron_args" in paths
    for path in paths:
        assert f"`{path}`" in docs, f"docs/recipes.md does not document {path}"


def test_float_keys_accept_yaml_1_1_exponents_without_a_dot(tmp_path):
    path = write(tmp_path, TINY.replace("train_iters: 10", "train_iters: 10\n  lr: 3e-3\n  min_lr: 1e-4"))
    r = load_recipe(path)
    assert (r.training.lr, r.training.min_lr) == (3e-3, 1e-4)
    assert loads_recipe(TINY).training.lr == 2.2e-4  # default: DeepSeek-V3's peak rate


@pytest.mark.parametrize("shorthand", ["none", "null"])
def test_an_override_goes_into_a_section_written_as_a_shorthand(shorthand):
    """``recompute: none`` is a whole section in one word; an override of one of its keys fills it
    (issue 13, item 12: it was refused as "training.recompute is not a section")."""
    text = TINY.replace("  train_iters: 10\n", f"  train_iters: 10\n  recompute: {shorthand}\n")
    assert loads_recipe(text).training.recompute.granularity == "none"
    recipe = loads_recipe(text, overrides=["training.recompute.granularity=full", "training.recompute.method=uniform",
                                           "training.recompute.num_layers=1"])
    rc = recipe.training.recompute
    assert (rc.granularity, rc.method, rc.num_layers, rc.modules) == ("full", "uniform", 1, [])
    selective = loads_recipe(text, overrides=["training.recompute.granularity=selective",
                                              "training.recompute.modules=[mla_up_proj]"]).training.recompute
    assert (selective.granularity, selective.modules) == ("selective", ["mla_up_proj"])


def test_an_override_into_a_plain_value_is_still_refused():
    with pytest.raises(ConfigError) as err:
        loads_recipe(TINY, overrides=["training.train_iters.x=1"])
    assert "training.train_iters is not a section" in str(err.value)
