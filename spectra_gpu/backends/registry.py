"""The backend table and the dispatch rule.

explicit ``backend=`` argument > ``SPECTRA_GPU_BACKEND`` > automatic by priority. An explicitly asked backend
that cannot run this call raises :class:`BackendUnavailableError` naming why; the automatic choice falls back
to the torch reference and logs the reason once per (op, backend, reason).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import BackendUnavailableError
from . import cupy as _cupy
from . import torch as _torch
from . import triton as _triton
from .base import Backend

logger = logging.getLogger("spectra_gpu")

ENV_VAR = "SPECTRA_GPU_BACKEND"

REGISTRY: dict[str, Backend] = {be.name: be for be in (_torch.BACKEND, _triton.BACKEND, _cupy.BACKEND)}
_logged: set[tuple[str, str, str]] = set()


def register(backend: Backend) -> None:
    """Add (or replace) a backend of that name."""
    REGISTRY[backend.name] = backend


def _log_once(op: str, name: str, why: str) -> None:
    key = (op, name, why)
    if key not in _logged:
        _logged.add(key)
        logger.info("spectra_gpu: %s: backend %r not used (%s); falling back", op, name, why)


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend with (available, reason)."""
    return {name: be.is_available() for name, be in sorted(REGISTRY.items(), key=lambda kv: kv[1].priority)}


def resolve_name(backend: str | None) -> str | None:
    """The explicitly requested backend (argument, else SPECTRA_GPU_BACKEND), or None for automatic."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is not None and name not in REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend {name!r}: expected one of {sorted(REGISTRY)} (from "
            f"{'the backend argument' if backend is not None else ENV_VAR})")
    return name


def select(op: str, *args: Any, backend: str | None = None) -> Callable[..., Any]:
    """The implementation of ``op`` for these arguments under the dispatch rule."""
    name = resolve_name(backend)
    if name is not None:
        be = REGISTRY[name]
        ok, why = be.is_available()
        if ok:
            ok, why = be.supports(op, *args)
        if not ok or op not in be.ops:
            raise BackendUnavailableError(f"{op}: backend {name!r} rejected: {why or 'op not implemented'}")
        return be.ops[op]
    for be in sorted(REGISTRY.values(), key=lambda b: b.priority):
        if op not in be.ops:
            continue
        ok, why = be.is_available()
        if ok:
            ok, why = be.supports(op, *args)
        if ok:
            return be.ops[op]
        _log_once(op, be.name, why)
    return REGISTRY["torch"].ops[op]
