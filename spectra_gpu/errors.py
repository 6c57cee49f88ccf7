"""Exception and warning types raised by spectra_gpu, and the one helper that issues its numerical warnings."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


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


def repair_kind(message: str) -> str:
    """A numerical warning's message with its numbers replaced by '#': the kind of repair, for counting."""
    return re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", message)[:200]


@contextmanager
def counted_repairs(counts: dict[str, int]) -> Iterator[None]:
    """Inside the block every ``NumericalWarning`` is counted into ``counts`` ({repair_kind: count}, updated
    in place as it happens) instead of shown; other warnings are shown as usual. For callers that summarise
    repeated repairs once (a pruning run: one line, and the counts in its checkpoints and report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", NumericalWarning)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, NumericalWarning):
                key = repair_kind(str(message))
                counts[key] = counts.get(key, 0) + 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
