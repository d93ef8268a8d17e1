"""The HuggingFace side of the checkpoint converter: config mapping, checked reader, streaming writer.

References: transformers 5's ``DeepseekV3Config`` / ``DeepseekV3ForCausalLM`` (from PyPI), DeepSeek's
released ``config_671B.json`` fields, safetensors' own ``save_file`` / ``safe_open`` for the files
the reader is given and reads back, and a float64 computation for FP8 dequantisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import threading
import weakref

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_dsv3.convert.hf_config import (  # noqa: E402
    TRAINING_ONLY,
    check_against,
    hf_config_from_preset,
    preset_from_hf_config,
)
from megatron_dsv3.convert.hf_reader import HFCheckpoint, dequantize_fp8  # noqa: E402
from megatron_dsv3.convert.hf_writer import write_hf_checkpoint  # noqa: E402
from megatron_dsv3.errors import ConfigError  # noqa: E402
from megatron_dsv3.model.hf_names import hf_shapes  # noqa: E402
from megatron_dsv3.model.presets import PRESETS, get_preset  # noqa: E402

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

# 2 layers (1 dense, 1 MoE of 8 experts in 2 groups) + an MTP layer; small enough to write in ms.
SMALL = get_preset("dsv3-tiny").with_overrides(
    num_layers=2, hidden_size=64, vocab_size=256, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_size=96, num_routed_experts=8,
    moe_ffn_hidden_size=32, moe_router_topk=2, num_groups=2, group_topk=1)

# DeepSeek-V3's released config.json (config_671B.json in DeepSeek-V3/inference/configs and the
# Hugging Face repository deepseek-ai/DeepSeek-V3), its fields as published.
RELEASED_671B = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


# DeepSeek-V2-Lite's released config.json (deepseek-ai/DeepSeek-V2-Lite), its fields as published.
RELEASED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def _model_fields(p):
    return {k: v for k, v in dataclasses.asdict(p).items() if k not in TRAINING_ONLY}


# ---- config mapping ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_its_config_json(name):
    p = PRESETS[name]
    back = preset_from_hf_config(json.loads(json.dumps(hf_config_from_preset(p))), name=p.name)
    assert dataclasses.replace(back, description=p.description) == p


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_saved_by_transformers_maps_to_the_same_model(name):
    from transformers import DeepseekV2Config, DeepseekV3Config

    p = PRESETS[name]
    config = hf_config_from_preset(p)
    cls = DeepseekV3Config if config.pop("model_type") == "deepseek_v3" else DeepseekV2Config
    config.pop("architectures")
    saved = json.loads(cls(**config).to_json_string())  # transformers 5: rope_parameters, dtype, ...
    assert _model_fields(preset_from_hf_config(saved)) == _model_fields(p)


def test_released_671b_config_is_the_deepseek_v3_preset():
    got = preset_from_hf_config(RELEASED_671B)
    assert _model_fields(got) == _model_fields(get_preset("deepseek-v3"))
    assert got.seq_length == 163840 and got.init_method_std == 0.02 and got.seq_aux_loss_coeff == 0.001


def test_released_v2_lite_config_is_the_deepseek_v2_lite_preset():
    assert _model_fields(preset_from_hf_config(RELEASED_V2_LITE)) == _model_fields(get_preset("deepseek-v2-lite"))


@pytest.mark.parametrize("field, value, shown, words", [
    ("moe_layer_freq", 2, "moe_layer_freq=2", "every layer is MoE"),
    ("hidden_act", "gelu", "hidden_act='gelu'", "SwiGLU"),
    ("attention_bias", True, "attention_bias=True", "no bias"),
    ("num_key_value_heads", 64, "num_key_value_heads=64", "one key/value per head"),
    ("rope_interleave", False, "rope_interleave=False", "interleaved"),
    ("scoring_func", "softmax", "scoring_func='softmax'", "sigmoid"),
    ("topk_method", "greedy", "topk_method='greedy'", "noaux_tc"),
    ("quantization_config", {"quant_method": "awq", "bits": 4}, "quant_method='awq'", "block-wise FP8"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [1, 128]},
     "weight_block_size=[1, 128]", "128x128"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_type='linear'", "plain RoPE or YaRN"),
    ("rope_scaling", {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "original_max_position_embeddings": 4096}, "mscale_all_dim=None", "YaRN needs it"),
    ("model_type", "llama", "model_type='llama'", "DeepSeek-V3 and DeepSeek-V2"),
    ("sliding_window", 4096, "unknown field 'sliding_window'", "may change the model"),
    ("qk_head_dim", 100, "qk_head_dim=100", "derived"),
])
def test_each_field_we_cannot_represent_is_refused_by_name_and_value(field, value, shown, words):
    config = dict(RELEASED_671B, **{field: value})
    with pytest.raises(ConfigError) as err:
        preset_from_hf_config(config, where="ckpt/config.json")
    text = str(err.value)
    assert text.startswith("ckpt/config.json: ") and shown in text and words in text and "Fix: " in text


def test_v2_group_limited_greedy_with_groups_is_refused_but_v2_lite_converts():
    v2 = hf_config_from_preset(get_preset("deepseek-v2-lite"))
    assert v2["model_type"] == "deepseek_v2"
    with pytest.raises(ConfigError, match="topk_method='group_limited_greedy'.*best expert"):
        preset_from_hf_config(dict(v2, topk_method="group_limited_greedy", n_group=8, topk_group=3))
    with pytest.raises(ConfigError, match="num_groups"):
        hf_config_from_preset(get_preset("deepseek-v2-lite").with_overrides(num_groups=2, group_topk=1))


def test_check_against_names_every_contradiction_and_skips_training_fields():
    hf = get_preset("deepseek-v3")
    check_against(hf, hf.with_overrides(seq_length=8192, init_method_std=0.02, mtp_loss_scaling_factor=0.1,
                                        expert_bias_update_rate=0.0, seq_aux_loss_coeff=0.0, name="x"), where="r")
    with pytest.raises(ConfigError) as err:
        check_against(hf, hf.with_overrides(num_routed_experts=128, hidden_size=4096), where="recipe.yaml")
    text = str(err.value)
    assert "num_routed_experts: checkpoint 256, recipe 128" in text
    assert "hidden_size: checkpoint 7168, recipe 4096" in text and text.startswith("recipe.yaml")


# ---- a small checkpoint written by safetensors itself ------------------------------------------
def _tensors(p, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(p).items():
        t = torch.randn(shape, generator=g)
        out[name] = t.float() if name.endswith("e_score_correction_bias") else t.to(dtype)
    return out


def _release(path, p, tensors, *, shards=3, config=None):
    """The released layout, written with safetensors.torch.save_file: shards and an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or hf_config_from_preset(p)))
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        safetensors_torch.save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def release(tmp_path):
    tensors = _tensors(SMALL)
    return _release(tmp_path / "hf", SMALL, tensors), tensors


