"""Triton kernels of the CUDA path (imported lazily by spectra_gpu.backends.triton; needs triton)."""
