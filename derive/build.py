"""The whole pipeline for a catalog: spec -> derivation -> plan -> lowering -> module text.

Everything is rendered in memory; `files.py` decides what reaches the disk.
"""

from __future__ import annotations

from . import naming
from .emit import render_module
from .explain import DERIVATIONS_FILE, explain, render_derivations
from .lower import STYLES
from .model import Catalog
from .pipeline import build_op, spec_errors

DEFAULT_NAMESPACE = "derive"   # torch.library namespace of the generated custom ops
STYLE_DIRS = {"contraction": "", "broadcast": "broadcast/"}


def render_catalog(catalog: Catalog, styles=STYLES, spec_arg: str | None = None,
                   out_arg: str = "generated", namespace: str = DEFAULT_NAMESPACE) -> dict[str, str]:
    """Relative path -> file text for every generated file of the catalog."""
    if spec_arg is None:
        source, command = "the built-in catalog (derive/catalog/ops.toml)", "derive generate"
    else:
        source, command = spec_arg, f"derive generate --spec {spec_arg} --out {out_arg}"
    if namespace != DEFAULT_NAMESPACE:
        command += f" --namespace {namespace}"
    files = {}
    explanations = []
    for op in catalog.ops:
        built = build_op(op)     # every style: the derivations document shows both
        with spec_errors(op):
            for style in styles:
                path = STYLE_DIRS[style] + naming.module_file(op.name)
                files[path] = render_module(built.derivation, built.lowered[style], source, command, namespace,
                                             built.signatures[style])
                compile(files[path], path, "exec")    # a module that would not import is never written
            if "contraction" in styles:
                explanations.append(explain(built))
    if explanations:    # beside the contraction-style modules, once per catalog
        with spec_errors(None, catalog.path):
            files[DERIVATIONS_FILE] = render_derivations(explanations, source, command)
    return files
