"""derive: turn the forward definition of a tensor op into readable, verified PyTorch backward code."""

from .build import build_op, render_catalog
from .model import SpecError
from .spec import load_catalog, parse_catalog

__all__ = ["build_op", "render_catalog", "load_catalog", "parse_catalog", "SpecError"]
