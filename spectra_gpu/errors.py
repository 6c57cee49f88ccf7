"""Exception and warning types raised by spectra_gpu, and the one helper that issues its numerical warnings."""

from __future__ import annotations

import sys
import warnings


class SpectraError(Exception):
    """Base class of the errors spectra_gpu raises on its own account."""


class BackendUnavailableError(SpectraError, RuntimeError):
    """An explicitly requested backend cannot run this call (names the reason)."""


class NotPSDError(SpectraError, ValueError):
    """A matrix that must be symmetric positive definite is not, even after the jitter ladder."""


class NumericalWarning(UserWarning):
    """A numerical safeguard fired (jitter added, graph repaired, preconditioner damped, bandwidth defaulted)."""


class ConvergenceWarning(NumericalWarning):
    """An iterative solver stopped before reaching its tolerance; the best iterate is returned."""


def warn_numerical(message: str, category: type[NumericalWarning] = NumericalWarning) -> None:
    """Issue ``category`` for a numerical repair, attributed to the first caller outside spectra_gpu (so the
    warning points at the user's line however deep inside the package the repair happened)."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] == "spectra_gpu":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
