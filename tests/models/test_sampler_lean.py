"""The lean sampling path (issue 27) against the sampler it replaced, field by field.

Oracle: ``old_sample`` below is ``ChainSampler.sample`` as it was before the rework, kept
verbatim with its helpers (``_OldSolver``, ``_OldChainRecord``, its schedule): every step
calls the velocity module's and the converter's ``forward``, records the stochastic rows by
index and integrates the others with the solver. The new path (``for_chain``, batch-wide
windows stacked at the end) must give the same tensors bit for bit, from the same generator
state, and leave the generator where the old one left it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flowrl.core.solvers import dpm_solver_2m_step, heun_step
from flowrl.core.steps import StepOutput, euler_step
from flowrl.core.transitions import Transitions, steps_from_mask
from flowrl.core.windows import OneRandomStep, SlidingWindow
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.models.sampler import ChainSampler, CPSConverter, FlowSDEConverter, ReinFlowConverter

FIELDS = ("final", "x_in", "x_out", "steps", "log_prob", "nfe")


# ---- the old path, verbatim -------------------------------------------------------------------


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


class _OldSolver:
    def __init__(self, name, batch: int, device: torch.device) -> None:
        self.name = name
        self.x0_prev: Tensor | None = None
        self.t_prev: Tensor | None = None
        self.has_history = torch.zeros(batch, dtype=torch.bool, device=device)

    def step(self, velocity, cond, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, rows: Tensor):
        euler = euler_step(x, v, t, t_next).next_x
        if self.name == "euler" or not bool(rows.any()):
            return euler, 0.0
        if self.name == "heun":
            idx = rows.nonzero().flatten()
            sub_cond = cond if bool(rows.all()) else cond[idx]
            xs, vs, es = x[idx], v[idx], euler[idx]
            v_next = velocity(sub_cond, es, t_next, t_next)
            out = euler.clone()
            out[idx] = heun_step(xs, vs, v_next, t, t_next)
            extra = torch.zeros(x.shape[0], device=x.device)
            extra[idx] = 1.0
            return out, extra
        x0 = x.to(v.dtype) + (1.0 - t) * v
        if self.x0_prev is None:
            second = euler
        else:
            second, _ = dpm_solver_2m_step(x, v, t, t_next, self.x0_prev, self.t_prev)
        out = torch.where(_rows(self.has_history, x), second, euler)
        self.x0_prev = x0 if self.x0_prev is None else torch.where(_rows(rows, x0), x0, self.x0_prev)
        self.t_prev = t
        self.has_history = self.has_history | rows
        return out, 0.0

    def broke(self, rows: Tensor) -> None:
        self.has_history = self.has_history & ~rows


class _OldChainRecord:
    def __init__(self, x: Tensor, s: int) -> None:
        batch = x.shape[0]
        self.x_in = x.new_zeros((batch, s, *x.shape[1:]))
        self.x_out = x.new_zeros((batch, s, *x.shape[1:]))
        self.log_prob = torch.zeros(batch, s, device=x.device)
        self.slot = torch.zeros(batch, dtype=torch.long, device=x.device)

    def record(self, stochastic: Tensor, x: Tensor, out: StepOutput) -> None:
        rows = stochastic.nonzero().flatten()
        slot = self.slot[rows]
        self.x_in[rows, slot] = x[rows]
        self.x_out[rows, slot] = out.next_x[rows]
        self.log_prob[rows, slot] = out.log_prob[rows].to(self.log_prob.dtype)
        self.slot[rows] += 1

    def transitions(self, final: Tensor, steps: Tensor, nfe: Tensor) -> Transitions:
        return Transitions(final=final, x_in=self.x_in, x_out=self.x_out, steps=steps, log_prob=self.log_prob, nfe=nfe)


def _old_schedule(sampler: ChainSampler, mask: Tensor):
    k_all = sampler.num_steps
    plan = [(k, sampler.grid[k], sampler.grid[k + 1]) for k in range(k_all)]
    if sampler.steps_after_window is None:
        return plan
    used = mask.any(dim=0).nonzero().flatten()
    first = int(used.max()) + 1 if len(used) else 0
    remaining = k_all - first
    if remaining <= sampler.steps_after_window:
        return plan
    idx = torch.linspace(first, k_all, sampler.steps_after_window + 1, dtype=torch.float64).round().long()
    points = sampler.grid[idx]
    return plan[:first] + [(None, points[j], points[j + 1]) for j in range(sampler.steps_after_window)]


def _old_stored_steps(mask: Tensor) -> Tensor:
    if bool((mask == mask[:1]).all()):
        return mask[0].nonzero().flatten().expand(mask.shape[0], -1).clone()
    return steps_from_mask(mask)


@torch.no_grad()
def old_sample(sampler: ChainSampler, velocity, cond, event_shape, batch, iteration=0, generator=None, noise=None):
    """``ChainSampler.sample`` before issue 27's rework."""
    converter = sampler.converter
    device = sampler.grid.device
    t_floor = float(sampler.grid[1])
    mask = sampler.window.mask(batch, converter.eligible(sampler.grid), iteration, generator).to(device)
    steps = _old_stored_steps(mask)
    x = noise if noise is not None else torch.randn((batch, *event_shape), generator=generator, device=device)
    solver = _OldSolver(sampler.solver, batch, device)
    chains = _OldChainRecord(x, steps.shape[1])
    nfe = torch.zeros(batch, device=device)
    in_window = mask.any(dim=0).tolist()
    outside = torch.zeros(batch, dtype=torch.bool, device=device)
    for k, t, t_next in _old_schedule(sampler, mask):
        v = velocity(cond, x, t, t_next)
        nfe += 1.0
        stochastic = mask[:, k] if k is not None else outside
        x_next, extra = solver.step(velocity, cond, x, v, t, t_next, ~stochastic)
        nfe += extra
        if k is not None and in_window[k]:
            out = converter(cond, x, v, t, t_next, t_floor, generator=generator)
            chains.record(stochastic, x, out)
            solver.broke(stochastic)
            x_next = torch.where(_rows(stochastic, x), out.next_x, x_next)
        x = x_next
    return chains.transitions(x, steps, nfe)