def test_reader_reads_every_tensor_as_written(release):
    path, tensors = release
    ckpt = HFCheckpoint.open(path, recipe_preset=SMALL)
    assert set(ckpt.names()) == set(tensors) and ckpt.has_mtp and not ckpt.fp8 and ckpt.dtype == torch.bfloat16
    assert "model.layers.2.embed_tokens.weight" in ckpt.names()  # the MTP layer's copy: known, not required
    for name, t in tensors.items():
        got = ckpt.tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
        assert ckpt.nbytes(name) == t.nbytes and name in json.loads(
            (path / "model.safetensors.index.json").read_text())["weight_map"]
    assert ckpt.shard_of("lm_head.weight").name.startswith("model-0000")


def test_read_tensors_own_their_memory(release):
    """Rewriting the shard in place (same inode) after a read leaves the tensor read unchanged."""
    path, tensors = release
    ckpt = HFCheckpoint.open(path)
    name = "model.embed_tokens.weight"
    got = ckpt.tensor(name)
    shard = ckpt.shard_of(name)
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    with open(shard, "r+b") as f:
        f.seek(8 + n)
        f.write(b"\0" * (shard.stat().st_size - 8 - n))
    assert torch.equal(got, tensors[name])


def test_concurrent_reads_from_threads_agree_with_sequential(release):
    path, tensors = release
    ckpt = HFCheckpoint.open(path)
    names = ckpt.names()
    results, errors = {}, []

    def work(part):
        try:
            for n in part:
                results[n] = ckpt.tensor(n)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(results[n], tensors[n]) for n in names)


