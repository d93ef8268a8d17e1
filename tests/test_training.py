"""dsv3-tiny trains in fp32 on CPU: the loss on a fixed batch falls clearly in 20 steps, MTP on."""

from __future__ import annotations

import pytest

from megatron_dsv3.parallel import ParallelLayout
from megatron_dsv3.testing import parallel

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)


def test_dsv3_tiny_loss_falls_on_a_fixed_batch_with_mtp(megatron_single_process):
    layout = ParallelLayout()
    _, _, chunks = parallel.build_chunks("dsv3-tiny", layout)
    optimizer = parallel.build_optimizer(chunks, lr=3e-3)
    tokens = parallel.fixed_tokens("dsv3-tiny", 8, seed=3)
    losses, mtp_losses = [], []
    for _ in range(20):
        step = parallel.train_step(chunks, chunks[0].config, tokens, micro_batch_size=4, optimizer=optimizer)
        assert step["update_successful"]
        losses.append(step["loss_sum"] / step["tokens"])
        mtp_losses.append(parallel.mtp_loss_and_reset())
    assert losses[0] > 8.0  # ~ln(4096) = 8.3 from random initialisation
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(m is not None for m in mtp_losses)
    assert mtp_losses[-1] < 0.8 * mtp_losses[0], mtp_losses
