"""Progress bars for every long step: tqdm on stderr, off when stderr is not a TTY, when CI=true, or when
SPECTRA_GPU_PROGRESS=0 (logs stay clean), on when SPECTRA_GPU_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("SPECTRA_GPU_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "False", "")
    if os.environ.get("CI", "").lower() == "true":
        return False
    return sys.stderr.isatty()


def progress(it: Iterable[T], desc: str, total: int | None = None, **kw: Any) -> Iterable[T]:
    """``tqdm(it)`` when progress is enabled, else ``it`` unchanged."""
    if not enabled():
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, **kw)
