"""``convert``: HuggingFace DeepSeek-V3 checkpoints to Megatron's distributed format and back
(:mod:`megatron_dsv3.convert`)."""

from __future__ import annotations

import argparse
import sys

from megatron_dsv3.errors import ConfigError


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="HuggingFace DeepSeek-V3 checkpoints to Megatron and back (streaming, bounded memory)",
        description="Streams tensors one at a time: peak memory is a few tensors whatever the checkpoint's size."
        " FP8 E4M3 weights (128x128 weight_scale_inv blocks) are dequantised on the way in. Output goes to a"
        " temporary folder renamed at the end. docs/checkpoints.md has the name table.")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("source", help="hf-to-megatron: the HF folder (config.json, safetensors); megatron-to-hf: a"
                   " --save folder or one of its iter_NNNNNNN folders (torch_dist)")
    p.add_argument("out", help="the output folder (must be new or empty unless --overwrite)")
    p.add_argument("--recipe", default=None,
                   help="hf-to-megatron: the recipe the checkpoint is for (its model must agree with config.json)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (with --recipe)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the source's)")
    p.add_argument("--threads", type=int, default=2, help="tensors read and written concurrently (default 2)")
    p.add_argument("--max-shard-size", type=float, default=None,
                   help="megatron-to-hf: GB per safetensors shard (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_convert)


def cmd_convert(ns: argparse.Namespace) -> int:
    """A conversion stopped by Ctrl-C, a bad input or the disk says so in a line or two (what happened
    and what became of the partial output); an unexpected error keeps its traceback."""
    try:
        return _convert(ns)
    except KeyboardInterrupt as err:
        _stopped("interrupted", err)
        return 130
    except ConfigError as err:
        _stopped(f"error: {err}", err)
        return 2
    except OSError as err:
        _stopped(f"error: {err.strerror or err}{f' ({err.filename})' if err.filename else ''}", err)
        return 1


def _stopped(message: str, err: BaseException) -> None:
    print(f"megatron-dsv3: {message}", file=sys.stderr)
    for note in getattr(err, "__notes__", []):
        print(f"megatron-dsv3: {note}", file=sys.stderr)


def _convert(ns: argparse.Namespace) -> int:
    # lazy: the converter imports torch and Megatron's checkpointing (seconds); other commands must not.
    from megatron_dsv3.convert import run

    if ns.direction == "hf-to-megatron":
        result = run.hf_to_megatron(ns.source, ns.out, recipe=ns.recipe, overrides=ns.overrides, dtype=ns.dtype,
                                    threads=ns.threads, overwrite=ns.overwrite, progress=not ns.quiet)
        loads = f"megatron-dsv3 train RECIPE checkpoint.load={result.out_dir}  (or pretrain_gpt.py --load {result.out_dir})"
    else:
        if ns.recipe or ns.overrides:
            raise ConfigError("--recipe is for hf-to-megatron; a Megatron checkpoint records its own model",
                              fix="drop --recipe", key="--recipe")
        shard = int(ns.max_shard_size * 1e9) if ns.max_shard_size else None
        result = run.megatron_to_hf(ns.source, ns.out, dtype=ns.dtype, max_shard_bytes=shard,
                                    threads=ns.threads, overwrite=ns.overwrite, progress=not ns.quiet)
        loads = f"transformers: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})"
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.out_dir} ({result.preset.num_layers} layers, {result.bytes_written / 1e9:.2f} GB in"
          f" {result.seconds:.1f} s, {result.mb_per_s:.0f} MB/s)")
    print(f"load it with: {loads}")
    return 0
