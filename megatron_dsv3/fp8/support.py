"""What each FP8 backend and GPU can run, in one place: refusals for ``check``, resolution at run time.

:func:`refusals` lists why a recipe cannot run on a backend / GPU / layout, each with its fix; the
recipe check (``megatron-dsv3 check``) and the argument settings on the training machine both call
it, so a recipe is refused for the same reasons before the job and when it starts, and never
silently replaced by another.  :func:`resolve_fp8_backend` turns ``auto`` into a backend where the job runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.plan import FP8_BACKENDS, LOCAL_FP8_BACKENDS
from megatron_dsv3.fp8.recipes import FP8Recipe

# Compute capability of GPUs a recipe may name in `hardware.gpu` (NVIDIA's CUDA GPU list).
GPU_CAPABILITY = {
    "GH200": (9, 0), "H100": (9, 0), "H200": (9, 0), "H800": (9, 0), "H20": (9, 0),
    "GB300": (10, 3), "GB200": (10, 0), "B300": (10, 3), "B200": (10, 0),
    "RTX PRO 6000": (12, 0), "RTX 5090": (12, 0),
    "A100": (8, 0), "A800": (8, 0), "A10": (8, 6), "L40S": (8, 9), "L40": (8, 9), "L4": (8, 9),
    "V100": (7, 0),
}


def gpu_capability(name: str | None) -> tuple[int, int] | None:
    """The compute capability of a GPU named in free text ("H800", "NVIDIA B200"), None if unknown."""
    if not name:
        return None
    text = name.upper()
    for key in sorted(GPU_CAPABILITY, key=len, reverse=True):
        if key in text:
            return GPU_CAPABILITY[key]
    return None


@dataclass(frozen=True)
class Refusal:
    key: str  # recipe key path (fp8.scale, parallel.tp, ...)
    problem: str
    fix: str


def two_d_by_two_d(recipe: FP8Recipe) -> list[str]:
    """The GEMMs whose two operands would both be 2-D blocks (TE and cuBLAS have no such GEMM)."""
    kinds = {"activation": recipe.activation_block, "weight": recipe.weight_block, "grad": recipe.grad_block}
    pairs = {"Fprop": ("activation", "weight"), "Dgrad": ("grad", "weight"), "Wgrad": ("grad", "activation")}
    return [gemm for gemm, (a, b) in pairs.items() if kinds[a] == kinds[b] == "2d"]


def _block_rules(recipe: FP8Recipe, backend: str, engine: str) -> list[Refusal]:
    found = []
    if recipe.block_size != 128:
        found.append(Refusal("fp8.block_size", f"fp8.block_size={recipe.block_size}: {engine} fixes the block"
                             f" length at 128 (fp8.backend={backend})",
                             "use block_size: 128, or fp8.backend: emulated to study other sizes"))
    pairs = two_d_by_two_d(recipe)
    if pairs:
        found.append(Refusal("fp8.weight_block", f"{', '.join(pairs)} would multiply two 2-D-blocked operands,"
                             f" which {engine} has no GEMM for (fp8.backend={backend})",
                             "keep activations and gradients 1d when weights are 2d (DeepSeek's recipe)"))
    return found


def refusals(recipe: FP8Recipe, backend: str, *, model_backend: str, device: str,
             capability: tuple[int, int] | None, tp: int, pp: int, use_distributed_optimizer: bool,
             num_layers: int, te_usable: bool, te_reason: str = "") -> list[Refusal]:
    """Why ``recipe`` cannot run on ``backend`` here (empty: it can).  ``capability`` None = unknown GPU;
    ``te_usable``: whether Transformer Engine will be importable where the job runs (``te_reason``: why not)."""
    found: list[Refusal] = []
    if backend not in FP8_BACKENDS or backend == "auto":
        raise ValueError(f"resolve the FP8 backend first (got {backend!r})")
    if backend == "transformer_engine" and model_backend != "transformer_engine":
        found.append(Refusal("fp8.backend", "fp8.backend=transformer_engine needs the Transformer Engine model"
                             f" backend (backend is {model_backend})",
                             "set backend: transformer_engine, or fp8.backend: pytorch / emulated"))
    if backend in LOCAL_FP8_BACKENDS and model_backend != "local":
        found.append(Refusal("fp8.backend", f"fp8.backend={backend} runs the local backend's Linears, but the"
                             f" model backend is {model_backend}",
                             "set backend: local, or fp8.backend: transformer_engine"))
    if device == "cpu" and backend != "emulated":
        found.append(Refusal("fp8.backend", f"fp8.backend={backend} needs a GPU (hardware.device is cpu)",
                             "use fp8.backend: emulated (or auto) on CPU"))
    if backend == "transformer_engine":
        found += _te_rules(recipe, capability, tp)
    elif backend == "pytorch":
        found += _block_rules(recipe, backend, "torch._scaled_mm")
        if capability is not None and capability != (9, 0):
            found.append(Refusal("fp8.backend", f"torch._scaled_mm block-wise scaling runs only on SM90 (Hopper);"
                                 f" this GPU is SM{capability[0]}{capability[1]}",
                                 "use fp8.backend: transformer_engine (with backend: transformer_engine)"))
    found += _moment_rules(recipe, device, use_distributed_optimizer, te_usable, te_reason)
    found += _bf16_layer_rules(recipe, backend, num_layers, pp)
    return found


def _moment_rules(recipe: FP8Recipe, device: str, use_distributed_optimizer: bool, te_usable: bool,
                  te_reason: str) -> list[Refusal]:
    """BF16 moments are Megatron's precision-aware optimizer, which only the distributed optimizer and
    Transformer Engine's FusedAdam implement (``OptimizerConfig.__post_init__`` raises "requires
    FusedAdam from TransformerEngine" without it, whatever runs the GEMMs)."""
    if recipe.moments != "bf16":
        return []
    if device == "cpu" or not use_distributed_optimizer:
        why = "hardware.device is cpu" if device == "cpu" else "use_distributed_optimizer is false"
        return [Refusal("fp8.moments", "fp8.moments=bf16 uses Megatron's precision-aware optimizer,"
                        " which needs --use-distributed-optimizer and Transformer Engine's FusedAdam on"
                        f" a GPU ({why})",
                        "set fp8.moments: fp32, or training.use_distributed_optimizer: true on a GPU")]
    if not te_usable:
        return [Refusal("fp8.moments", "fp8.moments=bf16 uses Megatron's precision-aware optimizer, which needs"
                        f" Transformer Engine's FusedAdam, and Transformer Engine is not usable ({te_reason})",
                        "set fp8.moments: fp32 (AdamW moments in FP32), or install Transformer Engine"
                        " (pip install megatron-dsv3[te]) and use backend: transformer_engine")]
    return []


