"""User-facing errors: one line, names the field or file, exit code 2, no traceback."""


class UserError(Exception):
    """A problem with what the user gave us (recipe, data, model, paths).

    The CLI prints ``str(error)`` alone and exits with ``exit_code``; nothing else is shown.
    """

    exit_code = 2

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(UserError):
    """One or more recipe fields are invalid; ``problems`` holds (dotted_path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{path}: {message}" if path else message for path, message in problems]
        super().__init__(source, "; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))
