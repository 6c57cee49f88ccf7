"""Named fault points, so tests can kill a run at a chosen phase and check that it resumes.

A run reaches :func:`point` at each named phase: ``capture`` (a round's statistics captured, nothing scored
yet), ``score`` (one group scored), ``round`` (a round's checkpoint written), ``finetune`` (one fine-tune
optimiser step taken, its epoch not finished) and ``write_model`` (the model folder written, report.json not
yet). With the environment variable ``SPECTRA_KILL_AT=<phase>`` (or ``<phase>:<n>``, the n-th time, 1-based)
the process kills itself there with SIGKILL, as a crash or an out-of-memory kill would; without it a point
costs one dictionary lookup. Nothing else reads the variable.
"""

from __future__ import annotations

import os
import signal

PHASES = ("capture", "score", "round", "finetune", "write_model")
ENV = "SPECTRA_KILL_AT"
_seen: dict[str, int] = {}


def point(phase: str) -> None:
    """Kill this process with SIGKILL if ``SPECTRA_KILL_AT`` names ``phase`` (at its n-th visit)."""
    want = os.environ.get(ENV)
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != phase:
        return
    _seen[phase] = _seen.get(phase, 0) + 1
    if _seen[phase] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "PHASES", "point"]
