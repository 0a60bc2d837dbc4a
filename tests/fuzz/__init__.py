"""Fuzzing the archive readers: seeds, a structure-aware mutator, the properties every
reader must keep on any input, and a runner for long runs (``python -m tests.fuzz.reader``).
docs/FUZZING.md says how to run it and what it found."""
