"""What a released HuggingFace DeepSeek-V3/V2 checkpoint folder holds, checked whole before anything is read.

The layout is DeepSeek's release (https://huggingface.co/deepseek-ai/DeepSeek-V3: ``config.json``,
``model.safetensors.index.json`` and 163 shards): per-expert names, FP8 E4M3 weights each with an
fp32 ``weight_scale_inv`` of one scale per 128x128 block (DeepSeek-V3 paper, section 3.3), the MTP
module as layer ``num_hidden_layers`` holding copies of the embedding and the output head.  The
names and shapes are those of :func:`megatron_dsv3.model.hf_names.hf_shapes`, the one name table.
transformers 5's packed expert form (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``mlp.experts.down_proj`` ``[E, H, I]``, ``DeepseekV3Experts`` in ``modeling_deepseek_v3.py``) is
accepted too, and shown under the per-expert names.  Only safetensors files are read: a pickle
(``*.bin``, ``*.pt``) could run code when loaded.

:func:`check_layout` checks the config (and the recipe, if one is given), the index, every shard's
header and size, every tensor's name, presence, shape and dtype, and every FP8 weight's scales, so
a conversion writes nothing from bad input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from megatron_dsv3.convert.hf_config import FP8_BLOCK, check_against, fp8_block_size, preset_from_hf_config
from megatron_dsv3.convert.safetensors_format import DTYPES, Entry, read_header
from megatron_dsv3.errors import ConfigError, did_you_mean
from megatron_dsv3.model.hf_names import hf_shapes, mtp_copies
from megatron_dsv3.model.presets import ModelPreset

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE = "_scale_inv"  # "<name>.weight" + SCALE: the FP8 weight's block scales
# Tensors a checkpoint may hold that carry no weights (transformers 4 saved rotary frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLES_EXT = (".bin", ".pt", ".pth", ".ckpt")
_PICKLES = tuple("*" + ext for ext in _PICKLES_EXT)
_PACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")

Sources = dict[str, tuple[str, int | None, int | None]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checked checkpoint folder: its config and model, every stored tensor -> (shard, header
    entry), every released name -> (stored name, expert of a packed tensor or None, gate/up half or
    None), and whether it holds the MTP layer."""

    config: dict
    preset: ModelPreset
    stored: dict[str, tuple[Path, Entry]]
    sources: Sources
    has_mtp: bool


def check_layout(path: Path, *, recipe_preset: ModelPreset | None = None) -> Layout:
    """``path`` checked whole (see the module docstring); a :class:`ConfigError` names the first problem."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory", fix="give the folder holding config.json and the"
                          " *.safetensors shards", where=str(path))
    config = _read_config(path)
    where = str(path / "config.json")
    preset = preset_from_hf_config(config, where=where)
    if recipe_preset is not None:
        check_against(preset, recipe_preset, where=where)
    fp8 = fp8_block_size(config, where=where) is not None
    stored = _stored_tensors(path)
    expected = hf_shapes(preset)
    sources = _check_names(path, preset, stored, expected)
    has_mtp = _check_present(path, preset, stored, sources, expected)
    _check_shapes_and_dtypes(preset, stored, sources, expected, fp8)
    return Layout(config, preset, stored, sources, has_mtp)


def suggest(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` in ``name``'s layer, or nothing."""
    layer = re.match(r"model\.layers\.\d+\.", name)
    near = [c for c in choices if (c.startswith(layer.group(0)) if layer else ".layers." not in c)]
    close = did_you_mean(name, near)
    return f" (did you mean {close!r}?)" if close else ""


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json", fix="give the folder of a HuggingFace checkpoint (config.json"
                          " next to the *.safetensors shards)", where=str(path))
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"config.json is not valid JSON ({err})", fix="restore the checkpoint's config.json",
                          where=str(file)) from None


def _refuse_pickles(path: Path, why: str) -> None:
    pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
    raise ConfigError(f"{why}" + (f"; it has pickle files ({', '.join(pickles[:3])}), which are never read (loading"
                                  " a pickle can run arbitrary code)" if pickles else ""),
                      fix="give the safetensors release (config.json, model.safetensors.index.json and its shards), or"
                          " convert the pickles to safetensors in a sandbox first", where=str(path))


