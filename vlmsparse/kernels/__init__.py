"""Kernels (layer 1 of docs/ARCHITECTURE.md): Triton kernels, their pure-torch twins, the native CPU loader."""
