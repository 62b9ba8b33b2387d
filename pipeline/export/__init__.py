"""Exporting trained SAEs in the formats other tools read."""
