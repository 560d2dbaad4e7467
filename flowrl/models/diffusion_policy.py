"""DiffusionPolicy: a DDPM/DDIM epsilon-prediction policy over action chunks (the DPPO baseline).

Every denoising step is a Gaussian transition with an exact log-prob, so each step of each
chain is its own PPO sample (DPPO, Ren et al. 2024). Conventions (DDPM indexing, not flow
time): timestep tau = T-1 is (almost) pure noise, tau = 0 the least noisy training step, and
``alpha_bar_prev = 1`` after the last sampling step, where the chain reaches the actions.

The denoiser is a ``VelocityMLP`` used as an epsilon predictor; it sees the timestep as
``diffusion_time(tau, T) = (tau + 1) / T`` in (0, 1], in sampling, re-evaluation and BC alike.

Sampling timesteps use "trailing" spacing: ``tau_k = round((K - k) T / K) - 1`` for
k = 0..K-1, so the chain always starts at tau = T-1 where x_T ~ N(0, I) is the right marginal,
and K = T is plain DDPM over every training step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowrl.core.steps import StepOutput, gaussian_transition, per_sample
from flowrl.core.transitions import Transitions
from flowrl.models.networks import VelocityMLP
from flowrl.models.policy import Evaluation

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def cosine_alphas_cumprod(train_steps: int) -> Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021): ``alpha_bar [T]`` in float64.

    beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999) with f(t) = cos²((t + 0.008)/1.008 · π/2);
    the cap keeps the last step finite, where f reaches 0. Same values as diffusers'
    ``beta_schedule="squaredcos_cap_v2"`` (which rounds to float32).
    """
    if train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    s = 0.008
    grid = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    f = torch.cos((grid + s) / (1.0 + s) * math.pi / 2.0) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(train_steps: int, num_steps: int) -> Tensor:
    """Descending sampling timesteps ``[K]`` (int64), trailing spacing: round((K-k)·T/K) - 1.

    Equal strides T/K when K divides T (then identical to diffusers' ``timestep_spacing=
    "trailing"``); K = T gives T-1, ..., 0.
    """
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"need 1 <= num_steps <= train_steps, got num_steps={num_steps}, train_steps={train_steps}")
    fractions = torch.arange(num_steps, 0, -1, dtype=torch.float64) * train_steps / num_steps
    return torch.round(fractions).long() - 1


def diffusion_time(tau: Tensor | int, train_steps: int) -> Tensor:
    """The denoiser's time input for DDPM timestep ``tau``: ``(tau + 1) / T`` in (0, 1], float32.

    Shifted by one so that no training timestep is mapped to t = 0.
    """
    tau = torch.as_tensor(tau)
    return (tau.to(torch.float32) + 1.0) / train_steps


def ddim_sigma(alpha_bar: Tensor | float, alpha_bar_prev: Tensor | float, eta: float) -> Tensor:
    """DDIM noise scale ``eta · sqrt((1 - ᾱ_prev)/(1 - ᾱ)) · sqrt(1 - ᾱ/ᾱ_prev)`` (float64).

    eta = 1 is the DDPM posterior std between the two timesteps; it is 0 when ᾱ_prev = 1.
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    abp = torch.as_tensor(alpha_bar_prev, dtype=torch.float64, device=ab.device)
    # clamp: rounding can push 1 - ᾱ/ᾱ_prev a hair below zero when ᾱ_prev = 1.
    return eta * torch.sqrt((1.0 - abp) / (1.0 - ab)) * torch.sqrt((1.0 - ab / abp).clamp(min=0.0))


def ddim_step(
    x: Tensor,
    eps: Tensor,
    alpha_bar: Tensor | float,
    alpha_bar_prev: Tensor | float,
    *,
    eta: float,
    min_std: float = 0.0,
    denoised_clip: float | None = None,
    noise: Tensor | None = None,
    next_x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One DDIM step from timestep tau (``alpha_bar``) to tau_prev (``alpha_bar_prev``); pure.

    x, eps: ``[B, *E]`` (eps is the denoiser's prediction at x); alpha_bar, alpha_bar_prev:
    scalars or ``[B]``.

    x0 = (x - sqrt(1-ᾱ) eps) / sqrt(ᾱ), clamped to ±denoised_clip when set, with eps then
    recomputed from the clamped x0 (so that x0 and eps stay consistent with x);
    sigma = ddim_sigma(ᾱ, ᾱ_prev, eta); mean = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - sigma²) eps;
    std = max(sigma, min_std) (DPPO's floor, which keeps every step's log-prob finite).

    Samples ``next_x ~ N(mean, std²)`` (``noise`` or the generator), or re-evaluates a given
    ``next_x``. The returned log-prob ``[B]`` is summed over the event dims and is 0 for rows
    whose std is 0 (a deterministic step: eta = 0 and min_std = 0, or the last step of eta = 1
    without a floor); their sample is the mean.
    """
    if eta < 0 or min_std < 0:
        raise ValueError(f"eta and min_std must be >= 0, got eta={eta}, min_std={min_std}")
    if eps.shape != x.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    xc, ec = x.to(dtype), eps.to(dtype)
    # Coefficients in float64: near tau = T-1, sqrt(ᾱ) is ~1e-4 and 1 - ᾱ_prev - sigma² is a
    # difference of nearly equal numbers; float32 would lose digits there.
    ab = per_sample(alpha_bar, xc, torch.float64, "a schedule value")
    abp = per_sample(alpha_bar_prev, xc, torch.float64, "a schedule value")
    sigma = ddim_sigma(ab, abp, eta)
    sqrt_ab, sqrt_one_minus_ab = ab.sqrt().to(dtype), (1.0 - ab).sqrt().to(dtype)
    direction = (1.0 - abp - sigma * sigma).clamp(min=0.0).sqrt().to(dtype)
    std = sigma.clamp(min=min_std).to(dtype)

    x0 = (xc - sqrt_one_minus_ab * ec) / sqrt_ab
    if denoised_clip is not None:
        x0 = x0.clamp(-denoised_clip, denoised_clip)
        ec = (xc - sqrt_ab * x0) / sqrt_one_minus_ab
    mean = abp.sqrt().to(dtype) * x0 + direction * ec

    return gaussian_transition(x, mean, std, noise, next_x, generator)


