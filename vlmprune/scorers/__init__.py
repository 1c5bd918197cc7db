"""Scorers: one module per method family; each registers its classes by name on import.

Every module in this package is imported here, so adding a method is adding one file."""

import importlib
import pkgutil

from vlmprune.scorers.base import (
    EncoderInfo,
    Request,
    Scorer,
    Selection,
    Signals,
    available_methods,
    build_scorer,
    register,
    scorer_class,
    scorer_options,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "EncoderInfo",
    "Request",
    "Scorer",
    "Selection",
    "Signals",
    "available_methods",
    "build_scorer",
    "register",
    "scorer_class",
    "scorer_options",
]
