"""FlowPolicy: a velocity field integrated in K steps, made into an MDP by a converter.

The converter decides the stochastic transition of a denoising step (ReinFlow / Flow-Noise
learned std, Flow-SDE, CPS); the window decides which steps are stochastic in a given
rollout (ODE Euler elsewhere). Sampling stores the whole chain ``x_0 .. x_K`` and the mask
of stochastic steps, which is all that re-evaluation of the log-prob needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from flowrl.core.batch import TensorBatch
from flowrl.core.grids import GridKind, time_grid
from flowrl.core.steps import StepOutput, cps_step, euler_step, flow_sde_step, gaussian_entropy, gaussian_step
from flowrl.core.windows import AllSteps, StepWindow
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP


class ReinFlowConverter(nn.Module):
    """Gaussian step around the Euler mean with a learned std (ReinFlow; Flow-Noise with x)."""

    def __init__(self, noise_net: ReinFlowNoiseNet) -> None:
        super().__init__()
        self.noise_net = noise_net

    def eligible(self, grid: Tensor) -> Tensor:
        return torch.ones(grid.shape[0] - 1, dtype=torch.bool, device=grid.device)

    def forward(self, obs, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        std = self.noise_net(obs, t, x if self.noise_net.condition_on_x else None)
        return gaussian_step(x, v, t, t_next, std, next_x=next_x, generator=generator)


class FlowSDEConverter(nn.Module):
    """Drift-corrected SDE with the ODE's marginals; fixed noise level ``a``."""

    def __init__(self, noise_level: float) -> None:
        super().__init__()
        self.noise_level = noise_level

    def eligible(self, grid: Tensor) -> Tensor:
        return torch.ones(grid.shape[0] - 1, dtype=torch.bool, device=grid.device)

    def forward(self, obs, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        return flow_sde_step(x, v, t, t_next, self.noise_level, t_floor, next_x=next_x, generator=generator)


class CPSConverter(nn.Module):
    """Coefficients-preserving sampling; the step into t = 1 has zero std and stays ODE."""

    def __init__(self, noise_level: float) -> None:
        super().__init__()
        self.noise_level = noise_level

    def eligible(self, grid: Tensor) -> Tensor:
        return grid[1:] < 1.0

    def forward(self, obs, x, v, t, t_next, t_floor, *, next_x=None, generator=None) -> StepOutput:
        return cps_step(x, v, t, t_next, self.noise_level, next_x=next_x, generator=generator)


Converter = ReinFlowConverter | FlowSDEConverter | CPSConverter


@dataclass
class ChainSample(TensorBatch):
    """One batch of sampled denoising chains (flow and diffusion policies).

    actions: ``[B, Ta, Da]`` the chain's end (unclipped; the env wrapper clips).
    chain: ``[B, K+1, Ta, Da]`` every state of the chain, from the noise to the actions.
    mask: ``[B, K]`` bool, True where step k was stochastic.
    log_prob: ``[B]`` the chain's log-prob over its stochastic steps (a flow policy, reduced
        as FlowPolicy says), or ``[B, K]`` one log-prob per step (a diffusion policy, DPPO:
        each denoising step its own PPO sample; zero where the mask is False).
    """

    actions: Tensor
    chain: Tensor
    mask: Tensor
    log_prob: Tensor


class FlowPolicy(nn.Module):
    """Flow-matching policy over action chunks with an exact chain log-prob.

    ``log_prob_reduce``: "sum" sums the Gaussian log-densities of every stochastic step and
    dimension; "mean" divides that sum by (stochastic steps x Ta x Da), the per-dimension
    average ReinFlow and piRL use, which keeps PPO's clip range independent of the sizes.
    """

    def __init__(
        self,
        velocity: VelocityMLP,
        num_steps: int,
        converter: Converter | None = None,
        window: StepWindow | None = None,
        grid_kind: GridKind = "uniform",
        grid_shift: float = 1.0,
        log_prob_reduce: Literal["sum", "mean"] = "mean",
    ) -> None:
        super().__init__()
        if log_prob_reduce not in ("sum", "mean"):
            raise ValueError(f"log_prob_reduce must be 'sum' or 'mean', got {log_prob_reduce!r}")
        self.velocity = velocity
        self.converter = converter
        self.window = window if window is not None else AllSteps()
        self.num_steps = num_steps
        self.log_prob_reduce = log_prob_reduce
        self.register_buffer("grid", time_grid(num_steps, grid_kind, grid_shift), persistent=False)

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.velocity.horizon, self.velocity.action_dim)

    def _t_floor(self) -> float:
        return float(self.grid[1])

    def _require_converter(self) -> Converter:
        if self.converter is None:
            raise RuntimeError("this FlowPolicy has no MDP converter (ODE only): it can act but not sample log-probs")
        return self.converter

    def _reduce(self, summed: Tensor, num_stochastic: Tensor) -> Tensor:
        if self.log_prob_reduce == "sum":
            return summed
        dims = self.event_shape[0] * self.event_shape[1]
        return summed / (num_stochastic.clamp(min=1) * dims)

    @property
    def actor(self) -> VelocityMLP:
        """The network a checkpoint stores (the converter's noise net is fine-tuning state)."""
        return self.velocity

    def noise_parameters(self) -> list[nn.Parameter]:
        """Parameters of the learned exploration noise (ppo.noise_lr); none for fixed-noise converters."""
        return list(self.converter.parameters()) if self.converter is not None else []

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic evaluation: ODE Euler from x_0 ~ N(0, I). ``[B, O] -> [B, Ta, Da]``."""
        x = torch.randn((obs.shape[0], *self.event_shape), generator=generator, device=obs.device)
        return self.coupled_actions(obs, x)

    def coupled_actions(self, obs: Tensor, noise: Tensor) -> Tensor:
        """The ODE's actions from the given initial noise ``[B, Ta, Da]``, differentiable.

        Two policies fed the same noise give a coupling of their action distributions, so
        the mean squared distance of their actions bounds W2² (the W2 regulariser)."""
        x = noise
        for k in range(self.num_steps):
            t, t_next = self.grid[k], self.grid[k + 1]
            x = euler_step(x, self.velocity(obs, x, t, t_next), t, t_next).next_x
        return x

    @torch.no_grad()
    def sample(self, obs: Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> ChainSample:
        """Sample chains for ``obs`` ``[B, O]`` with the window of ``iteration``."""
        converter = self._require_converter()
        b = obs.shape[0]
        mask = self.window.mask(b, converter.eligible(self.grid), iteration, generator).to(obs.device)
        x = torch.randn((b, *self.event_shape), generator=generator, device=obs.device)
        chain = [x]
        step_log_probs = torch.zeros(b, device=obs.device)
        for k in range(self.num_steps):
            t, t_next = self.grid[k], self.grid[k + 1]
            v = self.velocity(obs, x, t, t_next)
            x_next = euler_step(x, v, t, t_next).next_x
            stochastic = mask[:, k]
            if bool(stochastic.any()):
                out = converter(obs, x, v, t, t_next, self._t_floor(), generator=generator)
                x_next = torch.where(stochastic.view(-1, 1, 1), out.next_x, x_next)
                step_log_probs += torch.where(stochastic, out.log_prob, torch.zeros_like(out.log_prob))
            x = x_next
            chain.append(x)
        log_prob = self._reduce(step_log_probs, mask.sum(dim=1))
        return ChainSample(actions=x, chain=torch.stack(chain, dim=1), mask=mask, log_prob=log_prob)

    def log_prob(self, obs: Tensor, sample: ChainSample) -> tuple[Tensor, Tensor]:
        """Re-evaluate stored chains under the current parameters.

        obs ``[B, O]``; ``sample.chain`` ``[B, K+1, Ta, Da]``, ``sample.mask`` ``[B, K]``. Only
        the stochastic steps are evaluated, in one batched forward pass. Returns
        ``(log_prob [B], entropy [B])``; entropy is the mean per-dimension Gaussian entropy of
        the stochastic steps.
        """
        converter = self._require_converter()
        chain, mask = sample.chain, sample.mask
        b, k = mask.shape
        if chain.shape[:2] != (b, k + 1) or k != self.num_steps:
            raise ValueError(f"chain {tuple(chain.shape)} and mask {tuple(mask.shape)} do not fit K={self.num_steps}")
        rows, steps = mask.nonzero(as_tuple=True)
        x, x_next = chain[rows, steps], chain[rows, steps + 1]
        t, t_next = self.grid[steps], self.grid[steps + 1]
        sub_obs = obs[rows]
        v = self.velocity(sub_obs, x, t, t_next)
        out = converter(sub_obs, x, v, t, t_next, self._t_floor(), next_x=x_next)
        zeros = torch.zeros(b, device=obs.device, dtype=out.log_prob.dtype)
        count = mask.sum(dim=1)
        log_prob = self._reduce(zeros.index_add(0, rows, out.log_prob), count)
        dims = self.event_shape[0] * self.event_shape[1]
        entropy = gaussian_entropy(torch.broadcast_to(out.std, out.mean.shape), self.event_shape) / dims
        entropy = zeros.index_add(0, rows, entropy) / count.clamp(min=1)
        return log_prob, entropy