def _stored_tensors(path: Path) -> dict[str, tuple[Path, Entry]]:
    """Every stored tensor -> (its shard, its header entry); the index and the shards agree."""
    index_file = path / INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise ConfigError(f"{INDEX} is not an index (a JSON object with a 'weight_map')",
                              fix="restore the checkpoint's index file", where=str(index_file)) from None
        shards = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                if isinstance(file, str) and file.endswith(_PICKLES_EXT):
                    _refuse_pickles(path, f"{INDEX} maps {name} to the pickle {file}")
                raise ConfigError(f"{INDEX} maps {name} to {file!r}, not a .safetensors file in this folder",
                                  fix="restore the checkpoint's index file", key=name, where=str(index_file))
            shards.setdefault(file, []).append(name)
    elif (path / SINGLE).is_file():
        weight_map, shards = None, {SINGLE: None}
    else:
        _refuse_pickles(path, f"{path} has neither {INDEX} nor {SINGLE}")
    stored: dict[str, tuple[Path, Entry]] = {}
    for file, names in shards.items():
        shard = path / file
        if not shard.is_file():
            raise ConfigError(f"{INDEX} names the shard {file}, which does not exist (it should hold {names[0]}"
                              f"{f' and {len(names) - 1} more tensors' if len(names) > 1 else ''})",
                              fix=f"download {file} again", key=names[0], where=str(index_file))
        entries = read_header(shard)
        for name in names or []:
            if name not in entries:
                raise ConfigError(f"{INDEX} puts {name} in {file}, whose header has no such tensor",
                                  fix=f"download {file} again, or restore the index", key=name, where=str(shard))
        for name, entry in entries.items():
            if weight_map is not None and weight_map.get(name) not in (None, file):
                continue  # the index places this name in another shard; that copy is the one read
            if name in stored:
                raise ConfigError(f"{name} is stored twice, in {stored[name][0].name} and {file}",
                                  fix="remove one copy", key=name, where=str(shard))
            stored[name] = (shard, entry)
    return stored


def _check_names(path: Path, p: ModelPreset, stored: dict, expected: dict) -> Sources:
    """Released name -> (stored name, expert or None, gate/up half or None); unknown names refused."""
    sources: Sources = {}
    for name, (shard, entry) in stored.items():
        if name in expected:
            sources[name] = (name, None, None)
            continue
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name.endswith(SCALE) and name[: -len(SCALE)] in expected:
            continue  # checked with its weight
        packed = _PACKED.match(name)
        if packed and f"{packed.group(1)}0.down_proj.weight" in expected:
            prefix = packed.group(1)
            for e in range(p.num_routed_experts):
                if packed.group(2) == "down_proj":
                    sources[f"{prefix}{e}.down_proj.weight"] = (name, e, None)
                else:
                    sources[f"{prefix}{e}.gate_proj.weight"] = (name, e, 0)
                    sources[f"{prefix}{e}.up_proj.weight"] = (name, e, 1)
            continue
        hint = ""
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= p.num_layers + p.mtp_num_layers:
            hint = (f" (config.json has num_hidden_layers={p.num_layers} and num_nextn_predict_layers="
                    f"{p.mtp_num_layers}, so layers stop at {p.num_layers + p.mtp_num_layers - 1})")
        raise ConfigError(f"{shard.name} holds {name}, which is not a tensor of this model{hint}"
                          f"{suggest(name, list(expected))}",
                          fix="give a DeepSeek-V3/V2 checkpoint whose config.json describes its tensors", key=name,
                          where=str(shard))
    mixed = [n for n, (s, e, _) in sources.items() if e is not None and n in stored]
    if mixed:
        raise ConfigError(f"{mixed[0]} is stored both per expert and packed ({sources[mixed[0]][0]})",
                          fix="keep one of the two forms", key=mixed[0], where=str(stored[mixed[0]][0]))
    return sources


def _check_present(path: Path, p: ModelPreset, stored: dict, sources: Sources, expected: dict) -> bool:
    """Every tensor of the model is there (the MTP layer may be absent as a whole, its copies of the
    embedding and the head are not required); returns has_mtp."""
    mtp_prefix = f"model.layers.{p.num_layers}."
    copies = {n for n, _ in mtp_copies(p)}
    required = [n for n in expected if n not in copies]
    if p.tie_embeddings:
        required.remove("lm_head.weight")
    mtp_names = [n for n in required if n.startswith(mtp_prefix)] if p.mtp_num_layers else []
    has_mtp = any(n in sources for n in mtp_names)
    for name in required:
        if name in sources or (name in mtp_names and not has_mtp):
            continue
        raise ConfigError(f"the checkpoint has no tensor {name} (expected in {_expected_shard(path, name, stored)})",
                          fix="download the missing shard again, or give a checkpoint whose config.json matches its"
                              " tensors", key=name, where=str(path))
    return has_mtp


