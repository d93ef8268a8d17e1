"""``megatron-dsv3 convert``: HuggingFace DeepSeek-V3 checkpoints to Megatron and back, streaming.

Import (:func:`hf_to_megatron`): the HF checkpoint is checked whole before anything is written
(:func:`~megatron_dsv3.convert.hf_layout.check_layout`: config, index, shard headers, names,
shapes, dtypes, the recipe), then each Megatron parameter is made from its HF tensors when the
checkpoint writer reaches it (FP8 weights dequantised on the way) and written into a Megatron
``torch_dist`` ``release`` checkpoint.  Export (:func:`megatron_to_hf`) reads one group of
parameters at a time from a Megatron checkpoint of any layout and streams them into the released
HF layout.  Peak memory is a few parameters, whatever the model's size.

Both write into a temporary sibling folder and rename it at the end, so an interrupted run never
leaves something that looks complete, and a rerun starts cleanly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_dsv3.args.compose import preset_from_args
from megatron_dsv3.convert.batching import split_by_bytes
from megatron_dsv3.convert.hf_config import hf_config_from_preset
from megatron_dsv3.convert.hf_reader import HFCheckpoint
from megatron_dsv3.convert.hf_source import read_hf_source, write_hf_source
from megatron_dsv3.convert.hf_writer import DEFAULT_SHARD_BYTES, write_hf_checkpoint
from megatron_dsv3.convert.megatron_reader import MegatronCheckpoint
from megatron_dsv3.convert.megatron_writer import write_checkpoint
from megatron_dsv3.convert.meta_model import DTYPES, MetaModel, single_process
from megatron_dsv3.convert.output_dir import check_writable, partial_output, refuse_existing
from megatron_dsv3.convert.progress import Progress
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.hf_names import Mapping, mtp_copies, name_table
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.recipe import load_recipe, validate_recipe


@dataclasses.dataclass
class Result:
    out_dir: Path
    preset: ModelPreset
    bytes_written: int
    seconds: float
    notes: list[str]

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


# ---- HF -> Megatron ----------------------------------------------------------------------------
def hf_to_megatron(hf_dir, out_dir, *, recipe: str | None = None, overrides: list[str] | None = None,
                   dtype: str | None = None, threads: int = 2, overwrite: bool = False,
                   progress: bool = True) -> Result:
    """Convert the HF checkpoint in ``hf_dir`` to a Megatron checkpoint in ``out_dir``.

    The model is the HF config's (:func:`~megatron_dsv3.convert.hf_config.preset_from_hf_config`),
    or ``recipe``'s, which the config must agree with.  ``dtype`` (bfloat16, float16, float32)
    defaults to the checkpoint's (bfloat16 for FP8 releases, whose weights are dequantised)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_output(out_dir, overwrite)
    target = None
    if recipe is not None:
        loaded = load_recipe(recipe, overrides or [])
        validate_recipe(loaded)  # the checks `megatron-dsv3 args` runs: the run it is for must be able to start
        target = loaded.preset
    with HFCheckpoint.open(hf_dir, recipe_preset=target) as hf:
        return _import(hf, hf_dir, out_dir, target, dtype, threads, overwrite, progress)


