"""The recipe schema: one dataclass per YAML section, one field per key (plain data).

Every field carries a one-line ``doc`` (and ``choices`` where the value is an enumeration) in its
metadata; :mod:`megatron_dsv3.recipe.loader` reads the types and choices from here to check a YAML
file, and ``docs/recipes.md`` documents the same keys (a test keeps the two in step).

Key names follow Megatron-LM's own argument names (``training.lr_warmup_iters`` is
``--lr-warmup-iters``), the paper's names for model fields (see :mod:`megatron_dsv3.model.presets`), and
``ParallelLayout``'s names for parallel sizes.  Defaults of optimizer hyper-parameters are
DeepSeek-V3's (section 4.2 of the technical report); other defaults are Megatron's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.plan import FP8_BACKENDS
from megatron_dsv3.fp8.recipes import BLOCK_KINDS, MOMENTS, OPTIONAL_BF16, RECIPES, SCALES, FP8Recipe, named_recipe
from megatron_dsv3.model.backends import EXPERTS
from megatron_dsv3.model.presets import ModelPreset, get_preset
from megatron_dsv3.parallel.layout import SCHEDULES

# Top-level sections a user may expect, and the keys that hold them instead.
MOVED_SECTIONS = {
    "schedule": ("the pipeline schedule", "parallel.schedule (with parallel.zero_bubble and parallel.fb_overlap)",
                 "parallel:\n  schedule: dualpipev"),
}

# Megatron-Core's selective recompute modules (TransformerConfig.recompute_modules, 0.19).
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def key(default=None, doc: str = "", *, choices: tuple | None = None, factory=None, yaml: str | None = None):
    """A schema key: its default, a one-line description, optionally the allowed values, and the
    YAML name when it differs from the field name."""
    meta = {"doc": doc, "choices": choices, "yaml": yaml}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """``model:``: a named preset plus any :class:`ModelPreset` field as an override."""

    preset: str = key(None, "name of a model preset (megatron_dsv3.model.presets.PRESETS)")
    overrides: dict = key(doc="ModelPreset fields written next to `preset`, e.g. num_layers: 8",
                          factory=dict)
    experts: str = key("auto", "routed experts: grouped (one grouped GEMM per projection), sequential (one GEMM"
                       " per expert), or auto (grouped wherever it runs); --dsv3-experts", choices=EXPERTS)


@dataclass
class HardwareSection:
    device: str = key("cuda", "where the job runs", choices=("cuda", "cpu"))
    gpu: str | None = key(None, "GPU model, free text (shown in reports)")
    gpu_memory_gb: float | None = key(None, "memory of one GPU in GiB, the budget `check` compares against")
    gpus_per_node: int = key(8, "GPUs per node (the report says how many nodes an EP group spans)")


@dataclass
class ParallelSection:
    world_size: int = key(1, "number of GPUs (processes) the recipe is planned for")
    tp: int = key(1, "tensor-parallel size (--tensor-model-parallel-size)")
    pp: int = key(1, "pipeline-parallel size (--pipeline-model-parallel-size)")
    vpp: int | None = key(None, "virtual stages per pipeline rank (interleaved 1F1B); null for none")
    ep: int = key(1, "expert-parallel size (--expert-model-parallel-size)")
    etp: int = key(1, "expert tensor-parallel size (--expert-tensor-parallel-size)")
    cp: int = key(1, "context-parallel size (--context-parallel-size)")
    sp: bool = key(False, "sequence parallelism (--sequence-parallel); required when tp > 1")
    layout: str | None = key(None, "Megatron --pipeline-model-parallel-layout string for uneven stages"
                             " (dualpipe/dualpipev: the stages in model order)")
    schedule: str | None = key(None, "pipeline schedule (--pipeline-schedule); null = 1f1b, or interleaved"
                               " with vpp", choices=SCHEDULES)
    zero_bubble: bool | None = key(None, "dualpipe/dualpipev: split backwards into input- and weight-gradient"
                                   " parts (--dualpipe-zero-bubble); null = on where it can run (the local"
                                   " backend, or Transformer Engine without the F&B overlap), else off; `check`"
                                   " says which")
    fb_overlap: bool | None = key(None, "dualpipe/dualpipev: overlap paired forwards and backwards"
                                  " (--dualpipe-fb-overlap); null = on where it can run (ep > 1, no full or"
                                  " `moe` recompute, at most one MTP layer), else off; `check` says which")


@dataclass
class RecomputeSection:
    granularity: str = key("none", "activation recompute: none, selective modules, or full layers",
                           choices=("none", "selective", "full"))
    modules: list[str] = key(doc="selective: Megatron --recompute-modules", factory=list,
                             choices=RECOMPUTE_MODULES)
    method: str | None = key(None, "full: uniform or block (--recompute-method)", choices=("uniform", "block"))
    num_layers: int | None = key(None, "full: layers per recompute unit (--recompute-num-layers)")


@dataclass
class TrainingSection:
    micro_batch_size: int = key(1, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int | None = key(None, "sequences per optimizer step; null = micro_batch_size x dp")
    rampup_batch_size: list[int] | None = key(
        None, "[start, increment, ramp samples]: batch size ramp (becomes --step-batch-size-schedule)")
    train_iters: int | None = key(None, "optimizer steps (set this or train_samples)")
    train_samples: int | None = key(None, "sequences to train on (set this or train_iters)")
    lr: float = key(2.2e-4, "peak learning rate")
    min_lr: float = key(2.2e-5, "learning rate at the end of the decay")
    lr_decay_style: str = key("cosine", "learning-rate decay after warmup",
                              choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_warmup_iters: int = key(0, "linear warmup steps (iteration-based training)")
    lr_warmup_samples: int = key(0, "linear warmup sequences (sample-based training)")
    lr_decay_iters: int | None = key(None, "steps over which the rate decays; null = train_iters")
    lr_decay_samples: int | None = key(None, "sequences over which the rate decays; null = train_samples")
    lr_wsd_decay_style: str | None = key(None, "WSD: shape of the final decay",
                                         choices=("exponential", "linear", "cosine", "minus_sqrt"))
    lr_wsd_decay_iters: int | None = key(None, "WSD: steps of the final decay")
    lr_wsd_decay_samples: int | None = key(None, "WSD: sequences of the final decay")
    weight_decay: float = key(0.1, "AdamW weight decay")
    adam_beta1: float = key(0.9, "AdamW beta1")
    adam_beta2: float = key(0.95, "AdamW beta2")
    clip_grad: float = key(1.0, "gradient-norm clipping")
    seed: int = key(1234, "random seed")
    use_distributed_optimizer: bool = key(False, "shard optimizer states over data-parallel ranks (ZeRO-1)")
    recompute: RecomputeSection = key(doc="activation recompute (null or none for no recompute)",
                                      factory=RecomputeSection)
    log_interval: int = key(10, "steps between log lines")
    eval_interval: int = key(1000, "steps between evaluations")
    eval_iters: int = key(10, "batches per evaluation")


@dataclass
class DataSection:
    source: str = key("embedded", "embedded corpus, Megatron mock data, or your own files",
                      choices=("embedded", "mock", "files"))
    paths: list[str | float] | None = key(None, "files: Megatron --data-path list (weights allowed)")
    tokenizer_type: str | None = key(None, "files: Megatron --tokenizer-type")
    tokenizer_model: str | None = key(None, "files: Megatron --tokenizer-model (a local file or folder)")
    split: str = key("949,50,1", "files: train,valid,test proportions (--split)")
    cache_dir: str | None = key(None, "embedded: where the corpus is unpacked (null = the default cache)")


@dataclass
class CheckpointSection:
    save: str | None = key(None, "folder to save checkpoints to (--save)")
    load: str | None = key(None, "folder to resume from (--load)")
    save_interval: int | None = key(None, "steps between checkpoints (--save-interval)")
    format: str = key("torch_dist", "checkpoint format (--ckpt-format)",
                      choices=("torch", "torch_dist", "torch_dcp", "fsdp_dtensor"))
    use_checkpoint_opt_param_scheduler: bool = key(
        False, "on resume, keep the checkpoint's LR and weight-decay schedule (--use-checkpoint-opt_param-scheduler);"
        " false: the recipe's replaces it (--override-opt_param-scheduler), e.g. a longer train_iters")


@dataclass
class LoggingSection:
    """``logging:``: Megatron's own TensorBoard and W&B writers (docs/monitoring.md); the log interval is
    ``training.log_interval``."""

    tensorboard_dir: str | None = key(None, "TensorBoard event folder (--tensorboard-dir); null = no TensorBoard")
    tensorboard_log_interval: int = key(1, "steps between TensorBoard scalars (--tensorboard-log-interval)")
    wandb_project: str | None = key(None, "W&B project (--wandb-project); null = no W&B")
    wandb_entity: str | None = key(None, "W&B entity, a team or user (--wandb-entity)")
    wandb_run_name: str | None = key(None, "W&B run name (--wandb-exp-name); null = the recipe's name")
    wandb_mode: str = key("online", "W&B mode where the job runs (--dsv3-wandb-mode sets WANDB_MODE); offline"
                          " writes the run locally, for `wandb sync`", choices=("online", "offline", "disabled"))
    wandb_dir: str | None = key(None, "folder of the W&B run files (--wandb-save-dir); null = <checkpoint.save>/wandb")
    timing_log_level: int = key(0, "Megatron's timers: 0 step time only, 1 forward/backward/optimizer,"
                                " 2 everything (--timing-log-level)", choices=(0, 1, 2))


@dataclass
class ProfilingSection:
    """``profiling:``: Megatron's own profilers over steps ``step_start``..``step_end`` (docs/monitoring.md).
    Every DualPipe / DualPipeV operation is a named range in both (``F0.3``, ``B1.2``, ``W1.2``,
    ``F0.4&B1.1``, as ``megatron-dsv3 schedule --order`` prints them)."""

    torch_profiler: bool = key(False, "PyTorch profiler (--profile --use-pytorch-profiler); the Chrome trace goes to"
                               " <logging.tensorboard_dir>/../torch_profile/rank-N.json.gz")
    nsys: bool = key(False, "Nsight Systems capture range (--profile: cudaProfilerStart/Stop, NVTX); run under"
                     " `nsys profile --capture-range=cudaProfilerApi`; GPU only")
    step_start: int = key(10, "first profiled step (--profile-step-start)")
    step_end: int = key(12, "step at which profiling stops (--profile-step-end)")
    ranks: list[int] = key(doc="global ranks to profile (--profile-ranks); empty = every rank", factory=list)
    record_shapes: bool = key(False, "record tensor shapes (--pytorch-profiler-collect-shapes / --record-shapes)")
    memory_snapshot: str | None = key(None, "CUDA memory snapshot file, rewritten every log interval"
                                      " (--record-memory-history --memory-snapshot-path); GPU only")
    nvtx_ranges: bool = key(False, "Megatron's NVTX ranges inside its modules while profiling (--nvtx-ranges)")


# ---- FP8 (megatron_dsv3.fp8, docs/fp8.md) ----
@dataclass
class FP8Section:
    """``fp8:``: a named FP8 recipe and overrides of its fields (null keeps the recipe's value)."""

    recipe: str | None = key(None, "named FP8 recipe: deepseek or te-blockwise; null = no FP8", choices=tuple(RECIPES))
    backend: str = key("auto", "what runs the FP8 GEMMs (auto: Transformer Engine with that backend, else"
                       " pytorch on a GPU, emulated on CPU)", choices=FP8_BACKENDS)
    scale: str | None = key(None, "scales: fp32 (amax/448) or pow2 (powers of two)", choices=SCALES)
    block_size: int | None = key(None, "block length along K, also the FP32 promotion interval (128)")
    activation_block: str | None = key(None, "activation blocks: 1d (1 x block) or 2d (block x block)",
                                       choices=BLOCK_KINDS)
    weight_block: str | None = key(None, "weight blocks: 1d or 2d (DeepSeek: 2d, 128x128)", choices=BLOCK_KINDS)
    grad_block: str | None = key(None, "activation-gradient blocks: 1d or 2d (DeepSeek: 1d; 2d diverged,"
                                 " appendix B.2)", choices=BLOCK_KINDS)
    margin: int | None = key(None, "scale headroom: scale_inv = amax * 2^margin / 448")
    amax_epsilon: float | None = key(None, "floor of each block's amax")
    bf16_first_layers: int | None = key(None, "keep the first N decoder layers in BF16 (with Transformer Engine"
                                        " at most layers // pp)")
    bf16_last_layers: int | None = key(None, "keep the last N decoder layers in BF16 (with Transformer Engine"
                                       " at most layers // pp)")
    bf16_modules: list[str] | None = key(None, "also keep these in BF16", choices=OPTIONAL_BF16)
    moments: str | None = key(None, "AdamW moments: bf16 (precision-aware optimizer; needs Transformer Engine's"
                              " FusedAdam) or fp32", choices=MOMENTS)

    OVERRIDES = ("scale", "block_size", "activation_block", "weight_block", "grad_block", "margin",
                 "amax_epsilon", "bf16_first_layers", "bf16_last_layers", "bf16_modules", "moments")

    def resolved(self) -> FP8Recipe | None:
        """The recipe with this section's overrides, None without FP8."""
        if self.recipe is None:
            return None
        return named_recipe(self.recipe).with_overrides(**{k: getattr(self, k) for k in self.OVERRIDES})


@dataclass
class Recipe:
    """A training job: model, parallel layout, hyper-parameters, data, checkpoints."""

    name: str = key(None, "recipe name (default: the file name without .yaml)")
    description: str = key("", "one line saying what the recipe is for")
    model: ModelSection = key(doc="preset and overrides", factory=ModelSection)
    backend: str = key("auto", "layer implementation (auto: Transformer Engine on a GPU that has it)",
                       choices=("auto", "transformer_engine", "local"))
    precision: str = key("bf16", "parameter and activation precision", choices=("bf16", "fp32"))
    hardware: HardwareSection = key(doc="the machines", factory=HardwareSection)
    parallel: ParallelSection = key(doc="parallel sizes and pipeline layout", factory=ParallelSection)
    training: TrainingSection = key(doc="Megatron training arguments", factory=TrainingSection)
    data: DataSection = key(doc="training data", factory=DataSection)
    checkpoint: CheckpointSection = key(doc="checkpointing", factory=CheckpointSection)
    fp8: FP8Section = key(doc="block-wise FP8 training (docs/fp8.md); absent = BF16", factory=FP8Section)
    logging: LoggingSection = key(doc="TensorBoard and W&B (docs/monitoring.md)", factory=LoggingSection)
    profiling: ProfilingSection = key(doc="profilers and memory snapshots (docs/monitoring.md)",
                                      factory=ProfilingSection)
    # YAML `megatron_args:`; the attribute is `extra_args` because `megatron_args()` is the method.
    extra_args: list[str] = key(doc="raw extra Megatron-LM arguments, appended last", factory=list,
                                yaml="megatron_args")
    # Where the recipe came from: the file, and the line of every key path ("parallel.ep": 12).
    source: str = field(default="<recipe>", metadata={"internal": True})
    lines: dict = field(default_factory=dict, metadata={"internal": True}, repr=False)

    # ---- derived ----
    @property
    def preset(self) -> ModelPreset:
        """The model preset with the recipe's overrides applied."""
        try:
            return get_preset(self.model.preset).with_overrides(**self.model.overrides)
        except ConfigError as err:
            raise self.locate(err, section="model") from None

    @property
    def is_cpu(self) -> bool:
        return self.hardware.device == "cpu"

    def world_size(self, world_size: int | None = None) -> int:
        return self.parallel.world_size if world_size is None else world_size

    # ---- locating errors ----
    def where(self, path: str | None) -> str:
        """``file:line`` of ``path`` (or of the nearest enclosing section that has a line)."""
        while path:
            if path in self.lines:
                line = self.lines[path]  # a line number, or the command-line override that set it
                return line if isinstance(line, str) else f"{self.source}:{line}"
            path = path.rpartition(".")[0]
        return self.source

    def key_path(self, key: str | None, section: str | None = None) -> str | None:
        """The recipe key path for a field name used by :mod:`megatron_dsv3.model.validation`."""
        if key is None:
            return section
        if "." in key:
            return key
        if key == "dp":
            return "parallel.world_size"
        if section is None:
            section = _section_of(key)
        if section == "model" and f"model.{key}" not in self.lines:
            return "model.preset" if key in _MODEL_FIELDS else f"model.{key}"
        return f"{section}.{key}" if section else key

    def locate(self, err: ConfigError, section: str | None = None) -> ConfigError:
        """``err`` placed at the recipe file and line of the key it is about."""
        path = self.key_path(err.key, section)
        problem = err.problem if not path or path in err.problem else f"{path}: {err.problem}"
        located = ConfigError(problem, fix=err.fix, key=path, where=self.where(path))
        located.suggestion = err.suggestion
        located.args = (located._render(),)
        return located


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelPreset)}
_SECTION_FIELDS = {
    "parallel": {f.name for f in dataclasses.fields(ParallelSection)},
    "training": {f.name for f in dataclasses.fields(TrainingSection)},
    "data": {f.name for f in dataclasses.fields(DataSection)},
    "checkpoint": {f.name for f in dataclasses.fields(CheckpointSection)},
    "hardware": {f.name for f in dataclasses.fields(HardwareSection)},
    "fp8": {f.name for f in dataclasses.fields(FP8Section)},
    "logging": {f.name for f in dataclasses.fields(LoggingSection)},
    "profiling": {f.name for f in dataclasses.fields(ProfilingSection)},
}


def _section_of(key: str) -> str | None:
    for section, names in _SECTION_FIELDS.items():
        if key in names:
            return section
    if key in _MODEL_FIELDS:
        return "model"
    return None


def schema_fields(cls) -> list[dataclasses.Field]:
    """The user-visible keys of a section (internal bookkeeping fields left out)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def yaml_name(f: dataclasses.Field) -> str:
    """The key a field has in YAML (``extra_args`` is written ``megatron_args``)."""
    return f.metadata.get("yaml") or f.name
