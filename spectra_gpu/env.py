"""``python -m spectra_gpu.env``: versions, devices and backend availability, for bug reports."""

from __future__ import annotations

import importlib
import importlib.util
import platform


def report() -> str:
    import torch

    from ._version import __version__
    from .backends import available_backends

    lines = [f"spectra_gpu {__version__}", f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__} (threads {torch.get_num_threads()}, cuda available "
             f"{torch.cuda.is_available()})"]
    for mod in ("triton", "cupy", "torch_pruning", "transformers"):
        spec = importlib.util.find_spec(mod)
        ver = "not installed"
        if spec is not None:
            try:
                ver = getattr(importlib.import_module(mod), "__version__", "installed")
            except Exception as e:  # a broken install is worth reporting, not crashing on
                ver = f"import failed: {type(e).__name__}: {e}"
        lines.append(f"{mod} {ver}")
    for name, (ok, why) in available_backends().items():
        lines.append(f"backend {name}: {'available' if ok else 'unavailable (' + why + ')'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
