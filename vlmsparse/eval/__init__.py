"""eval layer (see ../shared/ARCHITECTURE.md)."""
