"""Exports of a checkpoint for other tools: a remote-code folder that plain `transformers` loads."""

from .remote_code import export_remote_code, modelling_sources

__all__ = ["export_remote_code", "modelling_sources"]
