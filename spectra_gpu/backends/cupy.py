"""CuPy backend: filled in by the CUDA-path work. Registers nothing usable yet."""
