"""Run-time changes that let Megatron-Core train on CPU with the gloo backend (group ``cpu``).

Megatron-Core 0.19 assumes CUDA in hundreds of places: tensors allocated with
``device=torch.cuda.current_device()`` or ``device="cuda"``, CUDA streams, events and NVTX ranges,
the CUDA RNG behind its model-parallel RNG tracker.  Rather than patch each site, CPU mode gives
PyTorch CPU stand-ins for the CUDA calls Megatron makes, and a handful of Megatron functions get
targeted replacements where a CPU stand-in cannot express the fix.  ``docs/cpu-mode.md`` lists the
obstacles these remove, and ``docs/megatron-changes.md`` each change with the Megatron function it replaces
and why.

These are only ever applied by :func:`megatron_dsv3.runtime.cpu_mode.enable_cpu_mode`, which refuses to run
when a GPU is visible, so a GPU run never sees them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from megatron_dsv3.runtime.cpu_cuda_changes import CpuStream
from megatron_dsv3.runtime.registry import (
    megatron_change,
    on_revert,
    original,
    original_of,
    replace,
    replace_attribute,
    set_environment,
)

_CPU = torch.device("cpu")
# Where a CUDA designation goes: the CPU, or (inside ``cuda_on``) another device such as ``meta``.
_TARGET = [_CPU]


@contextlib.contextmanager
def cuda_on(device: torch.device):
    """Send what Megatron allocates on "the GPU" to ``device`` for a while.  The checkpoint
    converter builds the target model on the ``meta`` device this way (shapes without storage):
    Megatron passes ``device=torch.cuda.current_device()`` explicitly, which a ``torch.device``
    context does not override."""
    _TARGET.append(torch.device(device))
    try:
        yield
    finally:
        _TARGET.pop()


def _cpu_device(device):
    """Map any CUDA device designation (``"cuda"``, ``"cuda:1"``, ``0``, ``torch.device``) to CPU
    (or to the device of :func:`cuda_on`)."""
    if device is None:  # the default device; inside cuda_on, that device
        return _TARGET[-1] if len(_TARGET) > 1 else None
    if isinstance(device, int) and not isinstance(device, bool):
        return _TARGET[-1]
    if isinstance(device, str):
        return _TARGET[-1] if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return _TARGET[-1]
    return device


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "randperm", "eye", "linspace", "empty_strided", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand_like", "randn_like",
)


_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _factory_on_cpu(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs or len(_TARGET) > 1:  # inside cuda_on, no device means that device
            kwargs["device"] = _cpu_device(kwargs.get("device"))
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


@megatron_change(
    targets=[f"torch.{name}" for name in _FACTORIES]
    + [f"torch.Tensor.{name}" for name in _TENSOR_FACTORIES]
    + ["torch.Tensor.to", "torch.Tensor.cuda", "torch.Tensor.pin_memory", "torch.Tensor.record_stream"],
    versions="megatron-core 0.19.x (every version so far allocates on CUDA explicitly)",
    fixed_upstream_when="Megatron-Core allocates with the device of its inputs or a configurable "
    "default device instead of torch.cuda.current_device() / device='cuda'",
)
def cuda_tensors_land_on_cpu():
    """Tensors that Megatron creates or moves to a CUDA device are created on the CPU instead.

    Megatron allocates with ``device=torch.cuda.current_device()`` or ``device="cuda"`` throughout
    (causal masks, pipeline buffers, token counts, router statistics) and calls ``.cuda()``,
    ``pin_memory()`` and ``record_stream()``.  The tensor factories and these ``Tensor`` methods
    map a CUDA device to the CPU.  ``pin_memory()`` returns a copy (as pinning does: the pinned
    tensor is new memory) and ``record_stream()`` does nothing, after checking that it was given a
    stream: CUDA's raises on anything else, ``None`` included (``unknown parameter type``).
    """
    for name in _FACTORIES:
        replace(f"torch.{name}", _factory_on_cpu(original(f"torch.{name}")))

    to = original("torch.Tensor.to")

    def tensor_to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return to(self, *args, **kwargs)

    replace("torch.Tensor.to", tensor_to)
    for name in _TENSOR_FACTORIES:
        replace(f"torch.Tensor.{name}", _factory_on_cpu(original(f"torch.Tensor.{name}")))
    replace("torch.Tensor.cuda", lambda self, *args, **kwargs: self)
    replace("torch.Tensor.pin_memory", lambda self, *args, **kwargs: self.clone())
    replace("torch.Tensor.record_stream", _record_stream)


def _record_stream(self, stream) -> None:
    if not isinstance(stream, (CpuStream, torch.Stream)):
        raise RuntimeError(
            f"record_stream() takes a stream, got {type(stream).__name__} (CUDA raises here too: "
            "'unknown parameter type'); with Megatron's overlapped schedule, None means set_streams() "
            "was not called"
        )


@megatron_change(
    targets=["torch.utils._device._device_constructors"],
    versions="megatron-core 0.19.x on torch 2.x (torch/utils/_device.py)",
    fixed_upstream_when="(not a fix) needed while CPU mode replaces torch's factory functions",
)
def torch_device_contexts_work_during_and_after_cpu_mode():
    """``with torch.device(...)`` and ``torch.set_default_device`` keep working during and after CPU mode.

    PyTorch's device context decides which calls get its device by looking the called function up
    in ``torch.utils._device._device_constructors()``, a set of ``torch.*`` functions built and cached
    the first time it is used; the function it looks up is the builtin (which the factory wrappers
    of ``cuda_tensors_land_on_cpu`` call).  Built while the wrappers stand in ``torch``, the set
    would hold the wrappers instead, for the rest of the process: ``with torch.device("meta"):
    torch.tensor(...)`` made CPU tensors, and transformers' ``from_pretrained`` (which builds on
    ``meta``) left RoPE's ``inv_freq`` uninitialised.  While CPU mode is on, the set is built
    from the original functions; its cache is emptied when CPU mode ends, in case anything that
    holds the function itself filled it meanwhile (it refills from ``torch`` as it then is).
    """
    cached = original("torch.utils._device._device_constructors")

    @functools.cache
    def device_constructors():
        return {original_of(fn) for fn in cached.__wrapped__()}

    replace("torch.utils._device._device_constructors", device_constructors)
    on_revert(cached.cache_clear)


@megatron_change(
    targets=[
        "torch.cuda.get_rng_state",
        "torch.cuda.set_rng_state",
        "torch.cuda.manual_seed",
        "torch.cuda.manual_seed_all",
        "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        "logging.getLogger('megatron.core.tensor_parallel.random').filters",
    ],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="megatron/core/tensor_parallel/random.py's CudaRNGStatesTracker accepts "
    "a CPU generator",
)
def cuda_rng_is_the_cpu_generator():
    """Megatron's model-parallel RNG tracker forks the CPU generator instead of the CUDA one.

    ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.fork`` save, seed and restore
    the CUDA generator; dropout and initialisation inside a fork then draw from the tracker's
    stream.  On CPU those ops draw from the CPU generator, so the tracker swaps that one: the
    semantics (distinct streams per tensor-parallel rank, restored afterwards) are unchanged.
    """
    replace("torch.cuda.get_rng_state", lambda device="cuda": torch.get_rng_state())
    replace("torch.cuda.set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    replace("torch.cuda.manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    # torch.manual_seed also calls torch.cuda.manual_seed_all, with the same seed.
    replace("torch.cuda.manual_seed_all", lambda seed: torch.default_generator.manual_seed(int(seed)))
    replace(
        "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
    )
    replace(
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
    )
    # fork() warns when the CPU generator moves inside a fork; here that is the forked generator.
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    replace_attribute(
        logger, "filters", logger.filters + [_DropForkWarning()], label="tensor_parallel.random logger"
    )


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@megatron_change(
    targets=["megatron.training.training.initialize_megatron"],
    versions="megatron-core 0.19.x (megatron/training)",
    fixed_upstream_when="pretrain() lets a caller pass allow_no_cuda to initialize_megatron",
)
def training_loop_initializes_without_cuda():
    """Megatron's training loop initialises on a machine without CUDA.

    ``pretrain`` calls ``initialize_megatron()``, which asserts ``torch.cuda.is_available()``
    unless ``allow_no_cuda=True`` is passed; the replacement passes it.
    """
    initialize_megatron = original("megatron.training.training.initialize_megatron")

    def initialize_megatron_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    replace("megatron.training.training.initialize_megatron", initialize_megatron_without_cuda)


@megatron_change(
    targets=["megatron.training.arguments.validate_args"],
    versions="megatron-core 0.19.x (megatron/training)",
    fixed_upstream_when="validate_args asks for the GPU's compute capability for --moe-grouped-gemm only "
    "when CUDA is available",
)
def grouped_gemm_experts_pass_argument_checks_on_cpu():
    """``--moe-grouped-gemm`` passes Megatron's argument check on the CPU.

    ``validate_args`` asserts a compute capability of at least 8.0 for grouped-GEMM kernels, and CPU
    mode reports 0.0 (``cuda_runtime_calls_become_cpu_no_ops``).  On the CPU the local backend's
    grouped experts run ``torch.nn.functional.grouped_mm``'s CPU kernel
    (``megatron_dsv3.model.grouped_experts``).  The replacement validates with the flag off and
    puts it back, so every other check runs as Megatron wrote it.
    """
    validate_args = original("megatron.training.arguments.validate_args")

    def validate_args_with_grouped_gemm_on_cpu(args, defaults={}):
        grouped = getattr(args, "moe_grouped_gemm", False)
        args.moe_grouped_gemm = False
        try:
            return validate_args(args, defaults)
        finally:
            args.moe_grouped_gemm = grouped

    replace("megatron.training.arguments.validate_args", validate_args_with_grouped_gemm_on_cpu)


@megatron_change(
    targets=[
        "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
        "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
    ],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="clip_grad_by_total_norm_fp32 checks the dtype (float32) rather than the "
    "legacy type string 'torch.cuda.FloatTensor'",
)
def gradient_clipping_accepts_cpu_tensors():
    """Gradient clipping accepts fp32 gradients on the CPU.

    ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'`` and scales
    with a CUDA overflow buffer.  The replacement makes the same checks (``grad`` fp32,
    ``decoupled_grad`` fp32 or bf16) and multiplies each gradient by
    ``min(1, max_norm / (total_norm + 1e-6))``: the same arithmetic.
    """

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
        for grad in grads:
            if grad.dtype not in allowed:
                raise TypeError(f"gradient clipping expects {attr} in {allowed}, got {grad.dtype} (Megatron asserts)")
        coeff = max_norm / (total_norm + 1.0e-6)
        if isinstance(coeff, torch.Tensor):
            coeff = coeff.clamp_max(1.0)
        elif coeff >= 1.0:
            return
        with torch.no_grad():
            for grad in grads:
                grad.mul_(coeff)

    replace("megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    replace("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)


@megatron_change(
    targets=["torch._dynamo.config.disable", "environment CUDA_DEVICE_MAX_CONNECTIONS"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="(not a fix) CPU runs always want these settings",
)
def cpu_runs_skip_compilation_and_cuda_settings():
    """TorchDynamo is off, and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set, for CPU runs.

    Megatron's jit fuser wraps small functions in ``torch.compile``, whose first call costs about
    10 s on CPU for no gain at these sizes; with TorchDynamo off they run eagerly.  Megatron's
    ``validate_args`` requires ``CUDA_DEVICE_MAX_CONNECTIONS=1`` whenever TP or CP > 1 on a device
    older than Blackwell, and CPU mode reports compute capability 0.0; the variable means nothing
    without CUDA.  An explicit user setting of the variable is kept.
    """
    import torch._dynamo

    replace_attribute(torch._dynamo.config, "disable", True, label="torch._dynamo.config.disable")
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") is None:
        set_environment("CUDA_DEVICE_MAX_CONNECTIONS", "1")


# Megatron tells a parameter's precision by its legacy type string; CUDA ones are the only accepted.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_parameters_report_cuda_types():
    """While open, ``param.type()`` (no argument) of an fp32/fp16/bf16 CPU ``Parameter`` answers
    the CUDA type name of its dtype; any other call, tensor or dtype answers as before."""
    parameter = torch.nn.Parameter
    own = parameter.__dict__.get("type")
    tensor_type = torch.Tensor.type

    def type_name(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return tensor_type(self, *args, **kwargs)

    parameter.type = type_name
    try:
        yield
    finally:
        if own is None:
            del parameter.type
        else:
            parameter.type = own


@megatron_change(
    targets=["megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="Float16OptimizerWithFloat16Params sorts parameters by dtype rather than by the "
    "type strings 'torch.cuda.BFloat16Tensor' / 'torch.cuda.FloatTensor'",
)
def mixed_precision_optimizer_takes_cpu_parameters():
    """Megatron's BF16 optimizer (fp32 master weights) accepts the CPU model's parameters.

    With ``--bf16`` (and without the distributed optimizer) Megatron wraps Adam in
    ``Float16OptimizerWithFloat16Params``, whose constructor gives every bf16/fp16 parameter an
    fp32 master copy and keeps fp32 ones as they are, telling them apart by ``param.type()``: only
    ``torch.cuda.{BFloat16,Half,Float}Tensor`` are accepted, anything else is a TypeError.  During
    the constructor, a CPU parameter of one of those three dtypes reports the CUDA type name of its
    dtype, so it is sorted exactly as on a GPU; a parameter of any other dtype (float64) still
    raises the same TypeError.  Everything after construction (gradient copies, the step, the copy
    of master weights back to the bf16 parameters) already runs on CPU tensors.
    """
    init = original("megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__")

    @functools.wraps(init)
    def init_with_cpu_parameters(self, *args, **kwargs):
        with _cpu_parameters_report_cuda_types():
            init(self, *args, **kwargs)

    replace("megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__", init_with_cpu_parameters)
