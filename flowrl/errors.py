"""FlowRLError: a problem with the user's input or data, reported as one clear line by the CLI.

Anything else that escapes is a bug in flowrl and keeps its traceback.
"""


class FlowRLError(Exception):
    """Bad input (config, data, checkpoint, env output): the message names it and the fix."""


class Interrupted(Exception):
    """The run stopped at a safe point after SIGINT/SIGTERM; the message says how to resume."""
