"""The one exception type for bad user input: the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input (file, flag, value). The message names it and says what to do."""
