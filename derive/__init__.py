"""derive: turn the forward definition of a tensor op into readable, verified PyTorch backward code."""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it; imported on first use, so that `derive --help` loads no SymPy or torch
_EXPORTS = {"build_op": "build", "render_catalog": "build", "load_catalog": "spec", "parse_catalog": "spec",
            "SpecError": "errors", "op": "inmemory", "load": "inmemory"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'derive' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
