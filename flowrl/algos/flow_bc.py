"""Flow-matching behaviour-cloning losses of the flow policy families.

``a`` is the demonstrated action chunk ``[Ta, Da]`` that follows ``obs``; t ~ U(0, 1),
eps ~ N(0, I), x_t = (1 - t) eps + t a, and v = a - eps is the conditional velocity.

- rectified_flow: || v_theta(obs, x_t, t) - v ||^2.
- shortcut (Frans et al. 2024): a field u(x, t, t + d) conditioned on the step size d. Part of
  each batch learns flow matching at d = 0; the rest learns self-consistency: one step of 2d
  equals two steps of d, target (u(x_t, t, t+d) + u(x', t+d, t+2d)) / 2 with x' = x_t + d u(...).
- meanflow (Geng et al. 2025): u(x, t, r) is the average velocity over [t, r]. Differentiating
  (r - t) u = int_t^r v along the trajectory gives u = v + (r - t) du/dt, with the total
  derivative du/dt = v . d_x u + d_t u, a Jacobian-vector product. Part of each batch has
  r = t (plain flow matching); the target is held fixed (stop-gradient).

Every loss takes ``hidden``: a list that, when given, receives the hidden activations
``[B, H_l]`` (one per MLP layer, ``VelocityMLP.forward_with_hidden``) of the prediction pass that
carries the gradient, for the dispersive regulariser (flowrl.core.dispersive) without a second
forward pass. The training loop (EMA, progress) is ``flowrl.algos.bc``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.models.networks import VelocityMLP

# the shortcut model's smallest self-consistency step is 2^-SHORTCUT_HALVINGS (Frans et al. use 1/128)
SHORTCUT_HALVINGS = 7


def _path(chunks: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) eps + t a: chunks and eps ``[B, *E]``, t ``[B]``."""
    tb = t.view(-1, *([1] * (chunks.ndim - 1)))
    return (1.0 - tb) * eps + tb * chunks


def _part(b: int, fraction: float, at_most: int) -> int:
    """The size of a batch's ``fraction`` part: rounded, at least 1, at most ``at_most``."""
    return min(at_most, max(1, round(b * fraction)))


def _predict(velocity: VelocityMLP, hidden: list[Tensor] | None, obs, x: Tensor, t, t_next) -> Tensor:
    """``velocity(obs, x, t, t_next)``; with ``hidden`` its hidden activations are appended there."""
    if hidden is None:
        return velocity(obs, x, t, t_next)
    out, layers = velocity.forward_with_hidden(obs, x, t, t_next)
    hidden.extend(layers)
    return out


def flow_matching_loss(
    velocity: VelocityMLP,
    obs: Tensor,
    chunks: Tensor,
    generator: torch.Generator | None = None,
    hidden: list[Tensor] | None = None,
) -> Tensor:
    """Rectified-flow loss on a batch: obs ``[B, O]`` (any condition the field takes, e.g.
    caption ids), chunks ``[B, *E]`` (action chunks ``[B, Ta, Da]``, images ``[B, C, H, W]``)."""
    b = chunks.shape[0]
    t = torch.rand(b, generator=generator, device=chunks.device)
    eps = torch.randn(chunks.shape, generator=generator, device=chunks.device)
    return ((_predict(velocity, hidden, obs, _path(chunks, eps, t), t, t) - (chunks - eps)) ** 2).mean()


def shortcut_loss(
    velocity: VelocityMLP,
    obs: Tensor,
    chunks: Tensor,
    consistency_fraction: float,
    generator: torch.Generator | None = None,
    hidden: list[Tensor] | None = None,
) -> Tensor:
    """Shortcut-model loss: flow matching at d = 0 plus self-consistency at d = 2^-k,
    k = 1..SHORTCUT_HALVINGS, on ``consistency_fraction`` of the batch."""
    b, dev = chunks.shape[0], chunks.device
    n_sc = _part(b, consistency_fraction, b - 1)
    eps = torch.randn(chunks.shape, generator=generator, device=dev)
    # Self-consistency part: d = 2^-k (k = 1..SHORTCUT_HALVINGS), t on the d-grid with t + 2d <= 1.
    k = torch.randint(1, SHORTCUT_HALVINGS + 1, (n_sc,), generator=generator, device=dev)
    d = 2.0 ** (-k.float())
    t_sc = torch.floor(torch.rand(n_sc, generator=generator, device=dev) * (1.0 / d - 1.0)) * d
    # Flow-matching part: continuous t, step size 0.
    t_fm = torch.rand(b - n_sc, generator=generator, device=dev)
    x_t = _path(chunks, eps, torch.cat([t_sc, t_fm]))
    o_sc, x_sc = obs[:n_sc], x_t[:n_sc]
    with torch.no_grad():
        first = velocity(o_sc, x_sc, t_sc, t_sc + d)
        x_mid = x_sc + d.view(-1, 1, 1) * first
        second = velocity(o_sc, x_mid, t_sc + d, t_sc + 2 * d)
        sc_target = 0.5 * (first + second)
    h_sc: list[Tensor] | None = None if hidden is None else []
    h_fm: list[Tensor] | None = None if hidden is None else []
    pred_sc = _predict(velocity, h_sc, o_sc, x_sc, t_sc, t_sc + 2 * d)
    pred_fm = _predict(velocity, h_fm, obs[n_sc:], x_t[n_sc:], t_fm, t_fm)
    if hidden is not None:  # both parts of the batch, in its order
        hidden.extend(torch.cat([a, b_]) for a, b_ in zip(h_sc, h_fm, strict=True))
    fm_target = chunks[n_sc:] - eps[n_sc:]
    errors = torch.cat([(pred_sc - sc_target).flatten(1), (pred_fm - fm_target).flatten(1)])
    return (errors**2).mean()


def meanflow_loss(
    velocity: VelocityMLP,
    obs: Tensor,
    chunks: Tensor,
    interval_fraction: float,
    generator: torch.Generator | None = None,
    weight_power: float = 1.0,
    hidden: list[Tensor] | None = None,
) -> Tensor:
    """MeanFlow loss on a batch; ``interval_fraction`` of it has r > t.

    Each sample's squared error is divided by (its detached value + 1e-3)^weight_power
    (MeanFlow's adaptive weighting), which keeps the large early JVP targets from dominating.
    """
    b, dev = chunks.shape[0], chunks.device
    eps = torch.randn(chunks.shape, generator=generator, device=dev)
    ends = torch.rand(b, 2, generator=generator, device=dev)
    t, r = ends.min(dim=1).values, ends.max(dim=1).values
    n_interval = _part(b, interval_fraction, b)
    r = torch.cat([r[:n_interval], t[n_interval:]])
    x_t = _path(chunks, eps, t)
    v = chunks - eps

    def field(x: Tensor, t_: Tensor) -> tuple[Tensor, list[Tensor]]:
        out: list[Tensor] = []
        return _predict(velocity, None if hidden is None else out, obs, x, t_, r), out

    # the activations come back as jvp's aux: the pass that makes u, no second one
    u, du_dt, layers = torch.func.jvp(field, (x_t, t), (v, torch.ones_like(t)), has_aux=True)
    if hidden is not None:
        hidden.extend(layers)
    target = (v + (r - t).view(-1, 1, 1) * du_dt).detach()
    err = ((u - target) ** 2).flatten(1).mean(dim=1)
    return (err / (err.detach() + 1e-3) ** weight_power).mean()
