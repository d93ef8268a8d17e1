"""Run-time changes that make stock Megatron-LM take ``--spec dsv3`` (group ``launch``).

Applied by :func:`megatron_dsv3.runtime.activation.activate`, from the start-up hook when
``megatron.training`` is imported or from the explicit patch in ``patches/``.
"""

from __future__ import annotations

import sys

from megatron_dsv3.args.options import add_dsv3_arguments
from megatron_dsv3.args.settings import apply_plugin_options, attach_model_options, attach_placement
from megatron_dsv3.model.spec_names import is_dsv3_spec, is_dsv3_spec_object, resolve_spec
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.placement import placement_of
from megatron_dsv3.runtime.cpu_mode import enable_cpu_mode
from megatron_dsv3.runtime.registry import megatron_change, original, replace

_ARGUMENT_UTILS = "megatron.training.argument_utils"
# Megatron-LM's top-level scripts that bind `import_module` at import time.
_SCRIPTS = ("gpt_builders", "hybrid_builders")


@megatron_change(
    targets=[
        "megatron.core.transformer.spec_utils.import_module",
        "megatron.training.argument_utils.import_module",
    ],
    versions="megatron-core 0.19.x (every version with `--spec <module> <name>`)",
    fixed_upstream_when="spec_utils.import_module accepts a single registered name and raises "
    "instead of logging and returning None",
)
def spec_names_resolve_through_the_registry():
    """``--spec`` accepts a registered name (``--spec dsv3``) and never falls back silently.

    Stock Megatron does ``base_path, name = args.spec``, so a single token raises ValueError, and
    when the import of a ``<module> <name>`` pair fails it logs an error and returns None, which
    silently trains Megatron's default model instead.  The replacement resolves one token through
    the spec registry (entry points ``megatron_dsv3.specs``), keeps the pair form, and raises an
    error naming the registered specs on any failure.  ``ModuleSpec`` tuples that Megatron resolves
    through the same function keep working.
    """
    targets = ["megatron.core.transformer.spec_utils.import_module", f"{_ARGUMENT_UTILS}.import_module"]
    for name in _SCRIPTS:  # Megatron-LM's scripts, when they were imported before Megatron's training
        if hasattr(sys.modules.get(name), "import_module"):
            targets.append(f"{name}.import_module")
    for target in targets:
        replace(target, _registry_import_module())


def _registry_import_module():

    def import_module(module_path):
        return resolve_spec(module_path)

    return import_module


@megatron_change(
    targets=[
        "megatron.training.arguments.add_megatron_arguments",
        "megatron.training.arguments.parse_args",
    ],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="Megatron-LM offers a plugin hook for extra arguments (today only the "
    "script's own extra_args_provider can add them)",
)
def plugin_options_join_megatron_parser():
    """The plugin's options (group "megatron-dsv3") join Megatron's argument parser.

    ``--dsv3-backend auto|transformer_engine|local``, ``--dsv3-cpu`` and ``--pipeline-schedule``
    are added to every parser Megatron builds, so stock ``pretrain_gpt.py`` accepts them.  Right
    after parsing, and only when ``--spec`` names a megatron-dsv3 spec or one of the options was
    given, they take effect (``megatron_dsv3.args.settings``): the backend is resolved on this
    machine and sets ``--transformer-impl`` and what it needs, ``--dsv3-cpu`` enables CPU mode, a
    DeepSeek schedule sets two virtual stages per rank and keeps its stage layout for the placement.
    """
    add_megatron_arguments = original("megatron.training.arguments.add_megatron_arguments")
    parse_args = original("megatron.training.arguments.parse_args")

    def add_megatron_arguments_and_dsv3(parser):
        return add_dsv3_arguments(add_megatron_arguments(parser))

    def parse_args_and_apply_dsv3(extra_args_provider=None, ignore_unknown_args=False):
        args = parse_args(extra_args_provider, ignore_unknown_args)
        explicit = (getattr(args, "dsv3_cpu", False) or getattr(args, "dsv3_backend", "auto") != "auto"
                    or getattr(args, "pipeline_schedule", None) is not None
                    or getattr(args, "dsv3_fp8", None) is not None)
        if explicit or is_dsv3_spec(getattr(args, "spec", None)):
            if getattr(args, "dsv3_cpu", False):
                enable_cpu_mode()
            apply_plugin_options(args)
        return args

    replace("megatron.training.arguments.add_megatron_arguments", add_megatron_arguments_and_dsv3)
    replace("megatron.training.arguments.parse_args", parse_args_and_apply_dsv3)


