"""The errors flowrl reports as one clear line (the CLI prints ``flowrl: error: ...``, exit 2).

FlowRLError and its subclasses are a problem with the user's input, data or env; anything else
that escapes is a bug in flowrl and keeps its traceback. The subclasses raised in more than one
layer live here, at the bottom of the house, so that every layer can raise and catch them
without importing the layer that used to define them.
"""


class FlowRLError(Exception):
    """Bad input (config, data, checkpoint, env output): the message names it and the fix."""


class ConfigError(FlowRLError, ValueError):
    """A bad experiment file, override or reward spec; the message names the key and the fix.

    Here, at the bottom of the house, so that any layer (the config loader, the reward registry)
    raises it without importing another."""


class Interrupted(Exception):
    """The run stopped at a safe point after SIGINT/SIGTERM; the message says how to resume."""


class CheckpointError(FlowRLError, ValueError):
    """A checkpoint that is missing or does not fit the experiment."""


class DatasetError(FlowRLError, ValueError):
    """A missing or malformed demonstration file; the message says how to fix it."""


class RewardError(FlowRLError):
    """A reward model failed or returned unusable scores; never replaced by a default score."""


class EnvError(FlowRLError):
    """An env raised in ``reset`` or ``step``; the message names the env, the call and the exception."""


def brief(exc: BaseException, limit: int = 100) -> str:
    """Exception type and the first line of its message, short enough for a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
