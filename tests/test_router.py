"""DeepSeek-V3 routing (arXiv 2412.19437v2, section 2.1.2) as Megatron-Core runs it under our presets.

Hand-computed cases: top-k is chosen on s + b while the gates come from s, normalised over the
chosen experts and scaled; group-limited routing keeps the groups with the largest sum of their
top scores; the expert bias moves by the paper's sign rule; and on skewed data the bias learns to
balance the load.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.model.presets import get_preset

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

SMALL_ROUTER = dict(num_routed_experts=8, moe_router_topk=2, num_groups=1, group_topk=1, route_scale=2.5)


def _config(**overrides):
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args

    preset = get_preset("dsv3-tiny").with_overrides(**overrides)
    return core_transformer_config_from_args(parse_megatron_args(megatron_argv(preset, cpu=True)))


def _router(bias, **overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    pg = ProcessGroupCollection.use_mpu_process_groups()
    router = TopKRouter(config=_config(**overrides), pg_collection=pg).eval()
    router.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return router


def _route(router, scores):
    """Routing for tokens whose sigmoid affinities are ``scores`` (one row per token)."""
    logits = torch.logit(torch.tensor(scores, dtype=torch.float32))
    with torch.no_grad():
        probs, routing_map = router.routing(logits.view(len(scores), 1, -1))
    return probs, routing_map


def test_topk_uses_biased_scores_but_gates_use_raw_scores(megatron_single_process):
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    b = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.55, 0.75]  # s + b: expert 7 = 0.95, expert 0 = 0.9
    probs, routing_map = _route(_router(b, **SMALL_ROUTER), [s])
    assert routing_map[0].nonzero().flatten().tolist() == [0, 7]
    # Gates: s over the chosen experts, normalised, times the route scale 2.5.
    expected = torch.zeros(8)
    expected[0], expected[7] = 2.5 * 0.9 / 1.1, 2.5 * 0.2 / 1.1
    torch.testing.assert_close(probs[0], expected, rtol=1e-6, atol=1e-6)


def test_without_bias_topk_follows_the_scores(megatron_single_process):
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    _, routing_map = _route(_router([0.0] * 8, **SMALL_ROUTER), [s])
    assert routing_map[0].nonzero().flatten().tolist() == [0, 1]


def test_group_limited_routing_picks_groups_by_the_sum_of_their_top_scores(megatron_single_process):
    # 4 groups of 2 experts; each token may use 2 groups; a group's score is the sum of its top
    # topk / group_topk = 2 scores.  Expert 0 has the best score but its group sums to 1.0, below
    # groups 1 (1.2) and 2 (1.05).
    s = [0.95, 0.05, 0.6, 0.6, 0.55, 0.5, 0.1, 0.1]
    router = _router([0.0] * 8, num_routed_experts=8, moe_router_topk=4, num_groups=4, group_topk=2,
                     route_scale=2.5)
    probs, routing_map = _route(router, [s])
    assert routing_map[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    chosen = torch.tensor([0.6, 0.6, 0.55, 0.5])
    torch.testing.assert_close(probs[0, 2:6], 2.5 * chosen / chosen.sum(), rtol=1e-6, atol=1e-6)


def _tiny_model(**overrides):
    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    preset = get_preset("dsv3-tiny").with_overrides(**overrides)
    config, _, (model,) = build_chunks(preset, ParallelLayout(), ddp=False)
    return config, model


def _routers(model):
    return [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


def _forward_backward(model, tokens):
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    loss = model(inputs, positions, None, labels=labels).float().mean()
    loss.backward()


def test_expert_bias_moves_by_the_sign_rule(megatron_single_process):
    """b_i += gamma if expert i got fewer tokens than the mean, -= gamma if more (section 2.1.2)."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_dsv3.testing.parallel import fixed_tokens

    config, model = _tiny_model()
    _forward_backward(model, fixed_tokens("dsv3-tiny", 2, seed=1))
    before = {id(r): (r.expert_bias.clone(), r.local_tokens_per_expert.clone()) for r in _routers(model)}
    _update_router_expert_bias([model], config)
    gamma = get_preset("dsv3-tiny").expert_bias_update_rate
    for router in _routers(model):
        bias, counts = before[id(router)]
        expected = bias + gamma * torch.sign(counts.float().mean() - counts.float())
        torch.testing.assert_close(router.expert_bias, expected)
        assert (router.expert_bias != bias).any()


def _imbalance(model) -> float:
    """Max over layers of (max tokens per expert / mean tokens per expert)."""
    worst = 0.0
    for router in _routers(model):
        counts = router.local_tokens_per_expert.float()
        worst = max(worst, float(counts.max() / counts.mean()))
    return worst


def test_expert_bias_balances_load_on_skewed_data(megatron_single_process):
    """With frozen weights and a Zipf-skewed token stream only the bias learns; imbalance falls."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_dsv3.testing.parallel import fixed_tokens

    torch.manual_seed(0)
    config, model = _tiny_model(expert_bias_update_rate=0.02)
    history = []
    for step in range(30):
        model.zero_grad(set_to_none=True)
        _forward_backward(model, fixed_tokens("dsv3-tiny", 2, seed=100 + step, skew=1.5))
        history.append(_imbalance(model))
        _update_router_expert_bias([model], config)  # also resets the counts
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    trace = [round(h, 2) for h in history]
    assert first > 1.8, f"the skewed stream should start unbalanced: {trace}"
    assert last < 0.7 * first, f"imbalance did not fall: {trace}"
