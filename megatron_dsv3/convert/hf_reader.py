"""A HuggingFace DeepSeek-V3/V2 checkpoint, checked whole when opened and read one tensor at a time.

The layout is the released one (DeepSeek-V3's ``config.json`` + ``model.safetensors.index.json`` +
163 shards; see ``../shared/FACTS.md``, "HuggingFace checkpoint conversion anchors"): per-expert
names, FP8 E4M3 weights each with an fp32 ``weight_scale_inv`` of one scale per 128x128 block
(DeepSeek-V3 section 3.3), the MTP module as layer ``num_hidden_layers``.  transformers 5's packed
expert form (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``,
``DeepseekV3Experts`` in ``modeling_deepseek_v3.py``) is read too, and shown under the per-expert
names.  Only safetensors files are read: a pickle (``*.bin``, ``*.pt``) could run code when loaded.

:meth:`HFCheckpoint.open` checks the config, the index, every shard's header and size, every
tensor's name, presence, shape and dtype (and the recipe, if one is given) before returning, so a
conversion writes nothing from bad input.  The MTP layer of the release also stores copies of the
embedding and the output head (:func:`megatron_dsv3.model.hf_names.mtp_copies`); they are known
names but not required.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import threading
from pathlib import Path

import torch

from megatron_dsv3.convert.hf_config import FP8_BLOCK, check_against, fp8_block_size, preset_from_hf_config
from megatron_dsv3.convert.safetensors_format import DTYPES, Entry, read_header
from megatron_dsv3.errors import ConfigError, did_you_mean
from megatron_dsv3.model.hf_names import mtp_copies, name_table
from megatron_dsv3.model.presets import ModelPreset

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE = "_scale_inv"  # "<name>.weight" + SCALE: the FP8 weight's block scales
# Tensors a checkpoint may hold that carry no weights (transformers 4 saved rotary frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLES_EXT = (".bin", ".pt", ".pth", ".ckpt")
_PICKLES = tuple("*" + ext for ext in _PICKLES_EXT)
_PACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")


def expected_shapes(p: ModelPreset) -> dict[str, tuple[int, ...]]:
    """The shape of every released tensor name of ``p`` (MTP and its copies included)."""
    h, heads = p.hidden_size, p.num_attention_heads
    inner = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_a_proj.weight": (p.q_lora_rank, h), "self_attn.q_a_layernorm.weight": (p.q_lora_rank,),
        "self_attn.q_b_proj.weight": (heads * p.qk_head_dim, p.q_lora_rank),
        "self_attn.q_proj.weight": (heads * p.qk_head_dim, h),
        "self_attn.kv_a_proj_with_mqa.weight": (p.kv_lora_rank + p.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm.weight": (p.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (heads * (p.qk_nope_head_dim + p.v_head_dim), p.kv_lora_rank),
        "self_attn.o_proj.weight": (h, heads * p.v_head_dim),
        "mlp.gate_proj.weight": (p.ffn_hidden_size, h), "mlp.up_proj.weight": (p.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, p.ffn_hidden_size),
        "mlp.gate.weight": (p.num_routed_experts, h), "mlp.gate.e_score_correction_bias": (p.num_routed_experts,),
        "mlp.shared_experts.gate_proj.weight": (p.num_shared_experts * p.moe_ffn_hidden_size, h),
        "mlp.shared_experts.up_proj.weight": (p.num_shared_experts * p.moe_ffn_hidden_size, h),
        "mlp.shared_experts.down_proj.weight": (h, p.num_shared_experts * p.moe_ffn_hidden_size),
        "mlp.experts.E.gate_proj.weight": (p.moe_ffn_hidden_size, h),
        "mlp.experts.E.up_proj.weight": (p.moe_ffn_hidden_size, h),
        "mlp.experts.E.down_proj.weight": (h, p.moe_ffn_hidden_size),
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
        "embed_tokens.weight": (p.vocab_size, h), "shared_head.head.weight": (p.vocab_size, h),
    }
    top = {"model.embed_tokens.weight": (p.vocab_size, h), "model.norm.weight": (h,),
           "lm_head.weight": (p.vocab_size, h)}
    names = [n for m in name_table(p, include_mtp=True) for n in m.hf] + [n for n, _ in mtp_copies(p)]
    out = {}
    for name in names:
        if name in top:
            out[name] = top[name]
        else:
            key = re.sub(r"^model\.layers\.\d+\.", "", name)
            out[name] = inner[re.sub(r"experts\.\d+\.", "experts.E.", key)]
    return out


def _packed_shapes(p: ModelPreset, layer_prefix: str) -> dict[str, tuple[int, ...]]:
    e, i, h = p.num_routed_experts, p.moe_ffn_hidden_size, p.hidden_size
    return {layer_prefix + "gate_up_proj": (e, 2 * i, h), layer_prefix + "down_proj": (e, h, i)}


class HFCheckpoint:
    """A checked HF checkpoint directory; see the module docstring.  Use :meth:`open`."""

    def __init__(self, path: Path, config: dict, preset: ModelPreset, stored: dict[str, tuple[Path, Entry]],
                 sources: dict[str, tuple[str, int | None, int | None]], has_mtp: bool):
        self.path = path
        self.config = config
        self.preset = preset
        self.has_mtp = has_mtp
        self._stored = stored  # stored name -> (shard, header entry)
        self._sources = sources  # released name -> (stored name, expert, half of gate_up or None)
        self.fp8 = any(entry.dtype == "F8_E4M3" for _, entry in stored.values())
        # The dtype of the unquantised weights: the embedding's (the router weight may be fp32
        # where the rest is bf16, as transformers keeps it, and the expert bias is fp32 in the release).
        self.dtype: torch.dtype = DTYPES[stored["model.embed_tokens.weight"][1].dtype]
        self._handles: dict[Path, int] = {}
        self._starts: dict[Path, int] = {}
        self._lock = threading.Lock()

    # ---- opening: everything is checked here --------------------------------------------------
    @classmethod
    def open(cls, path, *, recipe_preset: ModelPreset | None = None) -> "HFCheckpoint":
        path = Path(path)
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
        sources = _check_names(path, preset, stored)
        has_mtp = _check_present(path, preset, stored, sources)
        _check_shapes_and_dtypes(preset, stored, sources, fp8)
        return cls(path, config, preset, stored, sources, has_mtp)

    # ---- what is stored --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The released (per-expert) names of the tensors this checkpoint holds, scales excluded."""
        return list(self._sources)

    def shard_of(self, name: str) -> Path:
        return self._stored[self._source(name)[0]][0]

    def nbytes(self, name: str) -> int:
        """Bytes ``name`` occupies on disk, its FP8 block scales included."""
        stored, expert, half = self._source(name)
        entry = self._stored[stored][1]
        n = entry.nbytes // (entry.shape[0] if expert is not None else 1) // (2 if half is not None else 1)
        if stored + SCALE in self._stored:
            n += self._stored[stored + SCALE][1].nbytes
        return n

    def tensor(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (a released name) in its own memory.  FP8 weights are dequantised
        (``w * scale_inv`` per 128x128 block, partial edge blocks included) and cast to ``dtype``,
        by default :attr:`dtype`; other tensors come as stored."""
        stored, expert, half = self._source(name)
        shard, entry = self._stored[stored]
        t = self._read(shard, entry, expert, half)
        if t.dtype == torch.float8_e4m3fn:  # dequantising makes a new tensor
            scale_shard, scale_entry = self._stored[stored + SCALE]
            return dequantize_fp8(t, self._read(scale_shard, scale_entry, None, None), dtype or self.dtype)
        return t

    def _read(self, shard: Path, entry: Entry, expert: int | None, half: int | None) -> torch.Tensor:
        """The bytes of one tensor (or one expert of a packed tensor, or half of that) read straight
        into a new tensor: no memory map, so nothing of the file stays resident in this process and
        the tensor owns its memory (tests/test_convert_hf.py rewrites the file under a read)."""
        dtype = DTYPES[entry.dtype]
        shape, offset = tuple(entry.shape), entry.begin
        if expert is not None:
            shape = shape[1:]
            offset += expert * math.prod(shape) * dtype.itemsize
            if half is not None:
                shape = (shape[0] // 2, *shape[1:])
                offset += half * math.prod(shape) * dtype.itemsize
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, fd, start, done = memoryview(buffer.numpy()), self._handle(shard), self._data_start(shard), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], start + offset + done)
            if n <= 0:
                raise ConfigError(f"{shard.name}: tensor {entry.name} could not be read (the file changed or was "
                                  "truncated after it was checked)", fix=f"download {shard.name} again",
                                  key=entry.name, where=str(shard))
            done += n
        return buffer.view(dtype).reshape(shape)

    def _source(self, name: str):
        try:
            return self._sources[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}"
                           f"{_suggest(name, list(self._sources))}") from None

    def _handle(self, shard: Path) -> int:
        """A read-only file descriptor per shard, shared by the threads (``pread`` has no file position)."""
        fd = self._handles.get(shard)
        if fd is None:
            with self._lock:
                fd = self._handles.get(shard)
                if fd is None:
                    fd = self._handles[shard] = os.open(shard, os.O_RDONLY)
        return fd

    def _data_start(self, shard: Path) -> int:
        start = self._starts.get(shard)
        if start is None:
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            start = self._starts[shard] = 8 + n
        return start

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A released FP8 weight times its 128x128 block scales (:func:`megatron_dsv3.fp8.quantize.dequantize`)."""
    from megatron_dsv3.fp8.quantize import dequantize

    return dequantize(w, scale_inv, FP8_BLOCK, dtype)


# ---- the checks ----------------------------------------------------------------------------------
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



def _check_names(path: Path, p: ModelPreset, stored: dict) -> dict[str, tuple[str, int | None, int | None]]:
    """Released name -> (stored name, expert or None, gate/up half or None); unknown names refused."""
    expected = expected_shapes(p)
    sources: dict[str, tuple[str, int | None, int | None]] = {}
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
                          f"{_suggest(name, list(expected))}",
                          fix="give a DeepSeek-V3/V2 checkpoint whose config.json describes its tensors", key=name,
                          where=str(shard))
    mixed = [n for n, (s, e, _) in sources.items() if e is not None and n in stored]
    if mixed:
        raise ConfigError(f"{mixed[0]} is stored both per expert and packed ({sources[mixed[0]][0]})",
                          fix="keep one of the two forms", key=mixed[0], where=str(stored[mixed[0]][0]))
    return sources


