"""What the algorithms need from a policy, whatever its family (flow, diffusion, Gaussian)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from flowrl.core.batch import TensorBatch
from flowrl.core.transitions import Reduce, SampleUnit


class PolicySample(Protocol):
    """A ``TensorBatch`` with at least ``final [B, *E]`` (the sampled event: actions, an
    image latent) and ``log_prob [B, S]`` (one Gaussian log-density per stochastic step,
    summed over the event dims)."""

    final: Tensor
    log_prob: Tensor


@dataclass
class Evaluation:
    """A stored sample re-evaluated under the current parameters.

    log_prob: ``[B, S]`` per stochastic step, summed over the event dims (differentiable).
    entropy: ``[B]`` mean per-dimension entropy of the sample's stochastic steps.
    mean, std: ``[B, S, *E]`` the Gaussian transition of every step (std broadcast), for
        the KL to a reference policy.
    """

    log_prob: Tensor
    entropy: Tensor
    mean: Tensor
    std: Tensor


class Policy(Protocol):
    """The interface of FlowPolicy, DiffusionPolicy and GaussianPolicy.

    ``network``: the module checkpoints store. ``event_shape``: ``(Ta, Da)`` for actions.
    ``sample_unit`` / ``log_prob_reduce``: what one policy-gradient sample is and how its
    log-prob is scaled (flowrl.core.transitions).
    """

    network: nn.Module
    event_shape: tuple[int, ...]
    sample_unit: SampleUnit
    log_prob_reduce: Reduce

    def sample(
        self, cond, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> TensorBatch:
        """Stochastic events for the condition ``cond`` (``[B, ...]``) with what
        re-evaluation needs; ``noise [B, *E]`` fixes the initial state (a GRPO group)."""
        ...

    def evaluate(self, cond, sample) -> Evaluation:
        """Re-evaluate a stored sample under the current parameters."""
        ...

    def act(self, cond, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic events ``[B, *E]`` for evaluation (the ODE, DDIM eta = 0, the mean)."""
        ...

    def coupled_actions(self, cond, noise: Tensor) -> Tensor:
        """Differentiable deterministic events from the given noise ``[B, *E]``; two policies
        fed the same noise are coupled, so their mean squared distance bounds W2²."""
        ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: ``actor`` (the network) and, for a
        learned exploration noise, ``noise``."""
        ...

    def parameters(self, recurse: bool = True): ...

    def state_dict(self, *args, **kwargs): ...


P = TypeVar("P", bound=nn.Module)


def frozen_copy(policy: P) -> P:
    """The reference policy for KL and W2 terms: a frozen copy (small networks; a LoRA
    model disables its adapter instead: its ``frozen_reference()``)."""
    make_reference = getattr(policy, "frozen_reference", None)
    if make_reference is not None:
        return make_reference()
    return copy.deepcopy(policy).requires_grad_(False)


def worker_state(policy: nn.Module) -> dict[str, Tensor]:
    """The compact state sent to env workers every iteration: the persistent tensors
    (weights and observation statistics), detached, on the CPU."""
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}
