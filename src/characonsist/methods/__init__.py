"""Consistency methods, one file each, behind one interface (``base.Method``).

``METHODS`` maps a name to ``"module:Class"`` (imported on first use, so a method's dependencies load only
when it runs); ``get_method`` builds one from a name and options.
"""

from __future__ import annotations

import importlib

from .base import Method, Vanilla

METHODS: dict[str, str] = {
    "vanilla": "characonsist.methods.base:Vanilla",
    "characonsist": "characonsist.methods.characonsist:CharaConsist",
    "consistory": "characonsist.methods.consistory:ConsiStory",
    "storysync": "characonsist.methods.storysync:StorySync",
    "storydiffusion": "characonsist.methods.storydiffusion:StoryDiffusion",
}


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; a clear error lists the valid names."""
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}") from None
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method {name!r} is registered but not available in this build: {err}") from err


def get_method(method: str | Method, **options) -> Method:
    """A method instance from a registry name (or an instance, returned as is when no options are given)."""
    if isinstance(method, Method):
        if options:
            raise ValueError(f"options {sorted(options)} given with a method instance; set them on the instance")
        return method
    return method_class(method)(**options)


__all__ = ["METHODS", "Method", "Vanilla", "get_method", "method_class"]
