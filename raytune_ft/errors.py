"""User-facing errors: one line, names the field or file, exit code 2 (1 for a failed training run,
3 for a retention floor not met), no traceback. Imports nothing heavy: every command line reaches this module."""


class UserError(Exception):
    """A problem with what the user gave us (recipe, data, model, paths).

    The CLI prints ``str(error)`` alone and exits with ``exit_code``; nothing else is shown.
    """

    exit_code = 2

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):  # raised in a Ray task or worker, it is pickled back to the driver
        return type(self), (self.where, self.message)


class RecipeError(UserError):
    """One or more recipe fields are invalid; ``problems`` holds (dotted_path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{path}: {message}" if path else message for path, message in problems]
        super().__init__(source, "; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))

    def __reduce__(self):
        return type(self), (self.where, self.problems)


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind a remote failure (a Ray task, a Ray Data function, a Train worker),
    following ``cause`` and ``__cause__`` links; None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


class Diverged(UserError):
    """The loss became NaN or infinite: the run stops and exports nothing (exit code 1)."""

    exit_code = 1

    def __init__(self, step: int, epoch: int, loss: float):
        self.step, self.epoch, self.loss = step, epoch, loss
        super().__init__("", f"training diverged at step {step} (epoch {epoch}): the loss is {loss}; nothing was exported "
                             "(lower train.lr, or look at the data)")

    def __reduce__(self):
        return type(self), (self.step, self.epoch, self.loss)


class FloorNotMet(UserError):
    """No setting reached ``retention.floor`` within its budget: the run's outputs say how close it
    came, and no model is exported (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str):
        super().__init__("retention.floor", message)

    def __reduce__(self):
        return type(self), (self.message,)


class TrainingFailed(Exception):
    """Training failed on the workers; the message is the workers' first error, one line."""

    exit_code = 1

    def __init__(self, error: Exception):
        failures = getattr(error, "worker_failures", None) or {}
        first = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
        cause = getattr(first, "cause", None) or first
        user_error = find_user_error(first)
        if user_error is not None:
            self.exit_code = user_error.exit_code
            message = f"{user_error.where}: {user_error.message}" if user_error.where else user_error.message
        else:
            lines = [line for line in str(cause).strip().splitlines() if line.strip()]
            message = f"training failed: {type(cause).__name__}: {lines[-1] if lines else ''}"
        super().__init__(message)
