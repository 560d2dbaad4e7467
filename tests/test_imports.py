"""The library core imports without Ray (and without TensorBoard)."""

import subprocess
import sys

MODULES = (
    "flowrl.core, flowrl.core.transitions, flowrl.core.solvers, flowrl.core.env_step, flowrl.core.demos_file, "
    "flowrl.models, flowrl.models.sampler, flowrl.models.build, flowrl.rollout, flowrl.rollout.rollout, "
    "flowrl.rollout.shard, flowrl.rollout.collector, flowrl.rollout.build, flowrl.rollout.evaluation, "
    "flowrl.rollout.vector_env, flowrl.rewards, flowrl.algos.policy_gradient, flowrl.algos.ppo, flowrl.algos.grpo, "
    "flowrl.algos.trainer, flowrl.algos.bc, flowrl.algos.flow_bc, flowrl.config, flowrl.experiment, envs"
)


def test_core_imports_without_ray():
    code = (
        f"import sys; import {MODULES}; "
        "bad = [m for m in ('ray', 'tensorboard') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
