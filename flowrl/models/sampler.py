"""ChainSampler: one sampler for every flow family and event shape.

grid + converter + window + the deterministic solver used outside the window:

- the **grid** ``t_0 = 0 < ... < t_K = 1`` (``time_grid``, shared with re-evaluation);
- the **converter** makes a denoising step a Gaussian transition with a tractable log-prob
  (ReinFlow / Flow-Noise learned std, Flow-SDE, CPS);
- the **window** chooses which steps are stochastic in this rollout (all, one random step,
  MixGRPO's sliding window);
- the **solver** integrates the other steps: Euler, Heun, or DPM-Solver++(2M); with
  ``steps_after_window`` the steps after a batch-wide window are re-gridded to fewer,
  larger steps (MixGRPO-Flash's compression).

Events are ``[*E]``: an action chunk ``[Ta, Da]`` or an image latent ``[C, H, W]``. The
condition is whatever the velocity field takes, indexed by rows (a tensor of observations,
or a ``TensorBatch`` of prompt embeddings). Sampling returns ``Transitions``: only the S
stochastic steps are stored, so memory grows with S, not K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.core.grids import GridKind, time_grid
from flowrl.core.solvers import SOLVERS, SolverName, dpm_solver_2m_step, heun_step, ode_solve
from flowrl.core.steps import (
    StepOutput,
    cps_step,
    euler_mean,
    euler_step,
    flow_sde_step,
    gaussian_draw,
    gaussian_log_prob,
    gaussian_step,
)
from flowrl.core.transitions import Transitions, steps_from_mask
from flowrl.core.windows import AllSteps, OneRandomStep, StepWindow
from flowrl.models.networks import ReinFlowNoiseNet

# (condition rows, x [B, *E], t [B] or scalar, t_next) -> velocity [B, *E]. A velocity module
# may also offer ``for_chain(cond, times) -> ChainVelocity`` (VelocityMLP does): the field of one
# sampling chain, with what does not change along the chain computed once.
VelocityFn = Callable[[Any, Tensor, Tensor, Tensor], Tensor]
# (x [B, *E], i) -> the velocity at times[i], for the step to times[i + 1]
ChainVelocity = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class ChainStepOutput:
    """A converter's step in a sampling chain: ``next_x``, ``mean`` ``[B, *E]``, ``std``
    (broadcastable) and ``log_prob`` ``[B]``; or ``log_prob`` None where std > 0 everywhere:
    the sampler then takes the log-prob of next_x under N(mean, std^2) (``gaussian_log_prob``)
    for all the chain's stored steps in one pass."""

    next_x: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


# (x [B, *E], v, i, generator) -> the converter's step from times[i] to times[i + 1]
ChainStep = Callable[[Tensor, Tensor, int, "torch.Generator | None"], ChainStepOutput]


def chain_velocity(velocity: VelocityFn, cond, times: Tensor) -> ChainVelocity:
    """``velocity``'s ``for_chain`` where it has one, else ``velocity`` called with the times."""
    for_chain = getattr(velocity, "for_chain", None)
    if for_chain is not None:
        return for_chain(cond, times)
    points = times.unbind(0)
    return lambda x, i: velocity(cond, x, points[i], points[i + 1])


class _BaseConverter(nn.Module):
    """A converter: ``eligible(grid)``, the steps a window may make stochastic (by default all),
    and ``forward(cond, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput``,
    the step from ``x`` (velocity ``v``) as a Gaussian transition; given a stored ``next_x`` it
    re-evaluates that step's log-prob."""

    def eligible(self, grid: Tensor) -> Tensor:
        """``[K]`` bool: the grid steps a window may make stochastic."""
        return torch.ones(grid.shape[0] - 1, dtype=torch.bool, device=grid.device)

    def for_chain(self, cond, times: Tensor, t_floor: float) -> ChainStep:
        """The step of one sampling chain of ``cond``: ``(x, v, i, generator) -> ChainStepOutput``
        from ``times[i]`` to ``times[i + 1]``, the same as ``forward``."""
        points = times.unbind(0)

        def step(x: Tensor, v: Tensor, i: int, generator: torch.Generator | None) -> ChainStepOutput:
            out = self(cond, x, v, points[i], points[i + 1], t_floor, generator=generator)
            return ChainStepOutput(out.next_x, out.mean, out.std, out.log_prob)

        return step


