"""Small MLPs for low-dimensional control: velocity field, ReinFlow noise net, critic."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    dim = in_dim
    for width in hidden:
        layers += [nn.Linear(dim, width), activation()]
        dim = width
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class SinusoidalTimeEmbedding(nn.Module):
    """t in [0, 1] ``[B]`` -> ``[B, dim]`` sin/cos features at geometric frequencies 1..max_freq."""

    def __init__(self, dim: int, max_freq: float = 100.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(self.freqs.dtype).unsqueeze(-1) * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


def _batch_time(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(batch) if t.ndim == 0 else t


class VelocityMLP(nn.Module):
    """Velocity field over action chunks.

    forward(obs ``[B, O]``, x ``[B, Ta, Da]``, t, t_next) -> ``[B, Ta, Da]``; t and t_next are
    ``[B]`` or scalars. A plain rectified-flow field v(x, t | obs) ignores t_next. A
    ``step_conditioned`` field also sees the step size d = t_next - t and predicts the
    average velocity over the step, so that x + d * u lands on the flow's trajectory
    (shortcut models, Frans et al. 2024), which works down to K = 1.
    """

    def __init__(
        self,
        obs_dim: int,
        horizon: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        time_dim: int = 32,
        step_conditioned: bool = False,
    ) -> None:
        super().__init__()
        self.obs_dim, self.horizon, self.action_dim = obs_dim, horizon, action_dim
        self.step_conditioned = step_conditioned
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        in_dim = obs_dim + horizon * action_dim + time_dim * (2 if step_conditioned else 1)
        self.net = mlp(in_dim, hidden_dims, horizon * action_dim)

    def forward(self, obs: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None) -> Tensor:
        b = x.shape[0]
        t_b = _batch_time(t, b, x)
        parts = [obs, x.reshape(b, -1), self.time_embed(t_b)]
        if self.step_conditioned:
            if t_next is None:
                raise ValueError("a step-conditioned velocity field needs t_next (the end of the step)")
            parts.append(self.time_embed(_batch_time(t_next, b, x) - t_b))
        return self.net(torch.cat(parts, dim=-1)).view(b, self.horizon, self.action_dim)


class ReinFlowNoiseNet(nn.Module):
    """Learnable exploration std of each denoising step, squashed into [std_min, std_max].

    forward(obs ``[B, O]``, t ``[B]``, x ``[B, Ta, Da]`` or None) -> std ``[B, Ta, Da]``.
    ReinFlow conditions on (obs, t); with ``condition_on_x`` it also sees the current sample
    (the Flow-Noise variant of piRL).
    """

    def __init__(
        self,
        obs_dim: int,
        horizon: int,
        action_dim: int,
        std_min: float,
        std_max: float,
        hidden_dims: Sequence[int] = (64, 64),
        time_dim: int = 16,
        condition_on_x: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < std_min < std_max:
            raise ValueError(f"noise std range must satisfy 0 < std_min < std_max, got [{std_min}, {std_max}]")
        self.horizon, self.action_dim = horizon, action_dim
        self.std_min, self.std_max = std_min, std_max
        self.condition_on_x = condition_on_x
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        in_dim = obs_dim + time_dim + (horizon * action_dim if condition_on_x else 0)
        self.net = mlp(in_dim, hidden_dims, horizon * action_dim, activation=nn.Tanh)

    def forward(self, obs: Tensor, t: Tensor | float, x: Tensor | None = None) -> Tensor:
        b = obs.shape[0]
        parts = [obs, self.time_embed(_batch_time(t, b, obs))]
        if self.condition_on_x:
            if x is None:
                raise ValueError("this noise net conditions on x: pass the current sample")
            parts.append(x.reshape(b, -1))
        raw = self.net(torch.cat(parts, dim=-1)).view(b, self.horizon, self.action_dim)
        return self.std_min + (self.std_max - self.std_min) * torch.sigmoid(raw)


class ValueMLP(nn.Module):
    """Critic V(obs): ``[B, O] -> [B]``."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 1, activation=nn.Tanh)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs).squeeze(-1)