def _import(hf, hf_dir: Path, out_dir: Path, target, dtype, threads: int, overwrite: bool, progress: bool) -> Result:
    target = target or hf.preset
    notes = []
    if target.mtp_num_layers and not hf.has_mtp:
        raise ConfigError(f"{hf_dir}: the checkpoint has no MTP layer but the model has "
                          f"model.mtp_num_layers={target.mtp_num_layers}",
                          fix="convert with a recipe that sets model.mtp_num_layers: 0 (or a checkpoint with MTP)",
                          key="mtp_num_layers")
    if hf.has_mtp and not target.mtp_num_layers:
        notes.append(f"the checkpoint's MTP layer (model.layers.{target.num_layers}.*) is not converted: the "
                     "model has no MTP (model.mtp_num_layers: 0)")
    torch_dtype = _dtype(dtype, hf.dtype)
    table = {m.megatron: m for m in name_table(target, include_mtp=target.mtp_num_layers > 0)}

    def source(name: str) -> torch.Tensor:
        return table[name].join([hf.tensor(h, dtype=torch_dtype) for h in table[name].hf])

    with single_process():
        meta = MetaModel(target, torch_dtype)
        _same_table(meta, table.values())
        total = sum(p.nbytes for p in meta.pieces)
        bar = Progress(f"hf-to-megatron {hf_dir.name}", total, enabled=progress)
        with partial_output(out_dir, overwrite=overwrite) as tmp:
            write_checkpoint(meta, tmp, source, threads=threads, progress=bar.add)
            write_hf_source(tmp, hf.config, hf_dir)
        bar.close()
    return Result(out_dir, target, total, bar.seconds, notes)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """The output folder, checked before anything is read or built."""
    if not overwrite:
        refuse_existing(out_dir)
    check_writable(out_dir)


def _same_table(meta: MetaModel, table) -> None:
    """The name table (its names and shapes) is the model Megatron built: a mismatch is a bug here,
    not bad input."""
    shapes = {m.megatron: m.shape for m in table}
    missing, extra = set(meta.params) - set(shapes), set(shapes) - set(meta.params)
    if missing or extra:
        raise RuntimeError(f"name table and model differ: not in the table {sorted(missing)[:5]}, "
                           f"not in the model {sorted(extra)[:5]}")
    wrong = [f"{n}: table {shapes[n]}, model {tuple(t.shape)}" for n, t in meta.params.items()
             if tuple(t.shape) != shapes[n]]
    if wrong:
        raise RuntimeError(f"name table and model differ in shape: {'; '.join(wrong[:3])}")


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}", fix="use bfloat16 (the release's)",
                          key="dtype", value=name, choices=list(DTYPES))
    return DTYPES[name]


