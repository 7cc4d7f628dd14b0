"""Errors that reach the operator: one line of text and the exit status to use. Nothing else."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

# Exit statuses of `ffrtmp run` for failures of the wrapper itself (the shell's conventions).
RUN_WRAPPER_ERROR = 125
RUN_CANNOT_EXECUTE = 126
RUN_NOT_FOUND = 127
# Exit statuses of the other commands.
REFUSED = 1
USAGE = 2


class FfrtmpError(Exception):
    """A failure the operator must read: `str(err)` is one line, `err.exit_code` the status."""

    def __init__(self, message: str, exit_code: int = REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(FfrtmpError):
    """Bad input: an option, a job id, a PID. The CLI maps it to the command's usage status."""

    def __init__(self, message: str) -> None:
        super().__init__(message, USAGE)


class StateError(FfrtmpError):
    """The state directory cannot be written (read-only, missing, full): the record fails, not the job."""
