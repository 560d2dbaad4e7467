"""MuJoCo's C warnings under ``import envs``: the one deprecation flood (HalfCheetah's
``settotalmass`` under MuJoCo 4.0) is dropped, every other MuJoCo warning and flowrl's own
warnings still show. Run in a fresh interpreter: what a user's console shows."""

from __future__ import annotations

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
