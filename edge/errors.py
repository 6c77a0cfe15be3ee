"""The exceptions edge-imagegen raises, each with a message a user can act on."""


class EdgeError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(EdgeError):
    """A config file or CLI flag is missing, malformed or out of range."""


class BundleError(EdgeError):
    """A model bundle file is missing or does not hold what was expected."""


class ValidationError(EdgeError):
    """A job field is missing, of the wrong type or outside its limit.

    ``field`` names the offending field so that front ends can report it.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class CancelledError(EdgeError):
    """A job was cancelled between denoising steps."""


class OutputError(EdgeError):
    """An image could not be written (disk full, permissions, ...)."""


class MemoryBudgetError(EdgeError):
    """The model does not fit in the memory this process may use, at any allowed tier."""
