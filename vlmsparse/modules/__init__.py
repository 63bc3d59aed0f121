"""modules layer (see ../shared/ARCHITECTURE.md)."""
