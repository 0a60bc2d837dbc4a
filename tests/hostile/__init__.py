"""Crafted hostile archives for the hostile-input tests: see builder.py."""
