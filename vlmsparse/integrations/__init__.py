"""integrations layer (see ../shared/ARCHITECTURE.md)."""
