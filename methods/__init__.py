"""Segmentation methods: one file per method, each registered with `@register_method`."""

from methods.base import METHODS, ClassQuery, Method, Param, Prediction, register_method
from methods import attn2mask, baseline, daam, iseg, ovam  # noqa: F401  (registers)
from methods import compare  # noqa: F401  (after the methods it compares)

__all__ = ["METHODS", "ClassQuery", "Method", "Param", "Prediction", "register_method"]
