"""clips4.trainer."""
