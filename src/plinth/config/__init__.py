"""Typed, self-documenting configuration: schema, presets, layered loading with provenance."""

from plinth.config.load import Resolved, load_config
from plinth.config.schema import Config

__all__ = ["Config", "Resolved", "load_config"]
