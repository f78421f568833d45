"""Segmentation methods: one file (or one package) per method, each registered with `@register_method`.

Every module and package in this folder is imported when the registry (`METHODS`) is first asked for a
method, so adding a method is adding its file: nothing to list. Helper modules (base, prompts, tokens,
maps, attribution, crf) register nothing and are imported too.
"""

import importlib
import pkgutil

from methods.base import METHODS, ClassQuery, Method, Param, Prediction, TrainSetting, register_method


def discover() -> list[str]:
    """Import every module and package of `methods/` (once); returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in names:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except Exception as err:  # name the file: the registry is incomplete without it
            raise ImportError(f"method module methods/{name} failed to import: {type(err).__name__}: {err}") from err
    return names


__all__ = ["METHODS", "ClassQuery", "Method", "Param", "Prediction", "TrainSetting", "discover",
           "register_method"]
