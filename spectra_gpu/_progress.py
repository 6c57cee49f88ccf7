"""Progress bars for every long step: tqdm on stderr. On or off, first match wins: ``forced`` (the CLI's
``--progress`` / ``--quiet``), SPECTRA_GPU_PROGRESS=1 / 0, off when CI=true, else on only when stderr is a
terminal (logs stay clean)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_forced: list[bool] = []  # a stack: ``forced`` blocks nest


@contextlib.contextmanager
def forced(on: bool | None) -> Iterator[None]:
    """Inside the block bars are on (True) or off (False) whatever the environment; None changes nothing."""
    if on is None:
        yield
        return
    _forced.append(bool(on))
    try:
        yield
    finally:
        _forced.pop()


def enabled() -> bool:
    if _forced:
        return _forced[-1]
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

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)


class Bar:
    """A bar advanced by hand whose total may be revised (e.g. the planned number of rounds), or nothing
    when progress is disabled. ``total`` is always kept, so callers and tests can read it."""

    def __init__(self, total: int, desc: str, unit: str = "it") -> None:
        self.total, self.n = int(total), 0
        self._bar: Any = None
        if enabled():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                             file=sys.stderr)

    def set_total(self, total: int) -> None:
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["Bar", "enabled", "forced", "progress"]
