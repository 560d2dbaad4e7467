"""Pure tensor math: time grids, stochastic steps, ODE solvers, windows, transitions,
advantages and losses; and the two record formats that ``envs/`` and the library share, kept in
this lowest layer so that both import them without an upward arrow: the vector-env interface
(env_step.py) and the demonstrations file (demos_file.py).

Nothing here imports an env, Ray or a config; every function documents its shapes.
"""

from flowrl.core.advantages import gae, group_advantages
from flowrl.core.batch import TensorBatch
from flowrl.core.grids import time_grid
from flowrl.core.losses import clipped_surrogate, value_loss
from flowrl.core.solvers import SOLVERS, dpm_solver_2m_step, heun_step, ode_solve
from flowrl.core.steps import (
    StepOutput,
    cps_step,
    euler_step,
    flow_sde_std_scale,
    flow_sde_step,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_step,
    gaussian_transition,
)
from flowrl.core.transitions import Transitions, steps_from_mask, unit_values
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow, StepWindow

__all__ = [
    "SOLVERS",
    "AllSteps",
    "OneRandomStep",
    "SlidingWindow",
    "StepOutput",
    "StepWindow",
    "TensorBatch",
    "Transitions",
    "clipped_surrogate",
    "cps_step",
    "dpm_solver_2m_step",
    "euler_step",
    "flow_sde_std_scale",
    "flow_sde_step",
    "gae",
    "gaussian_entropy",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_step",
    "gaussian_transition",
    "group_advantages",
    "heun_step",
    "ode_solve",
    "steps_from_mask",
    "time_grid",
    "unit_values",
    "value_loss",
]
