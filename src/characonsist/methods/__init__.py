"""Consistency methods, one file each, behind one interface (``base.Method``).

``METHODS`` maps a name to its class; ``get_method`` builds one from a name and options.
"""

from __future__ import annotations

from .base import Method, Vanilla
from .characonsist import CharaConsist

METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "characonsist": CharaConsist,
}


def get_method(method: str | Method, **options) -> Method:
    """A method instance from a registry name (or an instance, returned as is when no options are given)."""
    if isinstance(method, Method):
        if options:
            raise ValueError(f"options {sorted(options)} given with a method instance; set them on the instance")
        return method
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}") from None
    return cls(**options)


__all__ = ["METHODS", "CharaConsist", "Method", "Vanilla", "get_method"]
