"""The one exception type the CLI turns into a clean message (no traceback) and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a config value, a missing file, an impossible request.

    Raised before expensive work wherever possible; the message names the field and what is allowed.
    """


def check(cond: bool, msg: str) -> None:
    """Raise :class:`UserError` with ``msg`` unless ``cond``."""
    if not cond:
        raise UserError(msg)
