"""clips4.pipeline."""
