"""Hearth: a self-hosted AI server."""

__version__ = "0.1.0"
