"""``python -m spectra_gpu.env`` (or ``spectra env``): versions, devices and backend availability, for bug reports.

Never raises for a missing or broken optional dependency: each probe turns failures into a reason string.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform


def _version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "not installed"
    try:
        return str(getattr(importlib.import_module(mod), "__version__", "installed"))
    except Exception as e:  # a broken install is worth reporting, not crashing on
        return f"import failed: {type(e).__name__}: {e}"


def cpu() -> dict[str, str | None]:
    """The host CPU as it bears on float results: its model name (Linux /proc/cpuinfo, else
    ``platform.processor()``; None when neither says) and the instruction set torch's CPU kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX2 / AVX512). BLAS libraries such as MKL pick their
    kernels, and so their summation order, by CPU, so runs of the same code at 1 thread on different CPUs may
    differ in the last bits."""
    import torch

    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    return {"model": model or platform.processor() or None, "capability": torch.backends.cpu.get_cpu_capability()}


def _torch_devices() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, threads "
             f"{torch.get_num_threads()}, cuda available {torch.cuda.is_available()})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    return lines


def _cupy_line() -> str:
    ver = _version("cupy")
    if ver == "not installed" or ver.startswith("import failed"):
        return f"cupy {ver}"
    try:
        import cupy

        if not cupy.is_available():
            return f"cupy {ver} (no usable CUDA device)"
        rt = cupy.cuda.runtime.runtimeGetVersion()
        return f"cupy {ver} (CUDA runtime {rt // 1000}.{rt % 1000 // 10}, {cupy.cuda.runtime.getDeviceCount()} devices)"
    except Exception as e:
        return f"cupy {ver} (device probe failed: {type(e).__name__}: {e})"


def report() -> str:
    from ._version import __version__
    from .backends import REGISTRY, available_backends
    from .backends.registry import ENV_VAR

    lines = [f"spectra_gpu {__version__}", f"python {platform.python_version()} on {platform.platform()}"]
    host = cpu()
    lines.append(f"cpu {host['model'] or 'unknown'} (torch kernels: {host['capability']})")
    lines += _torch_devices()
    lines.append(f"triton {_version('triton')} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
    lines.append(_cupy_line())
    for mod in ("numpy", "scipy", "torch_pruning", "transformers"):
        lines.append(f"{mod} {_version(mod)}")
    lines.append(f"{ENV_VAR}={os.environ.get(ENV_VAR, 'unset')}")
    for name, (ok, why) in available_backends().items():
        be = REGISTRY[name]
        state = "available" if ok else f"unavailable ({why})"
        if ok and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            state += " in the CPU interpreter (for tests; chosen only when asked for)"
        lines.append(f"backend {name} (auto priority {be.priority}; ops {', '.join(sorted(be.ops))}): {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
