"""The one exception type users see: a one-line message that says what to change."""


class VlplanError(ValueError):
    """Bad input or an impossible combination. The CLI prints `error: <message>` and exits with code 2."""