@megatron_change(
    targets=["megatron.training.models.gpt.mtp_block_spec"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="GPTModelBuilder builds the MTP block from the user's --spec",
)
def mtp_is_built_from_the_dsv3_spec():
    """Multi-Token Prediction is built from the ``dsv3`` spec, not Megatron's default one.

    Megatron 0.19's ``GPTModelBuilder`` rebuilds the MTP block from its default layer specs even
    when ``--spec`` is given, which would give MTP the wrong attention and MoE modules (and, on
    the local backend, Megatron's broken local MLA).  The ``dsv3`` block spec carries its own MTP
    spec (``DSV3BlockSubmodules.mtp_block_spec``); any other spec keeps Megatron's behaviour.
    """
    mtp_block_spec = original("megatron.training.models.gpt.mtp_block_spec")

    def mtp_block_spec_from_dsv3(config, transformer_layer_spec, vp_stage=None):
        if hasattr(transformer_layer_spec, "mtp_block_spec"):
            return transformer_layer_spec.mtp_block_spec
        return mtp_block_spec(config, transformer_layer_spec, vp_stage=vp_stage)

    replace("megatron.training.models.gpt.mtp_block_spec", mtp_block_spec_from_dsv3)


@megatron_change(
    targets=["megatron.core.datasets.utils.compile_helpers"],
    versions="megatron-core 0.19.x wheels (they ship helpers_cpp prebuilt but no Makefile)",
    fixed_upstream_when="initialize_megatron skips compiling when helpers_cpp already imports",
)
def prebuilt_dataset_helpers_are_used():
    """The training loop uses the dataset helpers the megatron-core wheel ships prebuilt.

    ``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` on rank 0 to build the C++
    index helpers; the megatron-core wheel contains the compiled ``helpers_cpp`` module but no
    Makefile, so ``make`` fails and Megatron exits.  The replacement skips ``make`` when
    ``helpers_cpp`` imports and otherwise compiles as before (a Megatron-LM checkout).
    """
    compile_helpers = original("megatron.core.datasets.utils.compile_helpers")

    def compile_helpers_unless_prebuilt():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()

    replace("megatron.core.datasets.utils.compile_helpers", compile_helpers_unless_prebuilt)


@megatron_change(
    targets=[
        "megatron.training.argument_utils.core_transformer_config_from_args",
        "megatron.training.arguments.core_transformer_config_from_args",
    ],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="Megatron-Core can express a placement other than the interleaved order "
    "(PipelineParallelLayerLayout maps stage s to rank s % pp)",
)
def configs_carry_the_dualpipe_placement():
    """Under ``--pipeline-schedule dualpipe|dualpipev`` a config carries the schedule's placement.

    Megatron's layout object hard-codes the interleaved order, in which a V (rank ``r`` holding
    stages ``r`` and ``2pp-1-r``) cannot be written.  Every ``TransformerConfig`` Megatron makes
    from the arguments gets the placement as its ``pipeline_model_parallel_layout`` (a subclass of
    Megatron's layout that answers from the placement, ``megatron_dsv3.parallel.placement``), so
    layer building, layer numbering and checkpoint keys follow it.  Without those schedules the
    config is returned unchanged.  The same wrapper attaches the model options the arguments imply
    (``megatron_dsv3.model.options``: the FP8 plan of ``--dsv3-fp8``, its provider and BF16 policy).
    """
    make_config = original("megatron.training.argument_utils.core_transformer_config_from_args")

    def core_transformer_config_from_args(args, config_class=None):
        config = make_config(args, config_class) if config_class is not None else make_config(args)
        return attach_model_options(attach_placement(config, args), args)  # and the FP8 plan (--dsv3-fp8)

    replace("megatron.training.argument_utils.core_transformer_config_from_args", core_transformer_config_from_args)
    replace("megatron.training.arguments.core_transformer_config_from_args", core_transformer_config_from_args)


@megatron_change(
    targets=["megatron.training.argument_utils.gpt_config_from_args"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="GPTModelBuilder takes pre_process/post_process from the pipeline layout "
    "instead of 'first/last rank and virtual stage'",
)
def dsv3_models_are_built_for_their_placement():
    """A ``dsv3`` model is built by ``DSV3ModelBuilder``, which gives each chunk its placement's roles.

    Megatron's ``GPTModelBuilder`` decides ``pre_process`` (embedding) and ``post_process`` (head
    and loss) as "first rank, first virtual stage" and "last rank, last virtual stage"; under
    DualPipeV both are on rank 0.  For a config whose spec is megatron-dsv3's, ``gpt_config_from_args``
    names ``megatron_dsv3.model.build.DSV3ModelBuilder`` (Megatron's ``builder`` hook), a subclass that
    asks the placement for each chunk's roles and otherwise builds exactly as Megatron does; the
    same builder builds the tests' models.  Other specs keep Megatron's builder.
    """
    gpt_config_from_args = original("megatron.training.argument_utils.gpt_config_from_args")

    def gpt_config_from_args_with_dsv3_builder(args, *a, **kw):
        # lazy: the start-up hook activates while megatron.training is first imported, which may be
        # from inside megatron_dsv3.model.build itself (its import of megatron.training.models).
        from megatron_dsv3.model.build import use_dsv3_builder

        model_config = gpt_config_from_args(args, *a, **kw)
        if is_dsv3_spec_object(model_config.transformer_layer_spec):
            use_dsv3_builder(model_config)
        return model_config

    replace("megatron.training.argument_utils.gpt_config_from_args", gpt_config_from_args_with_dsv3_builder)


@megatron_change(
    targets=[
        "megatron.core.pipeline_parallel.schedules.get_forward_backward_func",
        "megatron.core.pipeline_parallel.get_forward_backward_func",
        "megatron.training.training.get_forward_backward_func",
    ],
    versions="megatron-core 0.19.x (no DualPipe in any release)",
    fixed_upstream_when="get_forward_backward_func offers DualPipe / DualPipeV",
)
def training_loop_runs_dualpipe():
    """``--pipeline-schedule dualpipe|dualpipev`` replaces the schedule Megatron's loop runs.

    Megatron's ``train_step`` and ``evaluate`` call whatever ``get_forward_backward_func`` returns,
    which picks 1F1B or interleaved from the pipeline sizes alone.  The replacement returns a
    function with the same signature that runs ``megatron_dsv3.pipeline.runner`` when the model's
    config carries a DualPipe(V) placement and Megatron's own choice otherwise (training,
    evaluation and ``forward_only`` alike).
    """
    get_forward_backward_func = original("megatron.core.pipeline_parallel.schedules.get_forward_backward_func")

    def get_forward_backward_func_with_dualpipe(*args, **kwargs):
        megatron_choice = get_forward_backward_func(*args, **kwargs)

        def forward_backward(**step_kwargs):
            from megatron.core.utils import get_model_config

            model = step_kwargs["model"]
            config = get_model_config(model[0] if isinstance(model, list) else model)
            if placement_of(config).schedule in DEEPSEEK_SCHEDULES:
                # lazy: the runner imports megatron_dsv3.model.build (see the builder change above).
                from megatron_dsv3.pipeline.runner import dualpipe_forward_backward

                return dualpipe_forward_backward(**step_kwargs)
            return megatron_choice(**step_kwargs)

        return forward_backward

    for target in ("megatron.core.pipeline_parallel.schedules.get_forward_backward_func",
                   "megatron.core.pipeline_parallel.get_forward_backward_func",
                   "megatron.training.training.get_forward_backward_func"):
        replace(target, get_forward_backward_func_with_dualpipe)


@megatron_change(
    targets=[
        "megatron.core.pipeline_parallel.schedules.forward_step_calc_loss",
        "megatron.training.utils.common_utils.is_first_or_last_pipeline_stage",
        "megatron.training.utils.is_first_or_last_pipeline_stage",
        "megatron.core.transformer.module.Float16Module.forward",
    ],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="Megatron-Core asks its pipeline layout, not 'first/last rank and virtual "
    "stage', which chunk embeds the tokens and which holds the loss",
)
def stage_roles_follow_the_dualpipe_placement():
    """Where Megatron decides "first stage" / "last stage" per chunk, a DualPipe(V) placement answers.

    Under DualPipeV the loss is on rank 0's second chunk, which Megatron's predicates call neither
    first nor last.  Three places need the placement's answer: the loss computation of the
    overlapped forward/backward step (``forward_step_calc_loss`` when called without
    ``is_last_stage``), the data a chunk is given (``is_first_or_last_pipeline_stage``, used by
    ``pretrain_gpt.py``'s ``get_batch`` and dataset builder), and the bf16 wrapper's conversions
    (``Float16Module`` casts the inputs of the chunk that embeds and the outputs of the chunk with
    the loss).  Other placements keep Megatron's answers.
    """
    calc_loss = original("megatron.core.pipeline_parallel.schedules.forward_step_calc_loss")
    float16_forward = original("megatron.core.transformer.module.Float16Module.forward")

    def dualpipe_chunk(config, vp_stage):
        from megatron.core import parallel_state

        placement = placement_of(config)
        if placement.schedule not in DEEPSEEK_SCHEDULES:
            return None
        return placement.chunk(parallel_state.get_pipeline_model_parallel_rank(), vp_stage)

    def forward_step_calc_loss(model, output_tensor, loss_func, config, vp_stage, *args, **kwargs):
        if kwargs.get("is_last_stage") is None and len(args) < 5:
            chunk = dualpipe_chunk(config, vp_stage)
            if chunk is not None:
                from megatron.core import parallel_state

                kwargs["is_last_stage"] = chunk.loss
                kwargs["cp_group_size"] = parallel_state.get_context_parallel_world_size()
        return calc_loss(model, output_tensor, loss_func, config, vp_stage, *args, **kwargs)

    is_first_or_last = original("megatron.training.utils.common_utils.is_first_or_last_pipeline_stage")

    def is_first_or_last_pipeline_stage(vp_stage):
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        chunk = dualpipe_chunk(core_transformer_config_from_args(get_args()), vp_stage)
        if chunk is None:
            return is_first_or_last(vp_stage)
        return chunk.embedding or chunk.loss

    def forward(self, *inputs, fp32_output=True, **kwargs):
        chunk = dualpipe_chunk(self.config, self.vp_stage)
        if chunk is None:
            return float16_forward(self, *inputs, fp32_output=fp32_output, **kwargs)
        from megatron.core.transformer.module import float16_to_fp32, fp32_to_float16

        if chunk.embedding:
            inputs = fp32_to_float16(inputs, self.float16_convertor)
        outputs = self.module(*inputs, **kwargs)
        return float16_to_fp32(outputs) if chunk.loss and fp32_output else outputs

    replace("megatron.core.pipeline_parallel.schedules.forward_step_calc_loss", forward_step_calc_loss)
    replace("megatron.training.utils.common_utils.is_first_or_last_pipeline_stage", is_first_or_last_pipeline_stage)
    replace("megatron.training.utils.is_first_or_last_pipeline_stage", is_first_or_last_pipeline_stage)
    replace("megatron.core.transformer.module.Float16Module.forward", forward)
