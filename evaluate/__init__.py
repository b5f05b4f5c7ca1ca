"""clips4.evaluate."""
