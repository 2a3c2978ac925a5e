"""The side-by-side benchmark (DESIGN §6): ``turbomoe bench`` / ``python -m turbomoe.bench``."""

from turbomoe.bench.cli import main

__all__ = ["main"]
