"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class TallyError(Exception):
    """A failure the user can act on; its message is one line, with the fix where there is one."""

    exit_code = 2
