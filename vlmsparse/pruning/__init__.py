"""pruning layer (see ../shared/ARCHITECTURE.md)."""
