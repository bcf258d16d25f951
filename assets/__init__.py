"""Dagster code location for sdpo-platform: thin wrappers that turn library calls into assets."""

from assets.definitions import defs

__all__ = ["defs"]
