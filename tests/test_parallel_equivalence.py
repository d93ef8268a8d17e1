"""TP=2 with SP, EP=2, PP=2, PP=2 x VPP=2 and all at once (4 processes) give the single-process
loss and gradients.

Each layout runs one training step (Megatron's pipeline schedule, DDP and finalize_model_grads)
over the same global batch from the same weights (loaded from the single-process run through
Megatron's distributed checkpoint); every gradient is resharded to a full tensor and compared with
the single-process one in fp32 (relative error 1e-5), and so is the expert-bias update.
"""

from __future__ import annotations

import pytest

from megatron_dsv3.parallel import ParallelLayout
from megatron_dsv3.testing.equivalence import compare_layouts

LAYOUTS = {
    "tp2_sp": ParallelLayout(tp=2, sp=True),
    "ep2": ParallelLayout(ep=2, dp=2),
    "pp2": ParallelLayout(pp=2),
    "pp2_vpp2": ParallelLayout(pp=2, vpp=2),
    # Four processes, everything at once.
    "tp2_sp_ep2_pp2": ParallelLayout(tp=2, sp=True, ep=2, pp=2),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return compare_layouts(str(tmp_path_factory.mktemp("equivalence")), LAYOUTS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_loss_and_gradients(report, name):
    r = report[name]
    assert r["num_grads"] == r["num_params"]  # every parameter of the model, experts and MTP included
    assert r["loss_rel_err"] < 1e-5, r
    assert r["max_grad_rel_err"] < 1e-5, (r["worst_param"], r["max_grad_rel_err"])
    assert r["expert_bias_moved"] > 0  # the update happened ...
    assert r["expert_bias_max_abs_err"] == 0.0  # ... identically
