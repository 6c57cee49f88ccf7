"""Triton kernels, one module per op stem (``kernels/<stem>.py`` holds ``<stem>_triton``); imported only by the
triton backend, on first use."""
