"""Run-time changes that keep, for ``metrics.jsonl``, figures Megatron computes each step (group ``train``).

Megatron reduces the MTP loss, the load-balancing losses and the experts' token counts every step,
then folds them into its log-interval sums (or, for the counts, into the expert bias) and clears
them.  These changes keep this step's values in :data:`STEP` as well; the progress line of
:mod:`megatron_dsv3.runtime.train_changes` takes them when it writes the step's record.  What
Megatron logs, writes to TensorBoard / W&B and updates is unchanged.
"""

from __future__ import annotations

from megatron_dsv3.runtime.registry import megatron_change, original, replace

_MTP = "megatron.core.transformer.multi_token_prediction.MTPLossLoggingHelper.track_mtp_metrics"
_MOE = "megatron.core.transformer.moe.moe_logging.MoEMetricsTracker.report"
_BIAS_UPDATE = "megatron.core.distributed.finalize_model_grads._update_router_expert_bias"
_BIAS_RULE = "megatron.core.distributed.finalize_model_grads.get_updated_expert_bias"


class StepFigures:
    """This step's kept figures: losses by Megatron's name, and per MoE layer the experts' token counts."""

    def __init__(self):
        self.losses: dict[str, float] = {}
        self.expert_load: dict[str, list[float]] = {}  # "2" (decoder layer 2), "mtp1" (MTP depth 1)
        self._layers: list[str] = []

    def take(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        losses, load = self.losses, self.expert_load
        self.losses, self.expert_load = {}, {}
        return losses, load


STEP = StepFigures()


def max_violation(tokens_per_expert: list[float]) -> float:
    """DeepSeek's MaxVio of one layer's load: ``max_i load_i / mean load - 1`` (Wang et al. 2024,
    "Auxiliary-Loss-Free Load Balancing", section 4.1; 0 is a perfect balance)."""
    mean = sum(tokens_per_expert) / len(tokens_per_expert)
    return max(tokens_per_expert) / mean - 1.0 if mean > 0 else 0.0


def _kept_in(total_loss_dict, step: dict) -> None:
    """Add this step's values to Megatron's log-interval sums, as its own code would have."""
    for name, value in step.items():
        STEP.losses[name] = float(value)
        if total_loss_dict is not None:
            total_loss_dict[name] = total_loss_dict[name] + value if name in total_loss_dict else value


@megatron_change(
    targets=[_MTP, _MOE],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="(not a fix) Megatron's training_log returns or exposes the step's MTP and MoE losses",
)
def step_losses_are_kept_for_the_metrics_file():
    """The step's MTP loss and load-balancing losses are kept for ``metrics.jsonl``.

    ``MTPLossLoggingHelper.track_mtp_metrics`` and ``MoEMetricsTracker.report`` reduce the step's
    MTP loss (``mtp_1 loss``) and auxiliary losses (``seq_load_balancing_loss``, ...) across ranks,
    add them to ``training_log``'s log-interval sums and clear their trackers.  Each is now given a
    fresh dict for this step; its values are kept (:data:`STEP`) and added to the caller's sums
    exactly as before.
    """
    track_mtp = original(_MTP)
    report = original(_MOE)

    def track_mtp_metrics(loss_scale, iteration, writer, wandb_writer=None, total_loss_dict=None):
        step: dict = {}
        track_mtp(loss_scale, iteration, writer, wandb_writer, step)
        _kept_in(total_loss_dict, step)

    def report_keeping_losses(self, *args, total_loss_dict=None, **kwargs):
        step: dict = {}
        text = report(self, *args, total_loss_dict=step, **kwargs)
        _kept_in(total_loss_dict, step)
        return text

    replace(_MTP, track_mtp_metrics)  # called on the class, as a static method
    replace(_MOE, report_keeping_losses)


@megatron_change(
    targets=[_BIAS_UPDATE, _BIAS_RULE],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="(not a fix) Megatron logs the per-layer expert load the bias update reduces",
)
def expert_bias_update_keeps_the_expert_load():
    """The experts' token counts of the step, as the expert-bias update reduces them, are kept.

    ``_update_router_expert_bias`` stacks every router's ``local_tokens_per_expert`` and
    ``get_updated_expert_bias`` all-reduces the stack over the tensor-, data- and context-parallel
    ranks before it moves each bias by ``rate * sign(mean - load)`` (DeepSeek-V3 section 2.1.2).
    After that all-reduce the stack holds the global batch's counts per layer: they are kept by
    layer (``"2"``: decoder layer 2, Megatron's 1-based numbers; ``"mtp1"``: the MTP module of
    depth 1), with no extra communication; the bias update is unchanged.
    """
    update = original(_BIAS_UPDATE)
    rule = original(_BIAS_RULE)

    def update_router_expert_bias(model, config, *args, **kwargs):
        from megatron.core.utils import get_attr_wrapped_model

        # The routers in the order the original stacks them (the same selection).
        STEP._layers = [
            f"mtp{module.layer_number}" if getattr(module, "is_mtp_layer", False) else str(module.layer_number)
            for chunk in model for module in get_attr_wrapped_model(chunk, "modules")()
            if hasattr(module, "expert_bias") and module.training and not getattr(module, "frozen_expert_bias", False)
        ]
        return update(model, config, *args, **kwargs)

    def updated_expert_bias(tokens_per_expert, *args, **kwargs):
        updated = rule(tokens_per_expert, *args, **kwargs)  # all-reduces tokens_per_expert in place
        if len(STEP._layers) == tokens_per_expert.shape[0]:
            for layer, counts in zip(STEP._layers, tokens_per_expert.tolist()):
                STEP.expert_load[layer] = counts
        return updated

    replace(_BIAS_UPDATE, update_router_expert_bias)
    replace(_BIAS_RULE, updated_expert_bias)


def step_record(learning_rate) -> dict:
    """This step's kept figures as ``metrics.jsonl`` fields: ``learning_rate``, each loss under its
    Megatron name with ``_`` for spaces (``mtp_1_loss``, ``seq_load_balancing_loss``), and
    ``expert_load_max_violation`` by layer.  Collective over the pipeline ranks (each holds its own
    layers' counts): call it on every rank."""
    losses, load = STEP.take()
    load = _gather_over_pipeline(load)
    record = {"learning_rate": None if learning_rate is None else float(learning_rate)}
    record.update({name.replace(" ", "_"): value for name, value in sorted(losses.items())})
    if load:
        record["expert_load_max_violation"] = {layer: max_violation(load[layer]) for layer in sorted(load, key=layer_order)}
    return record


def layer_order(label: str) -> tuple[int, int]:
    """Decoder layers by number, then the MTP depths."""
    return (1, int(label[3:])) if label.startswith("mtp") else (0, int(label))


def _gather_over_pipeline(load: dict) -> dict:
    import torch
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return load
    group = parallel_state.get_pipeline_model_parallel_group()
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, load, group=group)
    return {layer: counts for part in parts for layer, counts in part.items()}
