"""Benchmark fixtures: machine/version/sha metadata in the JSON; SMALL shapes run in CI (benchmark disabled)."""

import os
import platform
import subprocess

import pytest
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    import spectra_gpu

    machine_info["spectra_gpu"] = spectra_gpu.__version__
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["processor"] = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        machine_info["cpu_model"] = names[0] if names else ""
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
        machine_info["git_sha"] = sha
    except OSError:
        pass
    machine_info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
