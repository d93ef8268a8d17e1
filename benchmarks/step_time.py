"""CPU step time of dsv3-tiny: our ``dsv3`` spec against Megatron-Core's own spec functions.

Both models are built in one process from the same Megatron config (fp32, local backend), with the
same weights, and trained on the same batch; steps alternate between them so drift hits both alike.
Megatron's own MLA spec cannot run MLA on the local backend (its ``DotProductAttention`` rejects
``k_channels``), so the reference takes ``get_gpt_decoder_block_spec`` and
``get_gpt_mtp_block_spec`` as they are and swaps in only a core attention that can run MLA (ours),
which is the smallest change that makes it run.  Target: ratio <= 1.02 (the plugin adds no cost).
Both run Megatron's ``SequentialMLP`` experts; a third row runs ours with grouped experts (the local
backend's default, ``--dsv3-experts grouped``) from the same initial weights.

    python benchmarks/step_time.py [--steps 30] [--warmup 5] [--verbose]

Ours is built exactly as ``megatron-dsv3 train`` builds it (the recipe composer's arguments and
Megatron's builder, through ``megatron_dsv3.testing.parallel.build_chunks``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def megatron_reference_spec(config):
    """Megatron-Core's own block and MTP specs for this config, with an MLA-capable core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    from megatron_dsv3.model.attention import MLACoreAttention

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = MLACoreAttention
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
    return block, mtp


def build_reference(args):
    """``(config, model)``: Megatron's own spec functions, built directly into a DDP-wrapped ``GPTModel``."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.training.training import get_megatron_ddp_config

    from megatron_dsv3.args.settings import transformer_config

    config = transformer_config(args)
    config.finalize_model_grads_func = finalize_model_grads
    spec, mtp = megatron_reference_spec(config)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size or args.vocab_size,
        max_sequence_length=args.seq_length, position_embedding_type="rope", mtp_block_spec=mtp,
        share_embeddings_and_output_weights=False,
    )
    return config, DistributedDataParallel(config, get_megatron_ddp_config(args), model)


GROUPED = "dsv3, grouped experts"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=30)
    cli.add_argument("--warmup", type=int, default=5)
    cli.add_argument("--batch", type=int, default=8)
    cli.add_argument("--verbose", action="store_true", help="show Megatron's logging")
    opts = cli.parse_args()

    from megatron_dsv3.testing.quiet import quiet_megatron, silenced

    quiet_megatron(opts.verbose)
    import torch

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing import parallel
    from megatron_dsv3.train.processes import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    with silenced(opts.verbose):
        parallel.init_parallel(ParallelLayout())
        torch.manual_seed(0)
        config, args, (ours,) = parallel.build_chunks("dsv3-tiny", ParallelLayout(),
                                                      extra_args=("--dsv3-experts", "sequential"))
        ref_config, ref = build_reference(args)
        # The default on the local backend: grouped experts (the same initial weights, from the same seed).
        torch.manual_seed(0)
        grouped_config, _, (grouped,) = parallel.build_chunks("dsv3-tiny", ParallelLayout(),
                                                              extra_args=("--dsv3-experts", "grouped"))
    # Same weights in ours and Megatron's (names and shapes agree one to one: both run SequentialMLP).
    ref.module.load_state_dict(ours.module.state_dict(), strict=True)
    ref_config.no_sync_func = ref.no_sync
    models = {"dsv3 spec (ours)": ours, "Megatron-Core spec": ref, GROUPED: grouped}
    configs = {"dsv3 spec (ours)": config, "Megatron-Core spec": ref_config, GROUPED: grouped_config}
    with silenced(opts.verbose):
        optimizers = {name: parallel.build_optimizer([m], lr=1e-3) for name, m in models.items()}
    tokens = parallel.fixed_tokens("dsv3-tiny", opts.batch, seed=0)

    times = {name: [] for name in models}
    losses = {name: None for name in models}
    for step in range(opts.warmup + opts.steps):
        for name, model in models.items():
            start = time.perf_counter()
            result = parallel.train_step([model], configs[name], tokens, micro_batch_size=opts.batch // 2,
                                         optimizer=optimizers[name])
            elapsed = time.perf_counter() - start
            if step >= opts.warmup:
                times[name].append(elapsed)
            losses[name] = result["loss_sum"] / result["tokens"]

    tokens_per_step = opts.batch * (tokens.shape[1] - 1)
    print(f"dsv3-tiny, fp32, CPU ({torch.get_num_threads()} threads), batch {opts.batch} x "
          f"{tokens.shape[1] - 1} tokens, {opts.steps} timed steps after {opts.warmup} warm-up")
    print(f"{'model':<22}{'median step (ms)':>18}{'tokens/s':>12}{'final loss':>12}")
    medians = {}
    for name in models:
        medians[name] = statistics.median(times[name])
        print(f"{name:<22}{medians[name] * 1e3:>18.1f}{tokens_per_step / medians[name]:>12,.0f}"
              f"{losses[name]:>12.4f}")
    ratio = medians["dsv3 spec (ours)"] / medians["Megatron-Core spec"]
    print(f"ratio ours / Megatron-Core = {ratio:.3f}  (target <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'};"
          " both with Megatron's SequentialMLP experts)")
    print(f"grouped experts (the local backend's default) / sequential = "
          f"{medians['dsv3 spec (ours)'] / medians[GROUPED]:.3f}x the speed")


if __name__ == "__main__":
    main()
