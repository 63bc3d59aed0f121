"""kernels layer (see ../shared/ARCHITECTURE.md)."""
