"""Windows: which of the K denoising steps are stochastic (and trained) in a rollout.

Outside the window the sampler takes deterministic ODE steps. Every window is a pure
function of (batch size, eligible steps, iteration, generator): nothing is stored between
calls, so a run resumed at iteration i sees the same window as the uninterrupted run.

``eligible`` ([K] bool) marks the steps that can be stochastic at all (e.g. the last CPS
step has zero std and is always deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor


class StepWindow(Protocol):
    def mask(self, batch: int, eligible: Tensor, iteration: int, generator: torch.Generator | None) -> Tensor:
        """Returns ``[batch, K]`` bool: True where step k of sample b is stochastic."""
        ...


def _check_eligible(eligible: Tensor) -> None:
    if eligible.ndim != 1 or eligible.dtype != torch.bool:
        raise ValueError(f"eligible must be a [K] bool tensor, got {eligible.dtype} {tuple(eligible.shape)}")
    if not bool(eligible.any()):
        raise ValueError("no denoising step can be stochastic: increase the number of steps")


@dataclass(frozen=True)
class AllSteps:
    """Every eligible step is stochastic (ReinFlow, Flow-Noise, Flow-GRPO)."""

    def mask(self, batch: int, eligible: Tensor, iteration: int, generator: torch.Generator | None) -> Tensor:
        _check_eligible(eligible)
        return eligible.unsqueeze(0).expand(batch, -1).clone()


@dataclass(frozen=True)
class OneRandomStep:
    """One eligible step per sample, uniformly at random (piRL Flow-SDE: ~1/K training cost)."""

    def mask(self, batch: int, eligible: Tensor, iteration: int, generator: torch.Generator | None) -> Tensor:
        _check_eligible(eligible)
        choices = eligible.nonzero().flatten()
        pick = torch.randint(len(choices), (batch,), generator=generator)
        mask = torch.zeros(batch, eligible.shape[0], dtype=torch.bool, device=eligible.device)
        mask[torch.arange(batch), choices[pick].to(eligible.device)] = True
        return mask


SlidingMode = Literal["progressive", "random", "decay"]


@dataclass(frozen=True)
class SlidingWindow:
    """A window of ``size`` consecutive steps that moves over training (MixGRPO).

    progressive: starts at step 0 and moves by ``stride`` every ``shift_interval`` iterations
        until it covers the last step, where it stays (or restarts at 0 with ``roll_back``).
    random: a start drawn per iteration from (seed, iteration), the same for the whole batch.
    decay: like progressive, but the j-th shift waits ``shift_interval * decay_rate**j``
        iterations (at least ``min_shift_interval``): the window lingers on the early,
        high-noise steps and moves faster later. With ``roll_back`` the intervals keep
        shrinking across restarts.

    Positions are counted over the E eligible steps (E = K unless the converter rules some
    out): 0, stride, 2 stride, ... while below E - size, then E - size.
    """

    size: int
    mode: SlidingMode = "progressive"
    shift_interval: int = 25
    stride: int = 1
    decay_rate: float = 0.8
    min_shift_interval: int = 1
    roll_back: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"sliding window size must be >= 1, got {self.size}")
        if self.shift_interval < 1 or self.stride < 1 or self.min_shift_interval < 1:
            raise ValueError("sliding window shift_interval, stride and min_shift_interval must be >= 1")
        if not 0.0 < self.decay_rate <= 1.0:
            raise ValueError(f"sliding window decay_rate must be in (0, 1], got {self.decay_rate}")

    def start(self, num_steps: int, iteration: int) -> int:
        """First position of the window at ``iteration`` among ``num_steps`` eligible steps."""
        last = max(num_steps - self.size, 0)
        if self.mode == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
            return int(torch.randint(last + 1, (1,), generator=g))
        if self.mode == "progressive":
            shifts = iteration // self.shift_interval
        elif self.mode == "decay":
            shifts, elapsed = 0, 0
            while True:
                wait = max(self.min_shift_interval, round(self.shift_interval * self.decay_rate**shifts))
                if elapsed + wait > iteration:
                    break
                elapsed += wait
                shifts += 1
                if shifts * self.stride > last and not self.roll_back:
                    break
        else:
            raise ValueError(f"unknown sliding window mode {self.mode!r}")
        num_positions = -(-last // self.stride) + 1  # 0, stride, ..., then last
        if self.roll_back:
            shifts %= num_positions
        return min(shifts * self.stride, last)

    def mask(self, batch: int, eligible: Tensor, iteration: int, generator: torch.Generator | None) -> Tensor:
        _check_eligible(eligible)
        # The window slides over the eligible steps only (CPS never makes the step into
        # t = 1 stochastic): positions counted over all K steps would leave a window of
        # the last position(s) with no eligible step at all.
        candidates = eligible.nonzero().flatten()
        begin = self.start(len(candidates), iteration)
        steps = torch.zeros(eligible.shape[0], dtype=torch.bool, device=eligible.device)
        steps[candidates[begin : begin + self.size]] = True
        return steps.unsqueeze(0).expand(batch, -1).clone()
