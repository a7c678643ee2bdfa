"""Small shared helpers (standard library only)."""
