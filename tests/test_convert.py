"""``megatron-dsv3 convert`` end to end, against HuggingFace transformers' DeepseekV3 (from PyPI).

transformers builds and saves small random DeepSeek-V3 models (configs unlike our presets: other
group counts, dense-layer and shared-expert counts, ``v_head_dim`` unlike ``qk_nope_head_dim``,
with and without MTP, without query compression).  Each is converted to a Megatron checkpoint and
loaded by Megatron's own distributed-checkpoint reader into the model ``megatron-dsv3 train``
builds: its logits equal transformers' (fp32, max abs difference <= 1e-4).  Exporting back gives
the original tensors bit for bit; an FP8 checkpoint made here (E4M3, 128x128 block scales)
imports to within its quantisation error; the converted checkpoint loads under TP=2, EP=2 and
PP=2 with the same per-token losses, and a checkpoint saved under TP=2 x EP=2 exports to the same
HF tensors.  ``megatron-dsv3 train`` starts from a converted checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_dsv3.convert import run  # noqa: E402
from megatron_dsv3.convert.hf_config import preset_from_hf_config  # noqa: E402
from megatron_dsv3.errors import ConfigError  # noqa: E402
from megatron_dsv3.parallel import ParallelLayout  # noqa: E402

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
    routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24,
    qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
    norm_topk_prob=True, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_interleave=True, initializer_range=0.02,
)
CONFIGS = {
    # v_head_dim 24 != qk_nope_head_dim 32; 2 groups, 1 per token; one dense layer; MTP.
    "mtp": dict(num_nextn_predict_layers=1),
    # 2 groups of 4 experts, 1 group per token, top-4: Megatron's group score (top topk/group_topk = 4)
    # and DeepSeek's (top 2) differ, so this checks the router follows DeepSeek.
    "groups-top4-from-1": dict(n_group=2, topk_group=1, num_experts_per_tok=4, num_nextn_predict_layers=0),
    # Two dense layers, two shared experts, no query compression, no MTP.
    "dense2-shared2-noq": dict(first_k_dense_replace=2, n_shared_experts=2, q_lora_rank=None, num_hidden_layers=4,
                               num_nextn_predict_layers=0),
}
TOKENS = torch.randint(0, BASE["vocab_size"], (2, 49), generator=torch.Generator().manual_seed(3))


def _hf_model(overrides: dict, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = dict(BASE, **overrides)
    mtp = cfg.pop("num_nextn_predict_layers", 0)
    config = DeepseekV3Config(**cfg, attn_implementation="eager")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random everywhere (norms and expert biases too, so their mapping matters)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point and "inv_freq" not in name:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                t.copy_(base + 0.05 * torch.randn(t.shape, generator=g))
    return model, mtp


def _mtp_tensors(model, mtp: int, seed: int) -> dict[str, torch.Tensor]:
    """transformers' DeepseekV3 has no MTP module; the release stores it as layer num_hidden_layers."""
    if not mtp:
        return {}
    c = model.config
    g = torch.Generator().manual_seed(seed)
    src = {k: v for k, v in model.state_dict().items() if k.startswith(f"model.layers.{c.num_hidden_layers - 1}.")}
    out = {}
    L = c.num_hidden_layers
    for name, t in src.items():
        out[name.replace(f"model.layers.{L - 1}.", f"model.layers.{L}.")] = t + 0.01 * torch.randn(t.shape, generator=g)
    h = c.hidden_size
    out[f"model.layers.{L}.enorm.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
    out[f"model.layers.{L}.hnorm.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
    out[f"model.layers.{L}.eh_proj.weight"] = 0.05 * torch.randn(h, 2 * h, generator=g)
    out[f"model.layers.{L}.shared_head.norm.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
    out[f"model.layers.{L}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    out[f"model.layers.{L}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


def _save_hf(model, mtp: int, path, *, dtype=torch.float32, seed: int = 7) -> dict[str, torch.Tensor]:
    """The released layout (per-expert names, an index) written by transformers, plus the MTP layer;
    returns every tensor as written."""
    model.to(dtype).save_pretrained(path)
    extra = {k: v.to(dtype).contiguous() for k, v in _mtp_tensors(model, mtp, seed).items()}
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = mtp
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if extra:
        safetensors_torch.save_file(extra, path / "mtp.safetensors")
        index_path = path / "model.safetensors.index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
        else:
            names = list(safetensors_torch.load_file(path / "model.safetensors"))
            index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
        index["weight_map"].update({n: "mtp.safetensors" for n in extra})
        index_path.write_text(json.dumps(index))
    return _read_hf(path)


def _read_hf(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 may save experts packed; the comparison is in the released per-expert names."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate
                out[f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            for e, w in enumerate(t):
                out[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = w
        else:
            out[name] = t
    return out


def _megatron_logits(preset, release_dir) -> torch.Tensor:
    from megatron_dsv3.testing import parallel

    _, _, chunks = parallel.build_chunks(preset, ParallelLayout(), ddp=False)
    parallel.load_weights(chunks, str(release_dir))
    with torch.no_grad():
        return chunks[0](TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    model, mtp = _hf_model(CONFIGS[request.param])
    work = tmp_path_factory.mktemp(f"convert-{request.param}")
    hf_dir = work / "hf"
    written = _save_hf(model, mtp, hf_dir)
    with torch.no_grad():
        expected = model(TOKENS).logits
    out = work / "megatron"
    result = run.hf_to_megatron(hf_dir, out, progress=False)
    return dict(name=request.param, model=model, mtp=mtp, hf_dir=hf_dir, written=written, out=out, result=result,
                expected=expected, work=work)


def test_imported_logits_equal_transformers(converted, megatron_single_process):
    preset = converted["result"].preset
    assert preset.mtp_num_layers == converted["mtp"]
    got = _megatron_logits(preset, converted["out"] / "release")
    assert got.shape == converted["expected"].shape
    assert (got - converted["expected"]).abs().max().item() <= 1e-4


def test_export_gives_the_original_tensors_bit_for_bit(converted, megatron_single_process):
    back = converted["work"] / "hf-back"
    run.megatron_to_hf(converted["out"], back, progress=False)
    original = _per_expert(converted["written"])
    exported = _read_hf(back)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert preset_from_hf_config(json.loads((back / "config.json").read_text())) == preset_from_hf_config(
        json.loads((converted["hf_dir"] / "config.json").read_text()))


def test_export_loads_in_transformers(converted, megatron_single_process):
    """``from_pretrained`` on the exported folder, in this process where Megatron has built models in
    CPU mode, gives the original model's logits exactly."""
    from transformers import DeepseekV3ForCausalLM

    back = converted["work"] / "hf-back-tf"
    run.megatron_to_hf(converted["out"], back, progress=False)
    model = DeepseekV3ForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, converted["expected"])


def test_bf16_round_trip_is_bit_identical(tmp_path, megatron_single_process):
    model, mtp = _hf_model(CONFIGS["mtp"], seed=11)
    written = _save_hf(model, mtp, tmp_path / "hf", dtype=torch.bfloat16)
    run.hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", progress=False)
    run.megatron_to_hf(tmp_path / "megatron", tmp_path / "back", progress=False)
    exported = _read_hf(tmp_path / "back")
    for name, tensor in _per_expert(written).items():
        if name.endswith("e_score_correction_bias"):  # written in float32, as DeepSeek's release has it
            assert exported[name].dtype == torch.float32 and torch.equal(exported[name].to(tensor.dtype), tensor)
        else:
            assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


def _quantise_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 with one scale per 128x128 block (partial blocks at the edges), as DeepSeek releases."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scale = torch.empty(br, bc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s = block.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_imports_within_its_quantisation_error(tmp_path, megatron_single_process):
    # hidden 192 and kv_a rows 32+16=48: partial 128-blocks in both directions.
    model, _ = _hf_model(dict(CONFIGS["dense2-shared2-noq"], hidden_size=192), seed=5)
    written = _per_expert(_save_hf(model, 0, tmp_path / "bf16", dtype=torch.bfloat16))
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    quantised, reference = {}, {}
    for name, t in written.items():
        if t.ndim == 2 and "norm" not in name and "embed_tokens" not in name and "lm_head" not in name \
                and not name.endswith("mlp.gate.weight"):
            q, s = _quantise_fp8(t)
            quantised[name], quantised[name + "_scale_inv"] = q, s
            reference[name] = t.double()
        else:
            quantised[name] = t
    safetensors_torch.save_file(quantised, fp8_dir / "model.safetensors")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    run.hf_to_megatron(fp8_dir, tmp_path / "megatron", dtype="float32", progress=False)
    run.megatron_to_hf(tmp_path / "megatron", tmp_path / "back", progress=False)
    imported = _read_hf(tmp_path / "back")
    for name, ref in reference.items():
        got = imported[name].double()
        # E4M3 keeps 3 mantissa bits: an element's error is at most 2^-4 of its magnitude, or
        # (subnormals) 2^-9 of its block's scale.
        q = quantised[name].double()
        scale = quantised[name + "_scale_inv"].double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        scale = scale[: ref.shape[0], : ref.shape[1]]
        assert torch.equal(got, (q * scale).float().double()), name  # dequantised exactly, blocks aligned
        bound = ref.abs() * 2.0**-4 + scale * 2.0**-9 + 1e-12
        assert ((got - ref).abs() <= bound).all(), name


def _save_with_args(chunks, args, directory: str) -> None:
    """A step folder as Megatron's training loop writes it: the model's shards in this layout and the
    run's arguments (which the exporter reads the model from)."""
    from megatron.core import dist_checkpointing

    from megatron_dsv3.testing import parallel

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save({**parallel._sharded_state_dict(chunks), "args": args}, directory)


def _losses_under(workdir: str, layout: ParallelLayout, preset, release: str, save: str | None = None) -> dict:
    """The converted checkpoint loaded under ``layout``: per-token losses (the stages in order under
    PP; the whole model on each rank's shard under TP/EP, with Megatron's vocab-parallel CE)."""
    from megatron.core import parallel_state

    from megatron_dsv3.testing import parallel

    parallel.init_parallel(layout, preset=preset)
    config, args, chunks = parallel.build_chunks(preset, layout, ddp=False)
    parallel.load_weights(chunks, release)
    batch = next(parallel._microbatches(TOKENS, 2))
    with torch.no_grad():
        if layout.pp > 1:
            loss = parallel.pipeline_forward(chunks, config, batch)
        else:
            loss = chunks[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    if save:
        _save_with_args(chunks, args, save)
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return {"loss": None if loss is None else loss.float(), "last": last or layout.pp == 1}


def _preset_of(hf_dir):
    return preset_from_hf_config(json.loads((hf_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def layouts_source(tmp_path_factory):
    """A 4-layer model with MTP, converted, and its per-token losses in one process."""
    from megatron_dsv3.testing.distributed import run_distributed

    work = tmp_path_factory.mktemp("layouts")
    model, mtp = _hf_model(dict(CONFIGS["mtp"], num_hidden_layers=4), seed=21)
    _save_hf(model, mtp, work / "hf")
    run.hf_to_megatron(work / "hf", work / "megatron", progress=False)
    preset = _preset_of(work / "hf")
    release = str(work / "megatron" / "release")
    reference = run_distributed(_losses_under, 1, str(work), ParallelLayout(), preset, release)[0]["loss"]
    return work, preset, release, reference


@pytest.mark.parametrize("layout", [pytest.param(ParallelLayout(tp=2, sp=True), marks=pytest.mark.slow),
                                    pytest.param(ParallelLayout(ep=2, dp=2), marks=pytest.mark.slow),
                                    ParallelLayout(pp=2), ParallelLayout(tp=2, ep=2, sp=True)],
                         ids=["tp2", "ep2", "pp2", "tp2-ep2"])  # tp2 and ep2 alone: `pytest -m slow`
def test_converted_checkpoint_loads_under_any_layout(layout, layouts_source):
    from megatron_dsv3.testing.distributed import run_distributed

    work, preset, release, reference = layouts_source
    name = f"tp{layout.tp}-ep{layout.ep}-pp{layout.pp}"
    save = str(work / f"saved-{name}") if layout.tp * layout.ep > 1 else None
    results = run_distributed(_losses_under, layout.world_size, str(work), layout, preset, release, save)
    losses = [r["loss"] for r in results if r["loss"] is not None and r["last"]]
    assert losses
    for loss in losses:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    if save:  # saved in this layout's shards, then exported: the original tensors
        back = work / f"back-{name}"
        run.megatron_to_hf(save, back, progress=False)
        exported, original = _read_hf(back), _per_expert(_read_hf(work / "hf"))
        assert set(exported) == set(original)
        assert all(torch.equal(exported[n], original[n]) for n in original)


def test_bad_input_writes_nothing(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(BASE, model_type="deepseek_v3")))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "missing.safetensors"}}))
    with pytest.raises(ConfigError, match="missing.safetensors"):
        run.hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(converted, megatron_single_process):
    with pytest.raises(ConfigError, match="--overwrite"):
        run.hf_to_megatron(converted["hf_dir"], converted["out"], progress=False)
    run.hf_to_megatron(converted["hf_dir"], converted["out"], progress=False, overwrite=True)
    assert (converted["out"] / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, megatron_single_process):
    from megatron_dsv3.convert import hf_reader

    model, mtp = _hf_model(CONFIGS["groups-top4-from-1"], seed=3)
    _save_hf(model, mtp, tmp_path / "hf")
    calls = {"n": 0}
    original = hf_reader.HFCheckpoint.tensor

    def failing(self, name, **kw):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("simulated interruption")
        return original(self, name, **kw)

    monkeypatch.setattr(hf_reader.HFCheckpoint, "tensor", failing)
    with pytest.raises(RuntimeError, match="simulated interruption") as err:
        run.hf_to_megatron(tmp_path / "hf", tmp_path / "out", progress=False, threads=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    assert "removed the partial output" in err.value.__notes__[0]
    monkeypatch.setattr(hf_reader.HFCheckpoint, "tensor", original)
    run.hf_to_megatron(tmp_path / "hf", tmp_path / "out", progress=False)  # a rerun starts cleanly
    assert (tmp_path / "out" / "release" / "metadata.json").exists()
    assert not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("out", ["/proc/x", "/dev/null/x"])
@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_an_unwritable_output_is_refused_in_one_line_before_anything_is_read(tmp_path, capsys, monkeypatch, out,
                                                                            direction):
    from megatron_dsv3 import cli
    from megatron_dsv3.convert import meta_model

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(meta_model, "MetaModel", no_model)
    monkeypatch.setattr(run, "MetaModel", no_model)
    # The source does not exist: the output is checked first.
    assert cli.main(["convert", direction, str(tmp_path / "missing"), out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}" in err and "Fix: choose an output folder" in err, err


def _interrupting(monkeypatch, error: BaseException, at: int = 20):
    from megatron_dsv3.convert import hf_reader

    calls, original = {"n": 0}, hf_reader.HFCheckpoint.tensor

    def tensor(self, name, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            raise error
        return original(self, name, **kw)

    monkeypatch.setattr(hf_reader.HFCheckpoint, "tensor", tensor)


@pytest.mark.parametrize("error,code,message", [
    (KeyboardInterrupt(), 130, "megatron-dsv3: interrupted"),
    (OSError(28, "No space left on device", "/data/x.distcp"), 1,
     "megatron-dsv3: error: No space left on device (/data/x.distcp)"),
], ids=["ctrl-c", "disk-full"])
def test_a_conversion_stopped_midway_says_so_briefly_and_removes_its_partial_folder(
        tmp_path, capsys, monkeypatch, megatron_single_process, error, code, message):
    from megatron_dsv3 import cli

    model, mtp = _hf_model(CONFIGS["groups-top4-from-1"], seed=3)
    _save_hf(model, mtp, tmp_path / "hf")
    capsys.readouterr()
    _interrupting(monkeypatch, error)
    out = tmp_path / "out"
    assert cli.main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(out), "--quiet", "--threads", "1"]) == code
    lines = capsys.readouterr().err.splitlines()
    assert lines == [message, f"megatron-dsv3: removed the partial output {tmp_path / '.out.partial'}; {out} was"
                              " not written"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_keeps_the_sources_token_ids_and_generation_config(tmp_path, megatron_single_process):
    """Read back by transformers' own GenerationConfig and AutoConfig; a checkpoint that records no source
    gets DeepSeek-V3's released ids (bos 0, eos 1) and a note saying so."""
    from transformers import AutoConfig, GenerationConfig

    model, mtp = _hf_model(dict(CONFIGS["groups-top4-from-1"], bos_token_id=5, eos_token_id=7, pad_token_id=3),
                           seed=4)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6  # the source's own, kept
    _save_hf(model, mtp, tmp_path / "hf")
    run.hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", progress=False)
    back = run.megatron_to_hf(tmp_path / "megatron" / "release", tmp_path / "back", progress=False)
    assert back.notes == []
    config, generation = AutoConfig.from_pretrained(tmp_path / "back"), GenerationConfig.from_pretrained(tmp_path / "back")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, 7, 3)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id, generation.temperature) == (
        5, 7, 3, 0.6)
    (tmp_path / "megatron" / "hf_source.json").unlink()  # as a run saved into another folder
    bare = run.megatron_to_hf(tmp_path / "megatron", tmp_path / "bare", progress=False)
    generation = json.loads((tmp_path / "bare" / "generation_config.json").read_text())
    assert generation == {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}
    assert "records no HF source" in bare.notes[0] and "bos 0, eos 1" in bare.notes[0]


def test_cli_converts_and_megatron_dsv3_train_starts_from_it(tmp_path):
    """The commands a user runs: convert a dsv3-tiny-shaped HF checkpoint, train 2 steps from it."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megatron_dsv3.convert.hf_config import hf_config_from_preset
    from megatron_dsv3.model.presets import get_preset

    preset = get_preset("dsv3-tiny")
    config = hf_config_from_preset(preset)
    config.pop("num_nextn_predict_layers", None)
    config.pop("architectures", None)
    config.pop("model_type", None)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    with torch.no_grad():  # a zero head: uniform predictions, so step 1's loss is ln(vocab) if it loaded
        model.lm_head.weight.zero_()
    _save_hf(model, preset.mtp_num_layers, tmp_path / "hf")
    exe = os.path.join(os.path.dirname(sys.executable), "megatron-dsv3")
    out = subprocess.run([exe, "convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                          "--recipe", "dsv3-tiny-cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "MB/s" in out.stdout
    train = subprocess.run([exe, "train", "dsv3-tiny-cpu", f"checkpoint.load={tmp_path / 'ckpt'}",
                            f"checkpoint.save={tmp_path / 'run'}", "training.train_iters=2", "training.lr_warmup_iters=1",
                            "checkpoint.save_interval=2"], capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "loading release distributed checkpoint" in (tmp_path / "run" / "train.log").read_text()
    import math

    assert f"step 1/2 | loss {math.log(preset.vocab_size):.4f}" in train.stdout, train.stdout[-2000:]
    assert (tmp_path / "run" / "iter_0000002").exists()


def test_megatron_checkpoint_is_written_one_parameter_at_a_time(tmp_path, megatron_single_process):
    """The writer asks for each parameter once, holds at most one per thread, and what it writes is
    what Megatron's own reader loads (and what the exporter's reader reads back)."""
    import weakref

    from megatron.core import dist_checkpointing

    from megatron_dsv3.convert.megatron_reader import MegatronCheckpoint
    from megatron_dsv3.convert.megatron_writer import write_checkpoint
    from megatron_dsv3.convert.meta_model import MetaModel, single_process
    from megatron_dsv3.model.build import build_model_chunks
    from megatron_dsv3.model.presets import get_preset

    preset = get_preset("dsv3-tiny")
    with single_process():
        meta = MetaModel(preset, torch.float32)
        assert all(t.is_meta for t in meta.params.values())
        g = torch.Generator().manual_seed(0)
        ref = {n: torch.randn(t.shape, generator=g) for n, t in meta.params.items()}
        calls, alive, peak = {}, set(), [0]

        def source(name):
            calls[name] = calls.get(name, 0) + 1
            t = ref[name].clone()
            alive.add(id(t))
            peak[0] = max(peak[0], len(alive))
            weakref.finalize(t, alive.discard, id(t))
            return t

        write_checkpoint(meta, tmp_path / "ckpt", source, threads=2, file_bytes=1 << 18)
        assert calls == {n: 1 for n in ref}
        assert peak[0] <= 3
        _, (model,) = build_model_chunks(meta.args, wrap_with_ddp=False)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(tmp_path / "ckpt" / "release"))
        model.load_state_dict(state["model"], strict=True)
        for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in ref]:
            assert torch.equal(t, ref[name]), name
        ckpt = MegatronCheckpoint(tmp_path / "ckpt")
        buffers = {n: torch.empty_like(r) for n, r in ref.items()}
        ckpt.read([(piece, buffers[piece.name]) for piece in meta.pieces])
        assert all(torch.equal(buffers[n], ref[n]) for n in ref)


def test_model_arguments_invert_to_the_preset():
    import dataclasses

    from megatron_dsv3.args.compose import megatron_argv, preset_from_args
    from megatron_dsv3.args.settings import parse_megatron_args
    from megatron_dsv3.model.presets import PRESETS

    for name, preset in PRESETS.items():
        back = preset_from_args(parse_megatron_args(megatron_argv(preset, backend="local", cpu=True)))
        assert dataclasses.replace(back, name=preset.name, description=preset.description) == preset, name


def test_exporting_a_folder_that_is_not_a_checkpoint_says_what_to_give(tmp_path):
    with pytest.raises(ConfigError, match="neither a Megatron save folder"):
        run.megatron_to_hf(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40")
    with pytest.raises(ConfigError, match="iter_0000040"):
        run.megatron_to_hf(tmp_path, tmp_path / "out", progress=False)


def test_docs_name_table_is_the_code_table():
    from pathlib import Path

    from megatron_dsv3.model.hf_names import markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
    section = doc.split("<!-- names:begin -->\n", 1)[1].split("<!-- names:end -->", 1)[0]
    assert section == markdown(), "docs/checkpoints.md names section is stale: regenerate it from hf_names.markdown()"


def test_convert_with_a_recipe_validates_its_layout_as_megatron_dsv3_args_does(tmp_path):
    """EP 3 does not divide 16 experts: refused before the checkpoint (here absent) is read, with the error `args` gives."""
    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.recipe import load_recipe

    overrides = ["model.mtp_num_layers=0", "parallel.ep=3"]
    with pytest.raises(ConfigError) as by_args:
        recipe_argv(load_recipe("dsv3-tiny-cpu", overrides))
    with pytest.raises(ConfigError) as by_convert:
        run.hf_to_megatron(tmp_path / "absent", tmp_path / "out", recipe="dsv3-tiny-cpu", overrides=overrides)
    assert str(by_convert.value) == str(by_args.value) and "parallel.ep=3 does not divide" in str(by_args.value)
