"""The ``dsp`` command: ``dsp demo`` (and more subcommands as they land)."""

from dsp.cli.main import main

__all__ = ["main"]