def _suggest(name: str, choices: list[str]) -> str:
    layer = re.match(r"model\.layers\.\d+\.", name)
    near = [c for c in choices if c.startswith(layer.group(0))] if layer else [c for c in choices if ".layers." not in c]
    close = did_you_mean(name, near)
    return f" (did you mean {close!r}?)" if close else ""


def _check_present(path: Path, p: ModelPreset, stored: dict, sources: dict) -> bool:
    """Every tensor of the model is there (the MTP layer may be absent as a whole); returns has_mtp."""
    table = name_table(p, include_mtp=True)
    mtp_prefix = f"model.layers.{p.num_layers}."
    copies = {n for n, _ in mtp_copies(p)}
    required = [h for m in table for h in m.hf]
    if p.tie_embeddings:
        required.remove("lm_head.weight")
    mtp_names = [n for n in required if n.startswith(mtp_prefix)] if p.mtp_num_layers else []
    has_mtp = any(n in sources for n in mtp_names)
    for name in required:
        if name in sources or (name in mtp_names and not has_mtp) or name in copies:
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


def _check_shapes_and_dtypes(p: ModelPreset, stored: dict, sources: dict, fp8: bool) -> None:
    expected = expected_shapes(p)
    for name, (stored_name, expert, _) in sources.items():
        shard, entry = stored[stored_name]
        if expert is None:
            want = expected[name]
        else:
            want = _packed_shapes(p, stored_name.rsplit(".", 1)[0] + ".")[stored_name]
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
