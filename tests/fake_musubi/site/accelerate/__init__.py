"""Fake ``accelerate`` for tests: only ``python -m accelerate.commands.launch`` exists."""

__version__ = "0.0-fake"
