"""Modules (layer 3 of docs/ARCHITECTURE.md): ``SparseLoRALinear``, ``SparseLinear``."""
