"""Errors raised for bad input: one clear message naming the problem, never a deep traceback."""

from __future__ import annotations


class EGPSError(ValueError):
    """Bad input or an impossible request; the message says what to change."""


class ModelFileError(EGPSError):
    """A model file (Markov JSON, GGUF, checkpoint) is missing or malformed."""


class NumericalError(EGPSError):
    """A model produced NaN or infinite logits, or probabilities that are not a distribution."""


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise if it is not a finite number > 0."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise EGPSError(f"alpha must be a number, got {alpha!r}") from None
    if not value > 0 or value == float("inf"):
        raise EGPSError(f"alpha must be finite and > 0, got {alpha!r}")
    return value


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an integer >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EGPSError(f"{name} must be an integer >= 1, got {value!r}")
    return value
