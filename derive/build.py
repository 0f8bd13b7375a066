"""The whole pipeline for a catalog: spec -> derivation -> plan -> lowering -> module text.

Everything is rendered in memory; `files.py` decides what reaches the disk.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from . import naming
from .derivation import Derivation, derive
from .emit import render_module
from .explain import explain, render_derivations
from .lower import LoweredOp, lower
from .model import Catalog, OpSpec, SpecError
from .naming import DEFAULT_NAMESPACE, DERIVATIONS_FILE, STYLE_DIRS, STYLES
from .plan import plan
from .spec import line_of_op
from .stamp import header, planned, stamped


@dataclass(frozen=True)
class Built:
    """One op carried through every stage, kept for code, docs, explain and bench alike."""

    derivation: Derivation
    lowered: dict[str, LoweredOp]     # style -> lowered op

    @property
    def op(self) -> OpSpec:
        return self.derivation.op


def build_op(op: OpSpec, styles=STYLES) -> Built:
    with spec_errors(op):
        derivation = derive(op)
        return Built(derivation, {style: lower(plan(derivation, fuse=style == "contraction"), style)
                                  for style in styles})


@contextmanager
def spec_errors(op: OpSpec | None, path: str | None = None):
    """Report a failure of the later stages as a SpecError naming the op: the user gets one line."""
    try:
        yield
    except SpecError:
        raise
    except RecursionError:
        raise _op_error(op, path, "the equation is too complex to derive (recursion limit reached)") from None
    except ValueError as exc:
        raise _op_error(op, path, f"derive cannot handle this equation: {exc}") from exc
    except Exception as exc:
        raise _op_error(op, path, f"internal error while generating ({type(exc).__name__}: {exc}); "
                                  f"--debug shows the traceback") from exc


def _op_error(op: OpSpec | None, path: str | None, message: str) -> SpecError:
    message = " ".join(message.split())    # one line, of a readable length
    if len(message) > 400:
        message = message[:397] + "..."
    if op is None:
        return SpecError(message, path=path or "<spec>")
    return SpecError(message, path=op.source, line=line_of_op(op.source, op.name, "equation"), op=op.name)


def render_catalog(catalog: Catalog, styles=STYLES, spec_arg: str | None = None,
                   out_arg: str = "generated", namespace: str = DEFAULT_NAMESPACE) -> dict[str, str]:
    """Relative path -> file text for every generated file of the catalog, each stamped with its inputs."""
    source, command = header(spec_arg, out_arg, namespace)
    inputs = planned({op.name: op.digest for op in catalog.ops}, styles, source, command, namespace)
    files = {}
    explanations = []
    for op in catalog.ops:
        built = build_op(op)     # every style: the derivations document shows both
        with spec_errors(op):
            for style in styles:
                path = STYLE_DIRS[style] + naming.module_file(op.name)
                files[path] = stamped(path, render_module(built.derivation, built.lowered[style], source, command,
                                                          namespace), inputs[path])
                compile(files[path], path, "exec")    # a module that would not import is never written
            if "contraction" in styles:
                explanations.append(explain(built))
    if explanations:    # beside the contraction-style modules, once per catalog
        with spec_errors(None, catalog.path):
            files[DERIVATIONS_FILE] = stamped(DERIVATIONS_FILE, render_derivations(explanations, source, command),
                                              inputs[DERIVATIONS_FILE])
    return files
