"""Exception and warning types raised by spectra_gpu."""


class SpectraError(Exception):
    """Base class of the errors spectra_gpu raises on its own account."""


class BackendUnavailableError(SpectraError, RuntimeError):
    """An explicitly requested backend cannot run this call (names the reason)."""


class NotPSDError(SpectraError, ValueError):
    """A matrix that must be symmetric positive definite is not, even after the jitter ladder."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance; the best iterate is returned."""


class NumericalWarning(UserWarning):
    """A numerical safeguard fired (jitter added, graph repaired, precision lost)."""