def _bf16_layer_rules(recipe: FP8Recipe, backend: str, num_layers: int, pp: int) -> list[Refusal]:
    """The BF16 first / last layer counts.  Megatron keeps them through Transformer Engine's path only
    and allows at most ``num_layers // pipeline size`` at each end (``TransformerConfig.__post_init__``
    raises "must be between 0 and number of layers per pipeline stage"); the local backends' policy
    takes any count up to the model's layers."""
    found = []
    first, last = recipe.bf16_first_layers, recipe.bf16_last_layers
    if first + last > num_layers:
        found.append(Refusal("fp8.bf16_first_layers", f"fp8.bf16_first_layers + bf16_last_layers ="
                             f" {first + last} exceeds the {num_layers} layers",
                             "lower them (or drop the fp8 section: the whole model in BF16)"))
    if backend == "transformer_engine":
        per_stage = num_layers // max(pp, 1)
        for key, count in (("bf16_first_layers", first), ("bf16_last_layers", last)):
            if count > per_stage:
                found.append(Refusal(f"fp8.{key}", f"fp8.{key}={count} exceeds the {per_stage} layers per pipeline"
                                     f" stage ({num_layers} layers // pipeline size {pp}), the most Megatron keeps in"
                                     " BF16 at each end with Transformer Engine's FP8",
                                     f"set fp8.{key} to at most {per_stage}, or use fp8.backend: pytorch"
                                     " (backend: local), which keeps any number of layers in BF16"))
    return found


def _te_rules(recipe: FP8Recipe, capability, tp: int) -> list[Refusal]:
    found = _block_rules(recipe, "transformer_engine", "Transformer Engine's Float8BlockScaling")
    if recipe.margin:
        found.append(Refusal("fp8.margin", f"fp8.margin={recipe.margin}: Float8BlockScaling has no margin",
                             "set margin: 0, or fp8.backend: pytorch / emulated"))
    if recipe.bf16_modules:
        found.append(Refusal("fp8.bf16_modules", f"fp8.bf16_modules={list(recipe.bf16_modules)}: Megatron's"
                             " Transformer Engine path keeps whole layers in BF16 only (--first-last-layers-bf16;"
                             " MTP always runs in the global FP8 context)",
                             "use bf16_first_layers / bf16_last_layers, or fp8.backend: pytorch"))
    if capability is not None:
        if capability < (9, 0):
            found.append(Refusal("hardware.gpu", f"FP8 block scaling needs compute capability >= 9.0; this GPU is"
                                 f" {capability[0]}.{capability[1]}", "run on Hopper or Blackwell, or drop fp8"))
        elif capability[0] >= 10 and recipe.scale == "fp32":
            found.append(Refusal("fp8.scale", f"fp8.scale=fp32 on SM{capability[0]}{capability[1]}: Transformer"
                                 " Engine runs block scaling on Blackwell through MXFP8 GEMMs, which allow"
                                 " power-of-two scales only", "set fp8.scale: pow2 (recipe te-blockwise)"))
        if capability[0] == 12:
            found.append(Refusal("hardware.gpu", "Float8BlockScaling does not converge on SM120"
                                 " (TransformerEngine #2382)", "run on Hopper or SM100"))
    if tp > 1:
        found.append(Refusal("parallel.tp", f"parallel.tp={tp} with Transformer Engine block-wise FP8 and the"
                             " all-to-all dispatcher fails in Megatron-LM #1863 (\"GEMM with"
                             " Float8BlockwiseQTensor requires GEMM_READY format\", open)",
                             "use tp: 1 (DeepSeek's own layout: EP and PP, no TP), or backend: local with"
                             " fp8.backend: pytorch"))
    return found


def resolve_fp8_backend(requested: str, *, model_backend: str, on_cpu: bool) -> str:
    """``auto``: Transformer Engine's FP8 with the TE model backend, else ``pytorch`` on a GPU and
    ``emulated`` on CPU; anything else is returned as asked (and checked by :func:`refusals`)."""
    if requested not in FP8_BACKENDS:
        raise ConfigError(f"unknown FP8 backend '{requested}'", fix=f"use one of: {', '.join(FP8_BACKENDS)}",
                          key="fp8.backend", value=requested, choices=list(FP8_BACKENDS))
    if requested != "auto":
        return requested
    if model_backend == "transformer_engine":
        return "transformer_engine"
    return "emulated" if on_cpu else "pytorch"
