"""Run-time changes applied only by ``megatron-dsv3 train`` (group ``train``)."""

from __future__ import annotations

import json
import os
import time

from megatron_dsv3.args.settings import reports_loss
from megatron_dsv3.runtime.metrics_changes import step_record
from megatron_dsv3.runtime.registry import megatron_change, original, replace

METRICS_ENV = "MEGATRON_DSV3_METRICS"


class _Progress:
    """Per-step progress from what Megatron's ``training_log`` receives, on the rank with the loss."""

    def __init__(self):
        self.last_time: float | None = None
        self.avg_step: float | None = None

    def step(self, iteration: int, loss_dict: dict, grad_norm, learning_rate=None) -> None:
        from megatron.training import get_args

        now = time.perf_counter()
        elapsed, self.last_time = (None if self.last_time is None else now - self.last_time), now
        figures = step_record(learning_rate)  # on every rank: collective over the pipeline
        if not reports_loss():
            return
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size

        args = get_args()
        if elapsed is not None:
            # The first step includes start-up costs: average from the second one on.
            self.avg_step = elapsed if self.avg_step is None else 0.8 * self.avg_step + 0.2 * elapsed
        tokens = get_current_global_batch_size() * args.seq_length  # follows a batch-size ramp
        loss = loss_dict.get("lm loss")
        loss = float(loss) if loss is not None else float("nan")
        remaining = max(args.train_iters - iteration, 0) if args.train_iters else 0
        tokens_per_s = tokens / elapsed if elapsed else None
        eta = remaining * self.avg_step if self.avg_step else None
        print(
            f"[megatron-dsv3] step {iteration}/{args.train_iters} | loss {loss:.4f} | "
            + (f"{tokens_per_s:,.0f} tokens/s | " if tokens_per_s else "tokens/s n/a (first step) | ")
            + (f"ETA {_duration(eta)}" if eta is not None else "ETA n/a"),
            flush=True,
        )
        path = os.environ.get(METRICS_ENV)
        if path:
            record = {
                "iteration": iteration,
                "lm_loss": loss,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                # As Megatron's log line shows it: set after the step's update, the rate of the next step.
                "learning_rate": None if learning_rate is None else float(learning_rate),
                "step_seconds": elapsed,
                "tokens_per_second": tokens_per_s,
                "time": time.time(),
                **figures,
            }
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


@megatron_change(
    targets=["megatron.training.training.training_log"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="(not a fix) Megatron's log line gains tokens/s and an ETA",
)
def training_log_reports_progress():
    """Every step prints a progress line: loss, tokens/s and ETA (and appends it to a metrics file).

    Megatron's own log line appears every ``--log-interval`` steps and has no throughput in tokens
    or time remaining.  After Megatron's ``training_log`` runs, the rank that holds the loss (the
    placement's loss rank; data-, tensor- and context-parallel rank 0) prints ``[megatron-dsv3]
    step i/N | loss x | t tokens/s | ETA`` and, when ``MEGATRON_DSV3_METRICS`` names a file,
    appends the same figures to it as a JSON line, with the learning rate and the step's figures
    :mod:`megatron_dsv3.runtime.metrics_changes` keeps (MTP and load-balancing losses, the
    experts' load spread per MoE layer).  Only
    ``megatron-dsv3 train`` applies this change; stock ``pretrain_gpt.py`` runs are untouched.
    """
    training_log = original("megatron.training.training.training_log")
    progress = _Progress()

    def training_log_with_progress(
        loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
        skipped_iter, grad_norm, *args, **kwargs
    ):
        result = training_log(
            loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
            skipped_iter, grad_norm, *args, **kwargs,
        )
        progress.step(iteration, loss_dict, grad_norm, learning_rate)
        return result

    replace("megatron.training.training.training_log", training_log_with_progress)