class DiffusionPolicy(nn.Module):
    """DDPM (K = T) or strided DDIM (K < T) policy whose denoising steps are PPO samples.

    ``sample`` runs the stochastic chain (eta = 1, std = max(sigma, min_std)) and stores it;
    ``log_prob`` re-evaluates every step's Gaussian log-density, averaged per action dimension
    (sum over Ta·Da divided by Ta·Da, the per-dimension scale of flowrl's flow policies);
    ``act`` / ``coupled_actions`` run deterministic DDIM (eta = 0).

    denoiser: epsilon predictor (a plain, not step-conditioned, VelocityMLP).
    train_steps: T, the DDPM training steps of the cosine schedule.
    num_steps: K <= T sampling steps.
    min_std: floor on the sampling and log-prob std (DPPO's min sampling std); with a floor
        every step is stochastic, including the last one into ᾱ = 1. With min_std = 0 that
        last step is deterministic and its mask entry False.
    denoised_clip: clamp of the predicted x0 (actions live in [-1, 1]); None disables it.
    """

    def __init__(
        self,
        denoiser: VelocityMLP,
        train_steps: int,
        num_steps: int,
        min_std: float = 0.1,
        denoised_clip: float | None = 1.0,
    ) -> None:
        super().__init__()
        if getattr(denoiser, "step_conditioned", False):
            raise ValueError("an epsilon-prediction denoiser must not be step-conditioned (no t_next in DDPM training)")
        if train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {train_steps}")
        if not 1 <= num_steps <= train_steps:
            raise ValueError(
                f"need 1 <= num_steps <= train_steps, got num_steps={num_steps}, train_steps={train_steps}"
            )
        if not (math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"min_std must be finite and >= 0, got {min_std}")
        if num_steps == 1 and min_std == 0:
            raise ValueError("num_steps=1 with min_std=0 has no stochastic step (nothing to train): set min_std > 0")
        if denoised_clip is not None and not (math.isfinite(denoised_clip) and denoised_clip > 0):
            raise ValueError(f"denoised_clip must be None or a finite value > 0, got {denoised_clip}")
        self.denoiser = denoiser
        self.train_steps = train_steps
        self.num_steps = num_steps
        self.min_std = float(min_std)
        self.denoised_clip = None if denoised_clip is None else float(denoised_clip)

        alphas_cumprod = cosine_alphas_cumprod(train_steps)
        timesteps = ddim_timesteps(train_steps, num_steps)
        step_alpha = alphas_cumprod[timesteps]
        step_alpha_prev = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1, dtype=torch.float64)])
        sample_std = ddim_sigma(step_alpha, step_alpha_prev, 1.0).clamp(min=self.min_std)
        # Derived from the constructor arguments: not checkpointed (the actor is).
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer("step_alpha", step_alpha, persistent=False)
        self.register_buffer("step_alpha_prev", step_alpha_prev, persistent=False)
        self.register_buffer("step_time", diffusion_time(timesteps, train_steps), persistent=False)
        self.register_buffer("sample_std", sample_std, persistent=False)

    # DPPO: every denoising step is its own PPO sample, log-probs per action dimension.
    sample_unit = "step"
    log_prob_reduce = "mean"

    @property
    def network(self) -> VelocityMLP:
        """The network a checkpoint stores."""
        return self.denoiser

    @property
    def event_shape(self) -> tuple[int, int]:
        return tuple(self.denoiser.event_shape)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Only the denoiser: the exploration noise is the fixed DDPM variance with its floor."""
        return {"actor": list(self.denoiser.parameters())}

    def stochastic_steps(self) -> Tensor:
        """``[K]`` bool: the steps with a positive sampling std (all of them when min_std > 0)."""
        return self.sample_std > 0

    def _step(self, obs: Tensor, x: Tensor, k: Tensor | int, eta: float, **kwargs) -> StepOutput:
        eps = self.denoiser(obs, x, self.step_time[k])
        min_std = self.min_std if eta > 0 else 0.0
        return ddim_step(
            x,
            eps,
            self.step_alpha[k],
            self.step_alpha_prev[k],
            eta=eta,
            min_std=min_std,
            denoised_clip=self.denoised_clip,
            **kwargs,
        )

    @torch.no_grad()
    def sample(
        self, obs: Tensor, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Transitions:
        """Stochastic chains for ``obs [B, O]`` (eta = 1, std floored at min_std).

        ``iteration`` is unused (every step is sampled stochastically). x_T ~ N(0, I) (or
        ``noise``) first, then each step's noise, all with ``generator``. Stores the S
        stochastic steps (S = K with min_std > 0; the last, deterministic step is left out
        with min_std = 0): x_in, x_out ``[B, S, Ta, Da]``, log_prob ``[B, S]`` summed over
        the chunk.
        """
        b = obs.shape[0]
        x = noise if noise is not None else torch.randn((b, *self.event_shape), generator=generator, device=obs.device)
        chain, log_probs = [x], []
        for k in range(self.num_steps):
            out = self._step(obs, x, k, eta=1.0, generator=generator)
            x = out.next_x
            chain.append(x)
            log_probs.append(out.log_prob)
        steps = self.stochastic_steps().nonzero().flatten().to(obs.device)
        chain_t = torch.stack(chain, dim=1)
        return Transitions(
            final=x,
            x_in=chain_t[:, steps],
            x_out=chain_t[:, steps + 1],
            steps=steps.expand(b, -1).clone(),
            log_prob=torch.stack(log_probs, 1)[:, steps],
            nfe=torch.full((b,), float(self.num_steps), device=obs.device),
        )

    def evaluate(self, obs: Tensor, sample: Transitions) -> Evaluation:
        """Re-evaluate stored steps under the current denoiser, differentiably, in one
        batched pass: log_prob ``[B, S]`` (summed over the chunk), entropy ``[B]`` (mean
        per-dimension Gaussian entropy), mean and std ``[B, S, Ta, Da]``."""
        b, s = sample.steps.shape
        if sample.x_in.shape[2:] != self.event_shape or (
            sample.steps.numel() and int(sample.steps.max()) >= self.num_steps
        ):
            raise ValueError(
                f"stored steps {tuple(sample.x_in.shape)} do not fit K={self.num_steps}, event shape {self.event_shape}"
            )
        rows = torch.arange(b, device=obs.device).repeat_interleave(s)
        steps = sample.steps.reshape(-1)
        out = self._step(obs[rows], sample.x_in.flatten(0, 1), steps, eta=1.0, next_x=sample.x_out.flatten(0, 1))
        # The std is the same for every dimension of a step, so the per-dimension entropy is scalar.
        step_entropy = 0.5 + _LOG_SQRT_2PI + torch.log(out.std.reshape(-1))
        entropy = torch.zeros(b, dtype=step_entropy.dtype, device=obs.device).index_add(0, rows, step_entropy)
        std = torch.broadcast_to(out.std, out.mean.shape)
        return Evaluation(
            log_prob=out.log_prob.view(b, s),
            entropy=entropy / max(s, 1),
            mean=out.mean.view(b, s, *self.event_shape),
            std=std.reshape(b, s, *self.event_shape),
        )

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic DDIM (eta = 0) from x_T ~ N(0, I) drawn with ``generator``. ``[B, O] -> [B, Ta, Da]``."""
        x = torch.randn((obs.shape[0], *self.event_shape), generator=generator, device=obs.device)
        return self.coupled_actions(obs, x)

    def coupled_actions(self, obs: Tensor, noise: Tensor) -> Tensor:
        """Deterministic DDIM actions from the given x_T ``[B, Ta, Da]``, differentiable.

        Two policies fed the same noise give a coupling of their action distributions, so the
        mean squared distance of their actions bounds W2²."""
        x = noise
        for k in range(self.num_steps):
            x = self._step(obs, x, k, eta=0.0).next_x
        return x
