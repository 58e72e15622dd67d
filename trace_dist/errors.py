"""User errors: something wrong with what the user gave us (a config, a path, a file, a flag), not a bug.

Raise a `UserError` subclass with a message that names the culprit. `trace-dist <command>` prints
`trace-dist <command>: <message>` on one line and exits 2 (`trace_dist.cli`); anything else is our
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the culprit. The CLI exits 2 on it."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, unsafe (more than tensors and plain data) or made for
    another model; the message names the file or the first mismatching parameter."""
