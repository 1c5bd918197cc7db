"""Model-family adapters; each module registers its adapter on import."""

import importlib
import pkgutil

from vlmprune.adapters.base import Adapter, find_adapter, register_adapter, supported_models

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "vit"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Adapter", "find_adapter", "register_adapter", "supported_models"]
