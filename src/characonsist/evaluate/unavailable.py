"""The one error of the evaluation's models: a metric's model or package cannot be had. Every loader raises it
(``models``, ``dreamsim``, ``facenet``, ``retinaface``, ``checkpoints``); ``characonsist eval`` prints its message
and leaves that metric out."""

from __future__ import annotations


class ModelUnavailable(RuntimeError):
    """A metric's model or package cannot be had; the message says what to install or pass."""


__all__ = ["ModelUnavailable"]
