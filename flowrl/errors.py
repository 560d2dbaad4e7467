"""FlowRLError: a problem with the user's input or data, reported as one clear line by the CLI.

Anything else that escapes is a bug in flowrl and keeps its traceback.
"""


class FlowRLError(Exception):
    """Bad input (config, data, checkpoint, env output): the message names it and the fix."""


class ConfigError(FlowRLError, ValueError):
    """A bad experiment file, override or reward spec; the message names the key and the fix.

    Here, at the bottom of the house, so that any layer (the config loader, the reward registry)
    raises it without importing another."""


class Interrupted(Exception):
    """The run stopped at a safe point after SIGINT/SIGTERM; the message says how to resume."""