class ReinFlowConverter(_BaseConverter):
    """Gaussian step around the Euler mean with a learned std (ReinFlow; Flow-Noise with x)."""

    def __init__(self, noise_net: ReinFlowNoiseNet) -> None:
        super().__init__()
        self.noise_net = noise_net

    def forward(self, cond, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        std = self.noise_net(cond, t, x if self.noise_net.condition_on_x else None)
        return gaussian_step(x, v, t, t_next, std, next_x=next_x, generator=generator)

    def for_chain(self, cond, times: Tensor, t_floor: float) -> ChainStep:
        # The noise net's inputs that do not change along the chain are computed once. Its std is
        # > std_min > 0, so gaussian_transition's search for zero-std rows (two syncs) is moot, and
        # the sampler takes the log-probs of all the chain's steps in one pass.
        std_at = self.noise_net.for_chain(cond, times)
        points = times.unbind(0)

        def step(x: Tensor, v: Tensor, i: int, generator: torch.Generator | None) -> ChainStepOutput:
            mean = euler_mean(x, v, points[i], points[i + 1])
            std = std_at(i, x).to(mean.dtype)
            return ChainStepOutput(gaussian_draw(x, mean, std, generator=generator), mean, std, None)

        return step


class FlowSDEConverter(_BaseConverter):
    """Drift-corrected SDE with the ODE's marginals; fixed noise level ``a``."""

    def __init__(self, noise_level: float) -> None:
        super().__init__()
        self.noise_level = noise_level

    def forward(self, cond, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        return flow_sde_step(x, v, t, t_next, self.noise_level, t_floor, next_x=next_x, generator=generator)


class CPSConverter(_BaseConverter):
    """Coefficients-preserving sampling; the step into t = 1 has zero std and stays ODE."""

    def __init__(self, noise_level: float) -> None:
        super().__init__()
        self.noise_level = noise_level

    def eligible(self, grid: Tensor) -> Tensor:
        return grid[1:] < 1.0  # the step into t = 1 has no noise to sample

    def forward(self, cond, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        return cps_step(x, v, t, t_next, self.noise_level, next_x=next_x, generator=generator)


Converter = ReinFlowConverter | FlowSDEConverter | CPSConverter


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


class _Solver:
    """The deterministic solver's per-batch state: DPM-Solver++(2M) keeps each row's last
    data estimate; a stochastic step breaks a row's history (its next step is first order)."""

    def __init__(self, name: SolverName, batch: int, device: torch.device) -> None:
        self.name = name
        self.x0_prev: Tensor | None = None
        self.t_prev: Tensor | None = None
        self.has_history = torch.zeros(batch, dtype=torch.bool, device=device)

    def step(
        self, velocity: VelocityFn, cond, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Next states ``[B, *E]`` (meaningful for ``rows`` ``[B]`` bool) and the extra NFE:
        ``[B]`` for Heun (its corrector), 0 otherwise."""
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
        # dpm_solver_2m
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
        """``rows`` ``[B]`` took a stochastic step: their multistep history no longer applies."""
        self.has_history = self.has_history & ~rows

    def broke_all(self) -> None:
        """Every row took a stochastic step (``broke`` of all rows)."""
        self.has_history = torch.zeros_like(self.has_history)


class _ChainRecord:
    """The stored stochastic steps of a batch of chains: each row fills its S slots in order."""

    def __init__(self, x: Tensor, s: int) -> None:
        batch = x.shape[0]
        self.x_in = x.new_zeros((batch, s, *x.shape[1:]))
        self.x_out = x.new_zeros((batch, s, *x.shape[1:]))
        self.log_prob = torch.zeros(batch, s, device=x.device)
        self.slot = torch.zeros(batch, dtype=torch.long, device=x.device)

    def record(self, stochastic: Tensor, x: Tensor, out: StepOutput) -> None:
        """Store the step of the ``stochastic`` rows ``[B]`` bool (state in ``x``, ``out``)."""
        rows = stochastic.nonzero().flatten()
        slot = self.slot[rows]
        self.x_in[rows, slot] = x[rows]
        self.x_out[rows, slot] = out.next_x[rows]
        self.log_prob[rows, slot] = out.log_prob[rows].to(self.log_prob.dtype)
        self.slot[rows] += 1

    def transitions(self, final: Tensor, steps: Tensor, nfe: Tensor) -> Transitions:
        return Transitions(final=final, x_in=self.x_in, x_out=self.x_out, steps=steps, log_prob=self.log_prob, nfe=nfe)


def _stacked_log_prob(outs: list[ChainStepOutput], x_out: Tensor) -> Tensor:
    """``[B, S]`` log-probs of the S stored steps ``outs`` (next states ``x_out`` ``[B, S, *E]``)."""
    if outs[0].log_prob is not None:
        return torch.stack([out.log_prob for out in outs], dim=1)  # type: ignore[misc]
    mean = torch.stack([out.mean for out in outs], dim=1)
    std = torch.stack([torch.broadcast_to(out.std, out.mean.shape) for out in outs], dim=1)
    # The log-prob of the sample as stored (its dtype), as gaussian_transition takes it.
    flat = gaussian_log_prob(x_out.flatten(0, 1).to(mean.dtype), mean.flatten(0, 1), std.flatten(0, 1))
    return flat.view(x_out.shape[0], x_out.shape[1])


class ChainSampler(nn.Module):
    """Samples chains with a tractable log-prob and re-evaluates it (see the module doc).

    num_steps: K. converter: None for an ODE-only sampler (it can act, not sample log-probs).
    solver: the deterministic solver outside the window (and for ``ode``).
    steps_after_window: re-grid the steps after the window's last step to this many (Flash);
        None keeps the grid's steps. Needs a batch-wide window (all samples share the steps).
    """

    def __init__(
        self,
        num_steps: int,
        converter: Converter | None = None,
        window: StepWindow | None = None,
        solver: SolverName = "euler",
        steps_after_window: int | None = None,
        grid_kind: GridKind = "uniform",
        grid_shift: float = 1.0,
    ) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if steps_after_window is not None and steps_after_window < 1:
            raise ValueError(f"steps_after_window must be >= 1 or None, got {steps_after_window}")
        if steps_after_window is not None and isinstance(window, OneRandomStep):
            raise ValueError("steps_after_window needs a window shared by the whole batch (all or sliding)")
        self.num_steps = num_steps
        self.converter = converter
        self.window = window if window is not None else AllSteps()
        self.solver = solver
        self.steps_after_window = steps_after_window
        self.register_buffer("grid", time_grid(num_steps, grid_kind, grid_shift), persistent=False)
        self._t_floor = float(self.grid[1])  # read once: no device sync per step

    @property
    def t_floor(self) -> float:
        return self._t_floor

    def _require_converter(self) -> Converter:
        if self.converter is None:
            raise RuntimeError("this sampler has no MDP converter (ODE only): it can act but not sample log-probs")
        return self.converter

    def _schedule(self, mask: Tensor) -> tuple[Tensor, list[tuple[int | None, int]]]:
        """``(times, plan)``: ``plan`` holds (grid step k or None, i) for every step the chain
        takes, from ``times[i]`` to ``times[i + 1]``. ``times`` is the grid; with
        ``steps_after_window`` the steps after the window's last one are re-gridded."""
        k_all = self.num_steps
        plan: list[tuple[int | None, int]] = [(k, k) for k in range(k_all)]
        if self.steps_after_window is None:
            return self.grid, plan
        used = mask.any(dim=0).nonzero().flatten()
        if not bool((mask == mask[:1]).all()):
            raise ValueError("steps_after_window needs a window shared by the whole batch (all or sliding)")
        first = int(used.max()) + 1 if len(used) else 0
        remaining = k_all - first
        if remaining <= self.steps_after_window:
            return self.grid, plan
        idx = torch.linspace(first, k_all, self.steps_after_window + 1, dtype=torch.float64).round().long()
        times = torch.cat([self.grid[:first], self.grid[idx]])  # idx[0] = first
        return times, plan[:first] + [(None, first + j) for j in range(self.steps_after_window)]

    def _stored_steps(self, mask: Tensor) -> tuple[Tensor, bool]:
        """``[B, K]`` window -> (``[B, S]`` grid indices of each sample's stochastic steps,
        whether the window is batch-wide)."""
        batch_wide = bool((mask == mask[:1]).all())
        if batch_wide:  # every row holds the first's steps
            steps = mask[0].nonzero().flatten().expand(mask.shape[0], -1).clone()
        else:
            steps = steps_from_mask(mask)
        if steps.shape[1] == 0:
            raise ValueError("the window holds no stochastic step: nothing to train")
        return steps, batch_wide

    @torch.no_grad()
    def sample(
        self,
        velocity: VelocityFn,
        cond,
        event_shape: tuple[int, ...],
        batch: int,
        iteration: int = 0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Transitions:
        """Sample ``batch`` chains with the window of ``iteration``.

        noise: ``[B, *E]`` initial states (e.g. shared within a GRPO group); default
        ``N(0, I)`` drawn with ``generator`` after the window's draw.

        Every step integrates the rows outside the window with the solver; where the window
        holds rows (all of them for a batch-wide window, some for one random step per
        sample), the converter's step replaces theirs and is stored.
        """
        converter = self._require_converter()
        device = self.grid.device
        mask = self.window.mask(batch, converter.eligible(self.grid), iteration, generator).to(device)
        steps, batch_wide = self._stored_steps(mask)
        x = noise if noise is not None else torch.randn((batch, *event_shape), generator=generator, device=device)
        if x.shape != (batch, *event_shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {(batch, *event_shape)}")
        times, plan = self._schedule(mask)
        if batch_wide:
            return self._sample_batch_wide(velocity, cond, x, mask[0].tolist(), times, plan, steps, generator)
        return self._sample_per_row(velocity, cond, x, mask, times, plan, steps, generator)

    def _sample_batch_wide(self, velocity, cond, x, window, times, plan, steps, generator) -> Transitions:
        """``sample`` where every row shares the window (``window``: K bools): each step is the
        converter's for all rows or the solver's for all rows. This is the collection's hot
        loop, so what does not change along the chain is computed once (``for_chain``), the
        stored steps are stacked at the end and the step count is a Python number."""
        converter = self._require_converter()
        batch = x.shape[0]
        v_at = chain_velocity(velocity, cond, times)
        step_at = converter.for_chain(cond, times, self.t_floor)
        points = times.unbind(0)
        solver = _Solver(self.solver, batch, x.device)
        every = torch.ones(batch, dtype=torch.bool, device=x.device)
        x_in, outs = [], []
        extra: Tensor | float = 0.0  # Heun's corrector evaluations
        for k, i in plan:
            v = v_at(x, i)
            if k is not None and window[k]:
                out = step_at(x, v, i, generator)
                x_in.append(x)
                outs.append(out)
                solver.broke_all()
                x = out.next_x
            else:
                x, added = solver.step(velocity, cond, x, v, points[i], points[i + 1], every)
                extra = extra + added
        nfe = torch.full((batch,), float(len(plan)), device=x.device) + extra
        x_out = torch.stack([out.next_x for out in outs], dim=1)
        log_prob = _stacked_log_prob(outs, x_out).to(torch.get_default_dtype())
        return Transitions(final=x, x_in=torch.stack(x_in, 1), x_out=x_out, steps=steps, log_prob=log_prob, nfe=nfe)

    def _sample_per_row(self, velocity, cond, x, mask, times, plan, steps, generator) -> Transitions:
        """``sample`` where rows hold different steps (one random step per sample)."""
        converter = self._require_converter()
        batch, device = x.shape[0], x.device
        points = times.unbind(0)
        solver = _Solver(self.solver, batch, device)
        chains = _ChainRecord(x, steps.shape[1])
        nfe = torch.zeros(batch, device=device)
        in_window = mask.any(dim=0).tolist()  # per grid step, read once: no device sync inside the loop
        outside = torch.zeros(batch, dtype=torch.bool, device=device)  # re-gridded steps are all ODE
        for k, i in plan:
            t, t_next = points[i], points[i + 1]
            v = velocity(cond, x, t, t_next)
            nfe += 1.0
            stochastic = mask[:, k] if k is not None else outside
            x_next, extra = solver.step(velocity, cond, x, v, t, t_next, ~stochastic)
            nfe += extra
            if k is not None and in_window[k]:
                out = converter(cond, x, v, t, t_next, self.t_floor, generator=generator)
                chains.record(stochastic, x, out)
                solver.broke(stochastic)
                x_next = torch.where(_rows(stochastic, x), out.next_x, x_next)
            x = x_next
        return chains.transitions(x, steps, nfe)

    def evaluate(self, velocity: VelocityFn, cond, sample: Transitions) -> tuple[Tensor, StepOutput]:
        """Re-evaluate the stored steps under the current parameters, in one batched pass.

        Returns ``(rows [B * S], out)``: ``rows`` the sample of each flattened step and
        ``out`` the converter's output over the ``B * S`` steps (log_prob ``[B * S]``, mean
        ``[B * S, *E]``, std broadcastable to it)."""
        converter = self._require_converter()
        b, s = sample.steps.shape
        if sample.steps.numel() and (int(sample.steps.max()) >= self.num_steps or int(sample.steps.min()) < 0):
            raise ValueError(f"stored step indices {sample.steps.unique().tolist()} do not fit K={self.num_steps}")
        rows = torch.arange(b, device=sample.steps.device).repeat_interleave(s)
        steps = sample.steps.reshape(-1)
        x, x_next = sample.x_in.flatten(0, 1), sample.x_out.flatten(0, 1)
        t, t_next = self.grid[steps], self.grid[steps + 1]
        sub = cond[rows]
        v = velocity(sub, x, t, t_next)
        return rows, converter(sub, x, v, t, t_next, self.t_floor, next_x=x_next)

    def ode(self, velocity: VelocityFn, cond, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic integration of the whole grid with the solver, differentiable.
        ``noise [B, *E] -> (x_1 [B, *E], nfe [B])``."""
        x, nfe = ode_solve(lambda x, t, t_next: velocity(cond, x, t, t_next), noise, self.grid, self.solver)
        return x, torch.full((noise.shape[0],), float(nfe), device=noise.device)
