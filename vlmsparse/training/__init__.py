"""training layer (see ../shared/ARCHITECTURE.md)."""
