"""FaultInjection: the TwoGoal task with a fault at a chosen step, to test worker recovery.

Use it to check that a setup (a cluster, a new collector) survives a crashing env: the
worker that runs it raises, or its whole process dies, at step ``fail_at_step``.
"""

from __future__ import annotations

import os
from typing import Literal

from envs.toy import TwoGoalEnv


class FaultInjectionEnv(TwoGoalEnv):
    """TwoGoal that fails at its ``fail_at_step``-th step (counted over its lifetime).

    mode: "raise" raises RuntimeError; "exit" ends the process at once (like a SIGKILL).
    once_marker: a file path; if given, only the first env (over all processes) to reach
    the step fails, and it creates the file, so a restarted worker runs cleanly.
    """

    def __init__(
        self, fail_at_step: int = 5, mode: Literal["raise", "exit"] = "raise", once_marker: str | None = None
    ) -> None:
        super().__init__()
        if mode not in ("raise", "exit"):
            raise ValueError(f"FaultInjectionEnv: mode must be 'raise' or 'exit', got {mode!r}")
        self.fail_at_step, self.mode, self.once_marker = fail_at_step, mode, once_marker
        self._steps = 0

    def _should_fail(self) -> bool:
        if self._steps != self.fail_at_step:
            return False
        if self.once_marker is None:
            return True
        try:
            os.close(os.open(self.once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def step(self, action):
        self._steps += 1
        if self._should_fail():
            if self.mode == "exit":
                os._exit(17)
            raise RuntimeError(f"injected fault at step {self._steps}")
        return super().step(action)
