"""FaultInjection: the TwoGoal task with a fault at a chosen step, to test worker recovery.

Use it to check that a setup (a cluster, a new collector) survives a crashing env: the
worker that runs it raises, or its whole process dies, at step ``fail_at_step`` (or at reset
``fail_at_reset``).
"""

from __future__ import annotations

import os
from typing import Literal

from envs.toy import TwoGoalEnv


class FaultInjectionEnv(TwoGoalEnv):
    """TwoGoal that fails at its ``fail_at_step``-th step (counted over its lifetime), or at its
    ``fail_at_reset``-th reset when that is given (None: resets never fail).

    mode: "raise" raises RuntimeError; "exit" ends the process at once (like a SIGKILL).
    once_marker: a file path; if given, only the first env (over all processes) to reach
    the step fails, and it creates the file, so a restarted worker runs cleanly.
    """

    def __init__(
        self,
        fail_at_step: int = 5,
        mode: Literal["raise", "exit"] = "raise",
        once_marker: str | None = None,
        fail_at_reset: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("raise", "exit"):
            raise ValueError(f"FaultInjectionEnv: mode must be 'raise' or 'exit', got {mode!r}")
        self.fail_at_step, self.mode, self.once_marker = fail_at_step, mode, once_marker
        self.fail_at_reset = fail_at_reset
        self._steps = self._resets = 0

    def _should_fail(self, count: int, fail_at: int | None) -> bool:
        if count != fail_at:
            return False
        if self.once_marker is None:
            return True
        try:
            os.close(os.open(self.once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _fail(self, where: str) -> None:
        if self.mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected fault at {where}")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._resets += 1
        if self._should_fail(self._resets, self.fail_at_reset):
            self._fail(f"reset {self._resets}")
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._steps += 1
        if self._should_fail(self._steps, self.fail_at_step):
            self._fail(f"step {self._steps}")
        return super().step(action)
