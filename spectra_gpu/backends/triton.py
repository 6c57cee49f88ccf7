"""Triton backend: filled in by the CUDA-path work (spectra_gpu.kernels). Registers nothing usable yet."""
