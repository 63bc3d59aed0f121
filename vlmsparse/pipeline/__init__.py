"""pipeline layer (see ../shared/ARCHITECTURE.md)."""
