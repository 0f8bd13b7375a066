"""The whole pipeline for a catalog: spec -> derivation -> plan -> lowering -> module text.

Everything is rendered in memory; `files.py` decides what reaches the disk.
"""

from __future__ import annotations

from collections.abc import Callable

from . import naming
from .emit import render_module
from .explain import explain, render_derivations
from .model import Catalog
from .naming import STYLE_DIRS  # noqa: F401 (re-exported: callers import it from here)
from .naming import ALL_STYLES, DEFAULT_NAMESPACE, MODULE_STYLES, STYLES
from .pipeline import DEFAULT_BUDGET, Built, build_op, spec_errors, time_limit
from .stamp import header, planned, stamped


def render_catalog(catalog: Catalog, styles=ALL_STYLES, spec_arg: str | None = None,
                   out_arg: str = "generated", namespace: str = DEFAULT_NAMESPACE,
                   budget: float | None = DEFAULT_BUDGET,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, str]:
    """Relative path -> file text for every generated file of the catalog, each stamped with its inputs;
    `progress(op, number, total)` is called as each op begins."""
    source, command = header(spec_arg, out_arg, namespace)
    inputs = planned({op.name: op.digest for op in catalog.ops}, styles, source, command, namespace)
    files = {}
    explanations = []
    for number, op in enumerate(catalog.ops, 1):
        if progress is not None:
            progress(op.name, number, len(catalog.ops))
        stage = [""]     # where the time goes, for the message when it runs out
        with spec_errors(op), time_limit(op, budget, stage):
            built = build_op(op, STYLES, None, stage)     # every style: the derivations document shows both
            stage[0] = "rendering the modules and the derivations document"
            for style in styles:
                path, files[path] = module_file(built, style, source, command, namespace, inputs)
            if "contraction" in styles:
                explanations.append(explain(built))
    if explanations:    # beside the contraction-style modules, once per catalog
        document = naming.derivations_file(namespace)
        with spec_errors(None, catalog.path):
            files[document] = stamped(document, render_derivations(explanations, source, command), inputs[document])
    return files


def module_file(built: Built, style: str, source: str, command: str, namespace: str,
                inputs: dict[str, str]) -> tuple[str, str]:
    """The relative path and stamped text of one op's module in one style (`inputs`: `planned`'s hashes)."""
    printed = MODULE_STYLES[style]      # (the fused style prints the contraction style's lowering)
    path = printed.directory + naming.module_file(built.op.name)
    lowering = printed.lowering
    variants = tuple((absent, v.derivation, v.lowered[lowering], v.signatures[lowering]) for absent, v in built.variants)
    text = stamped(path, render_module(built.derivation, built.lowered[lowering], source, command, namespace,
                                       built.signatures[lowering], variants, printed), inputs[path])
    compile(text, path, "exec")    # a module that would not import is never written
    return path, text
