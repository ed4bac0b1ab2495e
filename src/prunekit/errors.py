"""Errors prunekit raises on bad input. Each names the bad value and what is allowed."""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class UnknownMethodError(PrunekitError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(PrunekitError, TypeError):
    """A model class no adapter knows, or a stage the model's family does not have."""


class SignalUnavailableError(PrunekitError, RuntimeError):
    """A signal a method needs cannot be computed for this model or configuration."""