def test_packed_experts_read_equal_to_per_expert(tmp_path, release):
    """transformers 5's packed form ([E, 2I, H] gate_up, [E, H, I] down) reads as the released names."""
    _, tensors = release
    packed = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts."
        e = range(SMALL.num_routed_experts)
        packed[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{prefix}{i}.gate_proj.weight"], tensors[f"{prefix}{i}.up_proj.weight"]]) for i in e])
        packed[prefix + "down_proj"] = torch.stack([tensors[f"{prefix}{i}.down_proj.weight"] for i in e])
    ckpt = HFCheckpoint.open(_release(tmp_path / "packed", SMALL, packed, shards=2))
    assert set(ckpt.names()) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(ckpt.tensor(name), t), name
        assert ckpt.nbytes(name) == t.nbytes, name


# ---- bad input: each error names the file and the tensor ---------------------------------------
def _open_error(path) -> str:
    with pytest.raises(ConfigError) as err:
        HFCheckpoint.open(path)
    return str(err.value)


def test_missing_shard_is_named_with_a_tensor_it_should_hold(release):
    path, _ = release
    (path / "model-00002-of-00003.safetensors").unlink()
    text = _open_error(path)
    assert "model-00002-of-00003.safetensors" in text and "does not exist" in text and "model." in text


def test_index_naming_an_absent_file_is_refused(release):
    path, _ = release
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    text = _open_error(path)
    assert "model-00009-of-00009.safetensors" in text and "lm_head.weight" in text


def test_truncated_shard_is_refused_naming_file_and_tensor(release):
    path, _ = release
    shard = path / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    text = _open_error(path)
    assert "model-00001-of-00003.safetensors is truncated: tensor" in text and "model." in text


def test_unknown_tensor_name_is_refused_with_a_suggestion(tmp_path, release):
    _, tensors = release
    bad = dict(tensors)
    bad["model.layers.1.self_attn.q_a_proj.wieght"] = bad.pop("model.layers.1.self_attn.q_a_proj.weight")
    text = _open_error(_release(tmp_path / "bad", SMALL, bad))
    assert "holds model.layers.1.self_attn.q_a_proj.wieght" in text and ".safetensors" in text
    assert "did you mean 'model.layers.1.self_attn.q_a_proj.weight'" in text


def test_missing_tensor_is_named_with_its_shard(tmp_path, release):
    _, tensors = release
    bad = {n: t for n, t in tensors.items() if n != "model.layers.1.mlp.experts.5.up_proj.weight"}
    text = _open_error(_release(tmp_path / "bad", SMALL, bad))
    assert "no tensor model.layers.1.mlp.experts.5.up_proj.weight" in text
    assert "model-0000" in text and "model.layers.1" in text


def test_wrong_shape_is_refused_naming_file_tensor_and_both_shapes(tmp_path, release):
    _, tensors = release
    bad = dict(tensors, **{"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(10, 16, dtype=torch.bfloat16)})
    text = _open_error(_release(tmp_path / "bad", SMALL, bad))
    assert "model.layers.0.self_attn.kv_b_proj.weight has shape [10, 16], config.json gives [64, 16]" in text
    assert ".safetensors" in text


def test_unsupported_dtype_is_refused(tmp_path, release):
    _, tensors = release
    bad = dict(tensors, **{"model.norm.weight": tensors["model.norm.weight"].double()})
    text = _open_error(_release(tmp_path / "bad", SMALL, bad))
    assert "model.norm.weight is F64" in text and ".safetensors" in text


def test_pickle_checkpoint_is_refused_without_being_loaded(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config_from_preset(SMALL)))
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    text = _open_error(path)
    assert "pytorch_model.bin" in text and "never read" in text and "safetensors" in text


def test_unparseable_config_and_mtp_tensors_beyond_the_config_are_refused(tmp_path, release):
    path, tensors = release
    (path / "config.json").write_text(json.dumps(hf_config_from_preset(SMALL.with_overrides(mtp_num_layers=0))))
    text = _open_error(path)
    assert "model.layers.2." in text and "num_nextn_predict_layers=0" in text
    (path / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in _open_error(path)


def test_recipe_that_contradicts_the_checkpoint_is_refused(release):
    path, _ = release
    with pytest.raises(ConfigError, match="num_routed_experts: checkpoint 8, recipe 16"):
        HFCheckpoint.open(path, recipe_preset=SMALL.with_overrides(num_routed_experts=16))


# ---- FP8 -------------------------------------------------------------------------------------------
def _quantise(w: torch.Tensor):
    """E4M3 with one scale per 128x128 block, amax / 448 (DeepSeek-V3 section 3.3), in the test."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            s = float(block.abs().max().clamp(min=1e-12)) / 448.0
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j].double()).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("shape", [(576, 128), (100, 300), (256, 384)])
def test_fp8_dequantisation_matches_a_float64_reference(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64)
    q, scale = _quantise(w)
    got = dequantize_fp8(q, scale, torch.float32)
    s = scale.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    exact = q.double() * s
    assert torch.equal(got.double(), exact.float().double())  # each block's own scale, rounded once
    # E4M3 keeps 3 mantissa bits (relative error <= 2^-4) down to its subnormals (step 2^-9 x scale).
    assert ((got.double() - w).abs() <= w.abs() * 2.0**-4 + s * 2.0**-9).all()
    assert torch.equal(dequantize_fp8(q, scale, torch.bfloat16), exact.float().to(torch.bfloat16))


def test_fp8_checkpoint_reads_dequantised_in_its_dtype(tmp_path):
    p = SMALL.with_overrides(hidden_size=192, kv_lora_rank=120)  # 128-blocks split the 192 and 128 edges
    tensors = _tensors(p, seed=3)
    stored, reference = {}, {}
    for name, t in tensors.items():
        if t.ndim == 2 and not name.endswith(("embed_tokens.weight", "head.weight", "mlp.gate.weight")):
            q, s = _quantise(t.double())
            stored[name], stored[name + "_scale_inv"] = q, s
            # Independent of the reader: each code times its block's scale, exact in float64, rounded once.
            big = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
            reference[name] = (q.double() * big).to(torch.float32)
        else:
            stored[name] = t
    config = dict(hf_config_from_preset(p), quantization_config=RELEASED_671B["quantization_config"])
    ckpt = HFCheckpoint.open(_release(tmp_path / "fp8", p, stored, config=config))
    assert ckpt.fp8 and ckpt.dtype == torch.bfloat16 and "_scale_inv" not in "".join(ckpt.names())
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 128 rows x 192 columns: a 1.5-block row
    assert ckpt.nbytes(name) == 128 * 192 + 4 * 1 * 2
    for name, ref in reference.items():
        assert torch.equal(ckpt.tensor(name), ref.to(torch.bfloat16)), name
        assert torch.equal(ckpt.tensor(name, dtype=torch.float32), ref), name
    # An FP8 weight without its scales, or with scales of the wrong shape, is refused.
    del stored["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    text = _open_error(_release(tmp_path / "noscale", p, stored, config=config))
    assert "model.layers.0.self_attn.o_proj.weight is F8_E4M3 without its block scales" in text
    stored["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    text = _open_error(_release(tmp_path / "badscale", p, stored, config=config))
    assert "o_proj.weight_scale_inv is F32 [1, 1]" in text and "F32 [2, 1]" in text


# ---- the writer ---------------------------------------------------------------------------------------
def _plan(tensors):
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_writer_round_trip_is_bit_identical(tmp_path, dtype):
    from safetensors import safe_open

    tensors = _tensors(SMALL, dtype=dtype, seed=4)
    out = write_hf_checkpoint(tmp_path / "out", SMALL, iter(tensors.items()), plan=_plan(tensors),
                              max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for file in files:  # safetensors' own reader
        with safe_open(str(out / file), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file and torch.equal(f.get_tensor(name), tensors[name]), name
    ckpt = HFCheckpoint.open(out)
    assert _model_fields(ckpt.preset) == _model_fields(SMALL) and ckpt.dtype == dtype
    assert all(torch.equal(ckpt.tensor(n), t) for n, t in tensors.items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    tensors = _tensors(SMALL, seed=5)
    alive, peak = set(), [0]

    def stream():
        for name, t in tensors.items():
            t = t.clone()
            alive.add(id(t))
            weakref.finalize(t, alive.discard, id(t))
            peak[0] = max(peak[0], len(alive))
            yield name, t
            del t

    write_hf_checkpoint(tmp_path / "out", SMALL, stream(), plan=_plan(tensors), max_shard_bytes=1 << 30)
    assert peak[0] == 1  # one shard holds every tensor, yet only one was ever alive


def test_writer_checks_each_tensor_against_the_plan(tmp_path):
    tensors = _tensors(SMALL, seed=6)
    plan = _plan(tensors)
    wrong = dict(tensors, **{"model.norm.weight": tensors["model.norm.weight"].float()})
    with pytest.raises(ValueError, match=r"expected model.norm.weight \[64\] torch.bfloat16.*torch.float32"):
        write_hf_checkpoint(tmp_path / "a", SMALL, iter(wrong.items()), plan=plan)
    with pytest.raises(ValueError, match="ended before the plan"):
        write_hf_checkpoint(tmp_path / "b", SMALL, iter(list(tensors.items())[:-1]), plan=plan)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_interrupted_write_removes_its_temporary_folder_and_a_rerun_succeeds(tmp_path):
    tensors = _tensors(SMALL, seed=7)
    out = tmp_path / "out"

    def failing():
        for i, item in enumerate(tensors.items()):
            if i == 20:
                assert (tmp_path / ".out.partial").is_dir()  # shards were being written there
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt) as err:
        write_hf_checkpoint(out, SMALL, failing(), plan=_plan(tensors), max_shard_bytes=40_000)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    assert err.value.__notes__ == [f"removed the partial output {tmp_path / '.out.partial'}; {out} was not written"]
    write_hf_checkpoint(out, SMALL, iter(tensors.items()), plan=_plan(tensors), max_shard_bytes=40_000)
    assert not (tmp_path / ".out.partial").exists()
    assert set(HFCheckpoint.open(out).names()) == set(tensors)


def test_existing_output_is_refused_then_replaced_only_with_overwrite(tmp_path):
    tensors = _tensors(SMALL, seed=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty.*--overwrite"):
        write_hf_checkpoint(out, SMALL, iter(tensors.items()), plan=_plan(tensors))
    assert (out / "keep.txt").exists()
    write_hf_checkpoint(out, SMALL, iter(tensors.items()), plan=_plan(tensors), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_written_checkpoint_loads_in_transformers_from_pretrained(tmp_path):
    """transformers packs the per-expert names on load; its state dict is the source model's."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    p = SMALL.with_overrides(mtp_num_layers=0)
    config = hf_config_from_preset(p, dtype="float32")
    config.pop("architectures"), config.pop("model_type")
    torch.manual_seed(0)
    source = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for _, t in source.named_parameters():
            t.normal_(0, 0.05)
        for layer in source.model.layers[p.first_k_dense:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    state = source.state_dict()
    released = {}
    for name in (n for m in __import__("megatron_dsv3.model.hf_names", fromlist=["x"]).name_table(p) for n in m.hf):
        prefix, _, rest = name.partition(".mlp.experts.")
        if rest:
            e, kind = int(rest.split(".")[0]), rest.split(".")[1]
            if kind == "down_proj":
                released[name] = state[f"{prefix}.mlp.experts.down_proj"][e]
            else:
                gate, up = state[f"{prefix}.mlp.experts.gate_up_proj"][e].chunk(2)
                released[name] = gate if kind == "gate_proj" else up
        else:
            released[name] = state[name]
    write_hf_checkpoint(tmp_path / "out", p, iter(released.items()), plan=_plan(released), max_shard_bytes=60_000)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    got = loaded.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[n], state[n]) for n in state)
    tokens = torch.randint(0, p.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, source(tokens).logits)
