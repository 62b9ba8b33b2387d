"""The one exception type that reaches the user as a single readable line."""


class PipelineError(Exception):
    """Bad input or an environment problem: the CLI prints the message alone and exits non-zero."""


class DamagedFile(PipelineError):
    """A file of ours that exists but cannot be read back (truncated, or bytes changed)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or ''."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
