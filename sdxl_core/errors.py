"""The one exception type that reaches people: it carries a single line that names the fix."""


class UserError(Exception):
    """Bad input or a missing prerequisite. The CLI prints it as one line and exits with 2."""
