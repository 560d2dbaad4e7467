"""Small MLPs for low-dimensional control: velocity field, ReinFlow noise net, Gaussian actor,
critic, and the observation normaliser every one of them starts with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def plain_forward(net: nn.Sequential) -> Callable[[Tensor], Tensor]:
    """``net``'s forward as a plain function: each layer's ``forward`` in turn, the same ops
    without the module-call machinery (hooks do not run), which costs as much as a tiny
    layer's matmul. For the per-chain loops of sampling."""
    layers = [layer.forward for layer in net]

    def forward(h: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h)
        return h

    return forward


class ObsNormalizer(nn.Module):
    """``(obs - mean) / std`` clipped to ``[-clip, clip]``; the stats are buffers.

    Stats live in the networks' state dicts, so they travel with the weights to Ray
    workers and into every checkpoint. They come from a dataset (``set_stats``) or are
    running estimates over the rollouts (``update``, parallel Welford). The defaults
    (mean 0, var 1) leave observations unchanged apart from the clip.
    """

    def __init__(self, dim: int, clip: float = 10.0) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, obs: Tensor) -> Tensor:
        return ((obs - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def set_stats(self, mean: Tensor, std: Tensor, count: float = 1.0) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.var.copy_(torch.as_tensor(std, dtype=self.var.dtype) ** 2)
        self.count.fill_(count)

    @torch.no_grad()
    def update(self, obs: Tensor) -> None:
        """Fold a batch ``[B, O]`` into the running mean and variance."""
        obs = obs.reshape(-1, self.mean.shape[0]).to(self.mean.dtype)
        n, total = obs.shape[0], float(self.count)
        if n == 0:
            return
        b_mean, b_var = obs.mean(0), obs.var(0, unbiased=False)
        if total == 0:
            self.mean.copy_(b_mean)
            self.var.copy_(b_var)
        else:
            delta = b_mean - self.mean
            new_total = total + n
            self.mean.add_(delta * n / new_total)
            self.var.copy_((self.var * total + b_var * n + delta**2 * total * n / new_total) / new_total)
        self.count.fill_(total + n)


def copy_obs_stats(source: nn.Module, *targets: nn.Module) -> None:
    """Give every ObsNormalizer in ``targets`` the stats of the first one in ``source``."""
    src = next(m for m in source.modules() if isinstance(m, ObsNormalizer))
    for target in targets:
        for m in target.modules():
            if isinstance(m, ObsNormalizer):
                m.load_state_dict(src.state_dict())


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


class ChunkNet(nn.Module):
    """What the networks over action chunks ``[Ta, Da]`` share: their sizes and the observation
    normaliser in front of the MLP (``obs_norm``, first in every state dict)."""

    def __init__(self, obs_dim: int, horizon: int, action_dim: int) -> None:
        super().__init__()
        self.obs_dim, self.horizon, self.action_dim = obs_dim, horizon, action_dim
        self.obs_norm = ObsNormalizer(obs_dim)

    @property
    def event_shape(self) -> tuple[int, int]:
        """The action chunk ``(Ta, Da)`` this network works on."""
        return (self.horizon, self.action_dim)


class VelocityMLP(ChunkNet):
    """Velocity field over action chunks.

    forward(obs ``[B, O]``, x ``[B, Ta, Da]``, t, t_next) -> ``[B, Ta, Da]``; t and t_next are
    ``[B]`` or scalars. A plain rectified-flow field v(x, t | obs) ignores t_next. A
    ``step_conditioned`` field also sees the step size d = t_next - t and predicts the
    average velocity over the step, so that x + d * u lands on the flow's trajectory
    (shortcut models, Frans et al. 2024), which works down to K = 1. ``time_max_freq`` is the
    highest frequency of the time features (MeanFlow uses a low one: its training target
    contains du/dt, which high-frequency time features make huge).
    """

    def __init__(
        self,
        obs_dim: int,
        horizon: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        time_dim: int = 32,
        step_conditioned: bool = False,
        time_max_freq: float = 100.0,
    ) -> None:
        super().__init__(obs_dim, horizon, action_dim)
        self.step_conditioned = step_conditioned
        self.time_embed = SinusoidalTimeEmbedding(time_dim, time_max_freq)
        in_dim = obs_dim + horizon * action_dim + time_dim * (2 if step_conditioned else 1)
        self.net = mlp(in_dim, hidden_dims, horizon * action_dim)

    def forward(self, obs: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None) -> Tensor:
        return self.forward_with_hidden(obs, x, t, t_next)[0]

    def forward_with_hidden(
        self, obs: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """``forward``'s velocity and, from the same pass, the activation ``[B, H_l]`` after each
        hidden layer l of the MLP (one per ``hidden_dims`` entry): the embeddings a dispersive
        loss (flowrl.core.dispersive) spreads apart."""
        b = x.shape[0]
        t_b = _batch_time(t, b, x)
        parts = [self.obs_norm(obs), x.reshape(b, -1), self.time_embed(t_b)]
        if self.step_conditioned:
            if t_next is None:
                raise ValueError("a step-conditioned velocity field needs t_next (the end of the step)")
            parts.append(self.time_embed(_batch_time(t_next, b, x) - t_b))
        h = torch.cat(parts, dim=-1)
        hidden = []
        for layer in self.net:
            h = layer(h)
            if not isinstance(layer, nn.Linear):  # an activation closes a hidden layer
                hidden.append(h)
        return h.view(b, self.horizon, self.action_dim), hidden

    def for_chain(self, obs: Tensor, times: Tensor) -> Callable[[Tensor, int], Tensor]:
        """The field of one sampling chain of ``obs`` ``[B, O]``: ``(x, i) -> forward(obs, x,
        times[i], times[i + 1])``, the same values, with the normalised observations and the
        time features of every time ``times`` ``[M + 1]`` computed once (at these sizes a
        sample costs per torch op, not per flop)."""
        b = obs.shape[0]
        obs_n = self.obs_norm(obs)
        features = self.time_embed(times).unbind(0)
        points = times.unbind(0)
        net = plain_forward(self.net)

        def velocity(x: Tensor, i: int) -> Tensor:
            parts = [obs_n, x.reshape(b, -1), features[i].expand(b, -1)]
            if self.step_conditioned:  # the step size in x's dtype, as forward takes it
                step = points[i + 1].to(x.dtype) - points[i].to(x.dtype)
                parts.append(self.time_embed(step).expand(b, -1))
            return net(torch.cat(parts, dim=-1)).view(b, self.horizon, self.action_dim)

        return velocity


class ReinFlowNoiseNet(ChunkNet):
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
        if not 0.0 < std_min < std_max:
            raise ValueError(f"noise std range must satisfy 0 < std_min < std_max, got [{std_min}, {std_max}]")
        super().__init__(obs_dim, horizon, action_dim)
        self.std_min, self.std_max = std_min, std_max
        self.condition_on_x = condition_on_x
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        in_dim = obs_dim + time_dim + (horizon * action_dim if condition_on_x else 0)
        self.net = mlp(in_dim, hidden_dims, horizon * action_dim, activation=nn.Tanh)

    def forward(self, obs: Tensor, t: Tensor | float, x: Tensor | None = None) -> Tensor:
        b = obs.shape[0]
        parts = [self.obs_norm(obs), self.time_embed(_batch_time(t, b, obs))]
        if self.condition_on_x:
            if x is None:
                raise ValueError("this noise net conditions on x: pass the current sample")
            parts.append(x.reshape(b, -1))
        return self._squash(self.net(torch.cat(parts, dim=-1)).view(b, self.horizon, self.action_dim))

    def _squash(self, raw: Tensor) -> Tensor:
        return self.std_min + (self.std_max - self.std_min) * torch.sigmoid(raw)

    def for_chain(self, obs: Tensor, times: Tensor) -> Callable[[int, Tensor], Tensor]:
        """The std of one sampling chain of ``obs`` ``[B, O]``: ``(i, x) -> forward(obs,
        times[i], x)``, the same values. The normalised observations and the time features
        are computed once; without ``condition_on_x`` the std of every step start
        ``times[:-1]`` comes from one pass over ``[M * B]`` rows."""
        b, shape = obs.shape[0], (self.horizon, self.action_dim)
        obs_n = self.obs_norm(obs)
        features = self.time_embed(times[:-1])
        if self.condition_on_x:
            rows, net = features.unbind(0), plain_forward(self.net)
            return lambda i, x: self._squash(
                net(torch.cat([obs_n, rows[i].expand(b, -1), x.reshape(b, -1)], dim=-1)).view(b, *shape)
            )
        m = features.shape[0]
        inputs = torch.cat([obs_n.expand(m, b, -1), features.unsqueeze(1).expand(m, b, -1)], dim=-1)
        stds = self._squash(self.net(inputs.reshape(m * b, -1)).view(m, b, *shape)).unbind(0)
        return lambda i, x: stds[i]


class ValueMLP(nn.Module):
    """Critic V(obs): ``[B, O] -> [B]``."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.obs_norm = ObsNormalizer(obs_dim)
        self.net = mlp(obs_dim, hidden_dims, 1, activation=nn.Tanh)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(self.obs_norm(obs)).squeeze(-1)


class GaussianActor(ChunkNet):
    """Gaussian policy network over action chunks: mean MLP(obs) and a learned,
    state-independent std (CleanRL's continuous-action PPO agent).

    forward(obs ``[B, O]``) -> (mean ``[B, Ta, Da]``, std ``[Ta, Da]``).
    """

    def __init__(
        self,
        obs_dim: int,
        horizon: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        init_std: float = 0.5,
    ) -> None:
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        super().__init__(obs_dim, horizon, action_dim)
        self.net = mlp(obs_dim, hidden_dims, horizon * action_dim, activation=nn.Tanh)
        with torch.no_grad():  # small initial means: start near the centre of the action box
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.zero_()
        self.log_std = nn.Parameter(torch.full((horizon, action_dim), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.net(self.obs_norm(obs)).view(obs.shape[0], self.horizon, self.action_dim)
        return mean, self.log_std.exp()
