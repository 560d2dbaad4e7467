"""MuJoCo's C warnings under ``import envs``: the one deprecation flood (HalfCheetah's
``settotalmass`` under MuJoCo 4.0) is dropped, every other MuJoCo warning and flowrl's own
warnings still show. Run in a fresh interpreter: what a user's console shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging, warnings
import gymnasium as gym
import mujoco
import envs
for _ in range(3):
    gym.make("HalfCheetah-v5").close()
xml = '<mujoco><worldbody><body><freejoint/><geom size="0.1"/></body></worldbody></mujoco>'
model = mujoco.MjModel.from_xml_string(xml)
data = mujoco.MjData(model)
data.qvel[:] = float("nan")
mujoco.mj_step(model, data)  # MuJoCo warns: an unstable simulation
logging.basicConfig()
logging.getLogger("flowrl").warning("a flowrl log warning")
warnings.warn("a flowrl UserWarning", UserWarning)
"""


def test_halfcheetah_deprecation_is_dropped_and_other_warnings_still_show(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True
    )
    err = done.stderr
    assert "settotalmass" not in err and "settotalmass" not in done.stdout
    assert "MujocoWarning: Nan, Inf or huge value in QVEL" in err  # other MuJoCo warnings: Python warnings now
    assert "a flowrl log warning" in err and "UserWarning: a flowrl UserWarning" in err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()  # MuJoCo's default handler no longer writes its log file


BROKEN_GL = """
import sys
class Broken:  # what PyOpenGL does inside `import mujoco` when MUJOCO_GL=osmesa lacks libOSMesa
    def find_spec(self, name, path=None, target=None):
        if name == "mujoco":
            raise AttributeError("'NoneType' object has no attribute 'glGetError'")
sys.meta_path.insert(0, Broken())
import envs
from flowrl.errors import FlowRLError
envs.make_env("flowrl/TwoGoal-v0", 1).close()  # envs without MuJoCo still work
try:
    envs.make_env("Hopper-v5", 1)
except FlowRLError as exc:
    print("ERROR", exc)
"""


def test_a_mujoco_that_cannot_import_is_one_line_when_a_mujoco_env_is_made(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", BROKEN_GL], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("ERROR")]
    assert line.startswith(
        "ERROR cannot make Hopper-v5: MuJoCo cannot be imported with MUJOCO_GL=osmesa (AttributeError"
    )
    assert "libosmesa6" in line and "unset MUJOCO_GL" in line
