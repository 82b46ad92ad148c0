"""The one exception type for bad user input; the CLI prints its message and exits 2."""


class KscopeError(ValueError):
    """A user-facing error: bad input, unknown layer, empty fact set..."""
