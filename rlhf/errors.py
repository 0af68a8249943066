"""The one exception the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment (bad file, missing model, port in use).

    The message must be one line that says what is wrong and, where it helps, what to do.
    """
