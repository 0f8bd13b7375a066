"""SymPy's TorchPrinter, imported without importing torch.

`sympy.printing.pytorch` imports torch when it is imported, only to default the printer's `torch_version`
setting, which derive never reads. Rendering code needs SymPy, not torch (seconds of import time), so the
printer's module is imported with torch hidden, and torch is left importable as before.
"""

from __future__ import annotations

import sys

if "torch" in sys.modules or "sympy.printing.pytorch" in sys.modules:
    from sympy.printing.pytorch import TorchPrinter
else:
    sys.modules["torch"] = None     # SymPy's import_module("torch") then gives None, as without torch installed
    try:
        from sympy.printing.pytorch import TorchPrinter
    finally:
        del sys.modules["torch"]

__all__ = ["TorchPrinter"]
