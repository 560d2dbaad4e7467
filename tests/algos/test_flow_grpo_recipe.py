"""Flow-GRPO's recipe as options: global-std advantages against a hand computation, the
unconditional CFG branch detached (its gradient is zero, the value unchanged), a frozen caption
encoder that an update leaves alone, the EMA evaluated against a hand-rolled EMA, and the ratio
check on the first minibatch only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrl.algos.grpo import GRPO, episode_advantages
from flowrl.algos.policy_gradient import RatioCheckError, check_ratio_of
from flowrl.config import ConfigError
from flowrl.models.build import build_image_network, build_policy
from flowrl.models.text_image import PAD, GuidedVelocity
from flowrl.rollout.prompts import make_prompt_collector
from tests.image_setup import tiny_config


# ------------------------------------------------------------------------------ advantages
def test_global_std_divides_every_group_by_the_std_of_all_outcomes():
    rewards = [0.75, 1.0, 1.0, 0.75, 0.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.5, 0.0]  # 3 groups of 4
    outcome = torch.tensor(rewards)
    group = torch.arange(12) // 4
    adv, keep, _ = episode_advantages(outcome, group, 4, 1e-4, std="global")
    # by hand: population std of all twelve, each group's own mean
    mean_all = sum(rewards) / 12
    std_all = (sum((r - mean_all) ** 2 for r in rewards) / 12) ** 0.5
    expected = []
    for g in range(3):
        chunk = rewards[4 * g : 4 * g + 4]
        expected += [(r - sum(chunk) / 4) / (std_all + 1e-4) for r in chunk]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert keep.tolist() == [True] * 12
    # the partial-credit group (0.75 vs 1.0) keeps a smaller advantage than the 0 vs 1 one
    assert abs(adv[0]) < abs(adv[4])
    by_group, _, _ = episode_advantages(outcome, group, 4, 1e-4, std="group")
    assert by_group[0] == pytest.approx(-1.0, rel=1e-3) and by_group[4] == pytest.approx(-np.sqrt(3), rel=1e-3)


def test_advantages_std_is_a_validated_key():
    assert tiny_config().algo.advantages.std == "group" and tiny_config().algo.ema_decay == 0
    with pytest.raises(ConfigError, match="advantages.std"):
        tiny_config("algo.advantages.std=batch")
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_config("algo.ema_decay=1.0")
    with pytest.raises(ConfigError, match="ratio_check"):
        tiny_config("algo.ratio_check=some")
    with pytest.raises(ConfigError, match="policy.detach_uncond only applies to classifier-free guidance"):
        tiny_config("policy.detach_uncond=true", "policy.cfg_scale=1.0")


# ------------------------------------------------------------------------------ CFG detach
def _grad(network, guided, cond, x, weight):
    network.zero_grad(set_to_none=True)
    (guided(cond, x, 0.3) * weight).sum().backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in network.named_parameters()}


def test_detached_unconditional_branch_gets_no_gradient_and_leaves_the_value():
    cfg = tiny_config()
    torch.manual_seed(0)
    network = build_image_network(cfg).double()  # double: the batched CFG pass and the oracle agree to ~1e-12
    for p in network.parameters():  # zero-initialised output layers would hide every gradient
        p.data.add_(torch.randn_like(p) * 0.05)
    cond = torch.tensor([[1, 9, 10, 0, 0, 0, 0, 0], [1, 11, 0, 0, 0, 0, 0, 0]])
    x, weight, scale = torch.randn(2, 3, 16, 16).double(), torch.randn(2, 3, 16, 16).double(), 2.5
    plain, detached = GuidedVelocity(network, scale), GuidedVelocity(network, scale, detach_uncond=True)
    assert torch.equal(plain(cond, x, 0.3), detached(cond, x, 0.3))
    got = _grad(network, detached, cond, x, weight)
    # the oracle: the gradient of scale * v(cond) alone, the unconditional field untouched
    network.zero_grad(set_to_none=True)
    (network(cond, x, 0.3) * scale * weight).sum().backward()
    for name, p in network.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got[name], expected, atol=1e-10, rtol=1e-8), name
    # the unconditional branch's own gradient is zero: the learned null caption vector takes none
    assert torch.count_nonzero(got["text.null"]) == 0
    full = _grad(network, plain, cond, x, weight)
    assert torch.count_nonzero(full["text.null"]) > 0  # without the option it does take gradient
    empty = torch.full_like(cond, PAD)
    network.zero_grad(set_to_none=True)
    (network(empty, x, 0.3) * (1 - scale) * weight).sum().backward()
    assert torch.allclose(full["text.null"], network.text.null.grad, atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------- frozen text, EMA
def _grpo(*overrides: str):
    cfg = tiny_config("algo.beta=0.01", "policy.cfg_scale=1.5", *overrides)
    torch.manual_seed(0)
    policy = build_policy(cfg, build_image_network(cfg))
    return cfg, policy, GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)


def _iterate(cfg, policy, algo, iteration: int) -> None:
    collector = make_prompt_collector(cfg)
    try:
        rollout = algo.collect(collector, policy, iteration)
    finally:
        collector.close()
    batch = algo.prepare(rollout)
    check_ratio_of(policy, batch.cond, batch.samples, cfg.algo, algo.name)
    algo.update(batch, iteration)


def test_frozen_text_encoder_stays_fixed_while_the_rest_trains():
    cfg, policy, algo = _grpo("policy.freeze_text=true", "policy.detach_uncond=true")
    assert policy.velocity.detach_uncond
    text = {n: p.detach().clone() for n, p in policy.network.text.named_parameters()}
    rest = {n: p.detach().clone() for n, p in policy.network.named_parameters() if not n.startswith("text.")}
    _iterate(cfg, policy, algo, 0)
    assert all(torch.equal(text[n], p) for n, p in policy.network.text.named_parameters())
    moved = [n for n, p in policy.network.named_parameters() if n in rest and not torch.equal(rest[n], p)]
    assert "head.2.weight" in moved  # the zero-initialised output layer takes the first step
    optimised = {id(p) for group in algo.optimizer.opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in policy.network.named_parameters() if not n.startswith("text.")}
    _, unfrozen, _ = _grpo()
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_evaluation_weights_are_a_hand_rolled_ema_of_the_trained_ones():
    decay = 0.7
    cfg, policy, algo = _grpo(f"algo.ema_decay={decay}")
    hand = {n: p.detach().clone().double() for n, p in policy.named_parameters()}
    for it in range(3):
        _iterate(cfg, policy, algo, it)
        for n, p in policy.named_parameters():
            hand[n] = decay * hand[n] + (1 - decay) * p.detach().double()
    assert algo.eval_policy is algo.ema
    for n, p in algo.ema.named_parameters():
        assert torch.allclose(p.double(), hand[n], atol=1e-6), n
        assert not p.requires_grad
    assert "ema" in algo.state_dict()
    _, _, plain = _grpo()
    assert plain.eval_policy is None and "ema" not in plain.state_dict()


# ------------------------------------------------------------------------------ ratio check
def test_ratio_check_on_the_first_minibatch_reads_only_its_samples():
    cfg, policy, algo = _grpo("algo.minibatch_size=2")
    collector = make_prompt_collector(cfg)
    try:
        rollout = algo.collect(collector, policy, 0)
    finally:
        collector.close()
    batch = algo.prepare(rollout)
    m = cfg.algo.minibatch_size
    assert batch.samples.log_prob.shape[0] > m
    batch.samples.log_prob[m] += 1.0  # a wrong stored log-prob after the first minibatch
    first = cfg.algo.model_copy(update={"ratio_check": "first_minibatch"})
    assert check_ratio_of(policy, batch.cond, batch.samples, first, "GRPO")["train/ratio_check_dev"] < 1e-4
    with pytest.raises(RatioCheckError):
        check_ratio_of(policy, batch.cond, batch.samples, cfg.algo, "GRPO")  # "all" sees it
    batch.samples.log_prob[m - 1] += 1.0  # inside the first minibatch: both see it
    with pytest.raises(RatioCheckError):
        check_ratio_of(policy, batch.cond, batch.samples, first, "GRPO")
