"""The plugin's own options, added to Megatron's argument parser as the group "megatron-dsv3".

What each option implies for Megatron's own arguments is written once, in
:mod:`megatron_dsv3.args.settings`, and applied on the machine that runs the job.
"""

from __future__ import annotations

import argparse

from megatron_dsv3.fp8.plan import FP8_BACKENDS
from megatron_dsv3.fp8.recipes import BLOCK_KINDS, MOMENTS, OPTIONAL_BF16, RECIPES, SCALES
from megatron_dsv3.model.backends import BACKENDS, EXPERTS
from megatron_dsv3.parallel.layout import SCHEDULES

# ---- FP8 (megatron_dsv3.fp8): option dest -> FP8Recipe field it overrides ----
FP8_OVERRIDES = {
    "dsv3_fp8_scale": "scale",
    "dsv3_fp8_block_size": "block_size",
    "dsv3_fp8_activation_block": "activation_block",
    "dsv3_fp8_weight_block": "weight_block",
    "dsv3_fp8_grad_block": "grad_block",
    "dsv3_fp8_margin": "margin",
    "dsv3_fp8_amax_epsilon": "amax_epsilon",
    "dsv3_fp8_bf16_first_layers": "bf16_first_layers",
    "dsv3_fp8_bf16_last_layers": "bf16_last_layers",
    "dsv3_fp8_bf16_modules": "bf16_modules",
    "dsv3_fp8_moments": "moments",
}


def option_flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_dsv3_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the megatron-dsv3 group to ``parser`` (idempotent)."""
    if any(a.dest == "dsv3_backend" for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="megatron-dsv3", description="DeepSeek-V3 plugin options (megatron-dsv3)"
    )
    group.add_argument(
        "--dsv3-backend",
        choices=BACKENDS,
        default="auto",
        help="Modules of the dsv3 spec: Transformer Engine, Megatron's local PyTorch modules, or auto"
        " (Transformer Engine when it imports on a GPU, local otherwise; an explicit"
        " --transformer-impl local is kept). Sets --transformer-impl and what the backend needs.",
    )
    group.add_argument(
        "--dsv3-experts",
        choices=EXPERTS,
        default="auto",
        help="Routed experts: grouped (one grouped GEMM per projection for all local experts:"
        " Transformer Engine's GroupedMLP, or torch.nn.functional.grouped_mm on the local backend) or"
        " sequential (Megatron's SequentialMLP, one GEMM per expert); auto: grouped wherever it runs."
        " Sets Megatron's --moe-grouped-gemm.",
    )
    group.add_argument(
        "--dsv3-cpu",
        action="store_true",
        help="Run on CPU with the gloo backend (megatron_dsv3.cpu.enable_cpu_mode); for smoke tests"
        " and machines without a GPU.",
    )
    group.add_argument(
        "--pipeline-schedule",
        choices=SCHEDULES,
        default=None,
        help="Pipeline schedule: Megatron's 1f1b or interleaved (the default follows the virtual"
        " stages), or DeepSeek's dualpipe / dualpipev, whose --pipeline-model-parallel-layout lists"
        " the stages in model order.",
    )
    group.add_argument(
        "--dualpipe-zero-bubble",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DualPipe(V): split the backwards the schedule marks into input- and weight-gradient parts"
        " (zero bubble; the default with the local backend); --no-dualpipe-zero-bubble runs every"
        " backward whole.",
    )
    group.add_argument(
        "--dualpipe-fb-overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DualPipe(V): run each paired forward and backward overlapped, attention / dispatch / MLP /"
        " combine interleaved (Megatron-Core's schedule plans), so one side's all-to-all hides behind the"
        " other's compute. Default: on with expert parallelism (--expert-model-parallel-size > 1).",
    )
    group.add_argument(
        "--dsv3-wandb-mode",
        choices=("online", "offline", "disabled"),
        default=None,
        help="W&B mode for Megatron's --wandb-project writer (sets WANDB_MODE where the job runs); offline"
        " writes the run locally, for `wandb sync`.",
    )
    add_fp8_arguments(group)
    return parser


def add_fp8_arguments(group) -> None:
    """``--dsv3-fp8 RECIPE`` and the recipe's overrides (docs/fp8.md); None keeps the recipe's value."""
    group.add_argument("--dsv3-fp8", choices=list(RECIPES), default=None,
                       help="Block-wise FP8 training with a named recipe: deepseek (DeepSeek-V3's: fp32 scales"
                       " amax/448, BF16 AdamW moments) or te-blockwise (Transformer Engine's defaults: power-of-two"
                       " scales). Sets Megatron's --fp8-* arguments or the local backend's FP8 Linears.")
    group.add_argument("--dsv3-fp8-backend", choices=FP8_BACKENDS, default="auto",
                       help="What runs the FP8 GEMMs: transformer_engine (Megatron's --fp8-recipe blockwise), pytorch"
                       " (torch._scaled_mm, SM90), emulated (any device, fp32 reference); auto: Transformer Engine"
                       " with that backend, else pytorch on a GPU and emulated on CPU.")
    group.add_argument("--dsv3-fp8-scale", choices=SCALES, default=None, help="Scales: fp32 (amax/448) or pow2.")
    group.add_argument("--dsv3-fp8-block-size", type=int, default=None,
                       help="Block length along K, also the FP32 promotion interval (128).")
    for role in ("activation", "weight", "grad"):
        group.add_argument(f"--dsv3-fp8-{role}-block", choices=BLOCK_KINDS, default=None,
                           help=f"{role.capitalize()} blocks: 1d (1 x block) or 2d (block x block).")
    group.add_argument("--dsv3-fp8-margin", type=int, default=None, help="Scale headroom: amax * 2^margin / 448.")
    group.add_argument("--dsv3-fp8-amax-epsilon", type=float, default=None, help="Floor of each block's amax.")
    group.add_argument("--dsv3-fp8-bf16-first-layers", type=int, default=None,
                       help="Keep the first N decoder layers in BF16.")
    group.add_argument("--dsv3-fp8-bf16-last-layers", type=int, default=None,
                       help="Keep the last N decoder layers in BF16.")
    group.add_argument("--dsv3-fp8-bf16-modules", nargs="+", choices=OPTIONAL_BF16, default=None,
                       help="Also keep these in BF16 (the embedding, output head, router, norms and core attention"
                       " always are).")
    group.add_argument("--dsv3-fp8-moments", choices=MOMENTS, default=None,
                       help="AdamW moments: bf16 (Megatron's precision-aware optimizer, master weights fp32) or fp32.")