def _expected_shard(path: Path, name: str, stored: dict) -> str:
    """The shard the index assigns ``name`` to, else the shard holding its neighbours."""
    index_file = path / INDEX
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if name in weight_map:
            return weight_map[name]
        layer = re.match(r"model\.layers\.\d+\.", name)
        prefix = layer.group(0) if layer else "model."
        for other, file in weight_map.items():
            if other.startswith(prefix):
                return f"{file}, which holds the rest of {prefix.rstrip('.')}"
    shards = sorted({shard.name for shard, _ in stored.values()})
    return ", ".join(shards) or SINGLE


def _check_shapes_and_dtypes(p: ModelPreset, stored: dict, sources: dict, expected: dict, fp8: bool) -> None:
    for name, (stored_name, expert, _) in sources.items():
        shard, entry = stored[stored_name]
        if expert is None:
            want = expected[name]
        else:
            want = _packed_shape(p, stored_name, expected)
        where = str(shard)
        if entry.shape != tuple(want):
            raise ConfigError(f"{shard.name}: {stored_name} has shape {list(entry.shape)}, config.json gives"
                              f" {list(want)}", fix="give a checkpoint whose config.json matches its tensors",
                              key=stored_name, where=where)
        if entry.dtype not in DTYPES:
            raise ConfigError(f"{shard.name}: {stored_name} is {entry.dtype}", fix="give a checkpoint in BF16, F16,"
                              " F32, or DeepSeek's FP8 (F8_E4M3 with weight_scale_inv)", key=stored_name, where=where)
        scale = stored.get(stored_name + SCALE)
        if entry.dtype == "F8_E4M3":
            _check_scale(stored_name, shard, entry, scale, fp8)
        elif scale is not None:
            raise ConfigError(f"{scale[0].name}: {stored_name}{SCALE} scales {stored_name}, which is {entry.dtype},"
                              " not FP8", fix="remove the scale, or store the weight in F8_E4M3",
                              key=stored_name + SCALE, where=str(scale[0]))
    shard, embedding = stored["model.embed_tokens.weight"]
    if embedding.dtype == "F8_E4M3":  # its dtype is the checkpoint's (HFCheckpoint.dtype)
        raise ConfigError(f"{shard.name}: model.embed_tokens.weight is F8_E4M3; DeepSeek's release keeps it in BF16",
                          fix="give the embedding in BF16, F16 or F32", key="model.embed_tokens.weight",
                          where=str(shard))


def _packed_shape(p: ModelPreset, stored_name: str, expected: dict) -> tuple[int, ...]:
    """transformers 5's packing of a layer's experts: ``down_proj`` stacks their ``down_proj``,
    ``gate_up_proj`` their ``gate_proj`` and ``up_proj`` rows ([E, 2I, H])."""
    prefix, kind = stored_name.rsplit(".", 1)
    if kind == "down_proj":
        return (p.num_routed_experts, *expected[f"{prefix}.0.down_proj.weight"])
    gate, up = expected[f"{prefix}.0.gate_proj.weight"], expected[f"{prefix}.0.up_proj.weight"]
    return (p.num_routed_experts, gate[0] + up[0], *gate[1:])


def _check_scale(name: str, shard: Path, entry: Entry, scale, fp8: bool) -> None:
    fix = "give DeepSeek's FP8 release as published (config.json with its quantization_config, every FP8 weight" \
          " with its F32 weight_scale_inv)"
    if not fp8:
        raise ConfigError(f"{shard.name}: {name} is F8_E4M3 but config.json has no quantization_config", fix=fix,
                          key=name, where=str(shard))
    if scale is None or len(entry.shape) != 2:
        raise ConfigError(f"{shard.name}: {name} is F8_E4M3 without its block scales {name}{SCALE}", fix=fix,
                          key=name, where=str(shard))
    rows, cols = entry.shape
    want = (math.ceil(rows / FP8_BLOCK[0]), math.ceil(cols / FP8_BLOCK[1]))
    if scale[1].dtype != "F32" or scale[1].shape != want:
        raise ConfigError(f"{scale[0].name}: {name}{SCALE} is {scale[1].dtype} {list(scale[1].shape)}, the scales of"
                          f" a {rows}x{cols} weight in 128x128 blocks are F32 {list(want)}", fix=fix,
                          key=name + SCALE, where=str(scale[0]))
