"""Continual-segmentation methods, one unit each (`eir.methods.base.Method`).

Every module of this package is imported here, and each concrete `Method` subclass registers
itself by its `name`: adding a method is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from eir.methods.base import LossInputs, Method, StepShape

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: Mapping[str, type[Method]] = Method.registry
METHOD_NAMES: tuple[str, ...] = tuple(sorted(METHODS))


def method_class(name: str) -> type[Method]:
    """The method called `name`; an unknown name is a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def build_method(name: str, options: Mapping[str, Any]) -> Method:
    """The method `name` with its options (the values of its `option_keys`)."""
    return method_class(name)(options)


__all__ = ["METHODS", "METHOD_NAMES", "LossInputs", "Method", "StepShape", "build_method", "method_class"]