# ---- policies -------------------------------------------------------------------------------


def _policy(
    obs_dim,
    act_dim,
    converter="reinflow",
    window=None,
    solver="euler",
    k=4,
    after=None,
    step_cond=False,
    hidden=(256, 256),
):
    torch.manual_seed(0)
    velocity = VelocityMLP(obs_dim, 4, act_dim, hidden, step_conditioned=step_cond)
    if converter in ("reinflow", "flow_noise"):
        net = ReinFlowNoiseNet(obs_dim, 4, act_dim, 0.08, 0.16, condition_on_x=converter == "flow_noise")
        conv = ReinFlowConverter(net)
    elif converter == "flow_sde":
        conv = FlowSDEConverter(0.7)
    else:
        conv = CPSConverter(0.7)
    for module in (velocity, conv):  # observation statistics that do something
        for m in module.modules():
            if hasattr(m, "set_stats"):
                m.set_stats(torch.linspace(-1, 1, obs_dim), torch.linspace(0.5, 2, obs_dim))
    sampler = ChainSampler(k, conv, window, solver, after, grid_kind="shifted", grid_shift=2.0)
    return FlowPolicy(velocity, sampler)


CASES = {
    "hopper_reinflow": dict(obs_dim=11, act_dim=3),
    "toy_reinflow": dict(obs_dim=4, act_dim=2, hidden=(128, 128)),
    "flow_noise": dict(obs_dim=11, act_dim=3, converter="flow_noise"),
    "flow_sde": dict(obs_dim=11, act_dim=3, converter="flow_sde"),
    "cps": dict(obs_dim=11, act_dim=3, converter="cps"),
    "sliding_heun": dict(obs_dim=11, act_dim=3, window=SlidingWindow(2, seed=3), solver="heun", k=6),
    "sliding_dpm_flash": dict(obs_dim=5, act_dim=2, window=SlidingWindow(2), solver="dpm_solver_2m", k=8, after=2),
    "one_random_dpm": dict(obs_dim=5, act_dim=2, window=OneRandomStep(), solver="dpm_solver_2m", k=5),
    "one_random_flow_noise": dict(obs_dim=5, act_dim=2, converter="flow_noise", window=OneRandomStep()),
    "shortcut_k1": dict(obs_dim=5, act_dim=2, k=1, step_cond=True),
    "shortcut_sliding": dict(obs_dim=5, act_dim=2, step_cond=True, window=SlidingWindow(1, shift_interval=1)),
}


def _both(policy: FlowPolicy, obs: Tensor, iteration: int, seed: int, noise: Tensor | None = None):
    g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    old = old_sample(policy.sampler, policy.velocity, obs, policy.event_shape, obs.shape[0], iteration, g_old, noise)
    new = policy.sample(obs, iteration, g_new, noise)
    return old, new, g_old, g_new


@pytest.mark.parametrize("case", list(CASES))
def test_lean_sample_is_the_old_sample_bit_for_bit(case: str) -> None:
    policy = _policy(**CASES[case])
    obs = torch.randn(16, CASES[case]["obs_dim"], generator=torch.Generator().manual_seed(1)) * 3
    for iteration in (0, 3):
        old, new, g_old, g_new = _both(policy, obs, iteration, seed=iteration + 7)
        for field in FIELDS:
            a, b = getattr(old, field), getattr(new, field)
            assert a.dtype == b.dtype and a.shape == b.shape, field
            assert torch.equal(a, b), f"{case}: {field} differs by {(a.double() - b.double()).abs().max()}"
        assert torch.equal(torch.randn(3, generator=g_old), torch.randn(3, generator=g_new)), "generator"


def test_lean_sample_with_given_noise_is_the_old_sample() -> None:
    policy = _policy(11, 3, converter="flow_noise")
    obs = torch.randn(16, 11)
    noise = torch.randn(16, 4, 3)
    old, new, _, _ = _both(policy, obs, 0, seed=3, noise=noise)
    for field in FIELDS:
        assert torch.equal(getattr(old, field), getattr(new, field)), field


@pytest.mark.parametrize("condition_on_x", [False, True])
def test_noise_net_for_chain_is_its_forward(condition_on_x: bool) -> None:
    """The learned std of every step, from one chain pass, equals the per-step forward."""
    torch.manual_seed(0)
    net = ReinFlowNoiseNet(11, 4, 3, 0.08, 0.16, condition_on_x=condition_on_x)
    net.obs_norm.set_stats(torch.linspace(-1, 1, 11), torch.linspace(0.5, 2, 11))
    obs, times = torch.randn(16, 11), torch.linspace(0, 1, 5)
    std_at = net.for_chain(obs, times)
    for i in range(4):
        x = torch.randn(16, 4, 3)
        assert torch.equal(std_at(i, x), net(obs, times[i], x if condition_on_x else None))


@pytest.mark.parametrize("step_cond", [False, True])
def test_velocity_for_chain_is_its_forward(step_cond: bool) -> None:
    torch.manual_seed(0)
    net = VelocityMLP(11, 4, 3, (64, 64), step_conditioned=step_cond)
    obs, times = torch.randn(16, 11), torch.linspace(0, 1, 5) ** 2
    v_at = net.for_chain(obs, times)
    for i in range(4):
        x = torch.randn(16, 4, 3)
        assert torch.equal(v_at(x, i), net(obs, x, times[i], times[i + 1]))
