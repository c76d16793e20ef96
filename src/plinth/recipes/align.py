"""`plinth align` (being written)."""
