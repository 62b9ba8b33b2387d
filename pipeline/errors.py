"""The one exception type that reaches the user as a single readable line."""


class PipelineError(Exception):
    """Bad input or an environment problem: the CLI prints the message alone and exits non-zero."""
