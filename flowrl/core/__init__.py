"""Pure tensor math: time grids, stochastic steps, windows, advantages and losses.

Nothing here knows about environments, Ray or configs; every function documents its shapes.
"""

from flowrl.core.advantages import gae, group_advantages
from flowrl.core.batch import TensorBatch
from flowrl.core.grids import time_grid
from flowrl.core.losses import clipped_surrogate, value_loss
from flowrl.core.steps import (
    StepOutput,
    cps_step,
    euler_step,
    flow_sde_std_scale,
    flow_sde_step,
    gaussian_entropy,
    gaussian_log_prob,
    gaussian_step,
)
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow, StepWindow

__all__ = [
    "AllSteps",
    "OneRandomStep",
    "SlidingWindow",
    "StepOutput",
    "StepWindow",
    "TensorBatch",
    "clipped_surrogate",
    "cps_step",
    "euler_step",
    "flow_sde_std_scale",
    "flow_sde_step",
    "gae",
    "gaussian_entropy",
    "gaussian_log_prob",
    "gaussian_step",
    "group_advantages",
    "time_grid",
    "value_loss",
]