# ---- Megatron -> HF ----------------------------------------------------------------------------
def megatron_to_hf(ckpt_dir, out_dir, *, dtype: str | None = None, max_shard_bytes: int | None = None,
                   threads: int = 2, overwrite: bool = False, progress: bool = True,
                   read_batch_bytes: int = 256 * 2**20) -> Result:
    """Convert the Megatron checkpoint ``ckpt_dir`` (a save folder or one step of it, saved under any
    parallel layout) to the released HF layout in ``out_dir``.  ``dtype`` defaults to the run's
    (``--bf16`` -> bfloat16); the router's expert bias stays float32, as in the release."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _check_output(out_dir, overwrite)
    ckpt = MegatronCheckpoint(ckpt_dir)
    preset = preset_from_args(ckpt.args, name=ckpt_dir.name)
    stored = torch.bfloat16 if getattr(ckpt.args, "bf16", False) else (
        torch.float16 if getattr(ckpt.args, "fp16", False) else torch.float32)
    out_dtype = _dtype(dtype, stored)
    table = name_table(preset, include_mtp=preset.mtp_num_layers > 0)
    model_type = hf_config_from_preset(preset)["model_type"]  # a model with no HF layout is refused here
    source = read_hf_source(ckpt_dir, ckpt.step_dir, model_type)

    with single_process():
        meta = MetaModel(preset, stored)
        _same_table(meta, table)
        _check_shapes(ckpt, meta)
        plan, copies = export_plan(preset, table, out_dtype)
        total = sum(math.prod(shape) * dt.itemsize for _, shape, dt in plan)
        bar = Progress(f"megatron-to-hf {ckpt_dir.name}", total, enabled=progress)
        pieces_of = meta.pieces_of()

        def read_group(names: list[str]) -> dict[str, torch.Tensor]:
            buffers = {n: torch.empty(meta.params[n].shape, dtype=meta.params[n].dtype) for n in names}
            ckpt.read([(piece, buffers[n]) for n in names for piece in pieces_of[n]])
            return buffers

        def tensors():
            groups = _groups([m.megatron for m in table], meta, read_batch_bytes)
            with ThreadPoolExecutor(max(1, threads)) as pool:
                pending = OrderedDict()
                for i, group in enumerate(groups[:threads]):
                    pending[i] = pool.submit(read_group, group)
                next_group = len(pending)
                for i in range(len(groups)):
                    params = pending.pop(i).result()
                    if next_group < len(groups):
                        pending[next_group] = pool.submit(read_group, groups[next_group])
                        next_group += 1
                    for name in groups[i]:
                        for hf_name, tensor in by_megatron[name].split(params.pop(name)):
                            for out_name in [hf_name] + copies.get(hf_name, []):
                                out = tensor.to(plan_dtype[out_name])
                                bar.add(out.nbytes)
                                yield out_name, out

        by_megatron = {m.megatron: m for m in table}
        plan_dtype = {name: dt for name, _, dt in plan}
        write_hf_checkpoint(out_dir, preset, tensors(), plan=plan, token_ids=source.token_ids,
                            generation_config=source.generation_config,
                            max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, overwrite=overwrite)
        bar.close()
    return Result(out_dir, preset, total, bar.seconds, source.notes)


def _hf_dtype(hf_name: str, out_dtype: torch.dtype) -> torch.dtype:
    # DeepSeek's release keeps the router's correction bias in float32 (it is added to sigmoid scores).
    return torch.float32 if hf_name.endswith("e_score_correction_bias") else out_dtype


def export_plan(preset: ModelPreset, table: list[Mapping], out_dtype: torch.dtype):
    """``plan``: (HF name, shape, dtype) in the order they are written (the table's, shapes from it);
    ``copies``: HF name -> the MTP copies written after it."""
    plan = []
    copies: dict[str, list[str]] = {}
    by_megatron = {m.megatron: m for m in table}
    for hf_name, megatron_name in mtp_copies(preset):
        copies.setdefault(by_megatron[megatron_name].hf[0], []).append(hf_name)
    for m in table:
        for hf_name, hf_shape in m.hf_shapes():
            for out_name in [hf_name] + copies.get(hf_name, []):
                plan.append((out_name, hf_shape, _hf_dtype(out_name, out_dtype)))
    return plan, copies


def _groups(order: list[str], meta: MetaModel, batch_bytes: int) -> list[list[str]]:
    return split_by_bytes(order, lambda n: meta.params[n].numel() * meta.params[n].element_size(), batch_bytes)


def _check_shapes(ckpt: MegatronCheckpoint, meta: MetaModel) -> None:
    """Every tensor the model has is in the checkpoint with a global shape that holds it (the
    vocabulary may be padded beyond the model's rows; nothing else may differ)."""
    shapes = ckpt.shapes
    expected: dict[str, list[int]] = {}
    for piece in meta.pieces:
        chunk = (1,) * (len(piece.offset) - len(piece.shape)) + piece.shape
        end = [o + s for o, s in zip(piece.offset, chunk)]
        expected[piece.key] = [max(a, b) for a, b in zip(expected.get(piece.key, end), end)]
    for key, shape in expected.items():
        if key not in shapes:
            raise ConfigError(f"{ckpt.step_dir}: the checkpoint has no tensor {key}",
                              fix="export a checkpoint of a --spec dsv3 model; its recorded arguments decide the "
                                  "model")
        found = list(shapes[key])
        padded_vocab = key in ("embedding.word_embeddings.weight", "output_layer.weight")
        ok = found == shape or (padded_vocab and found[0] >= shape[0] and found[1:] == shape[1:])
        if not ok:
            raise ConfigError(f"{ckpt.step_dir}: {key} has global shape {tuple(found)}, the model's arguments give "
                              f"{tuple(shape)}",
                              fix="export the checkpoint with the arguments it was saved with (the converter reads "
                                  "them from the checkpoint; a hand-edited checkpoint cannot be exported)")
