"""The record every backend module fills in (``BACKEND``), read by the registry's dispatch rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backend:
    """name; priority (lower wins in automatic mode); is_available() -> (ok, reason if not), cached by the
    backend itself; ops: op stem -> implementation (``<stem>_<backend>``, the op's contract); supports(op, *args)
    -> (ok, reason) for one call's arguments (device, dtype, sizes)."""

    name: str
    priority: int
    is_available: Callable[[], tuple[bool, str]]
    ops: Mapping[str, Callable[..., Any]]
    supports: Callable[..., tuple[bool, str]]
