"""Backend registry: explicit argument > SPECTRA_GPU_BACKEND > automatic (torch is the floor)."""

from .registry import REGISTRY, Backend, available_backends, register, select

__all__ = ["REGISTRY", "Backend", "available_backends", "register", "select"]
