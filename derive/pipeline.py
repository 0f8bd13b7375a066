"""One op through every stage: spec -> derivation -> plan -> lowering -> signature, in memory.

The record it returns is what emit, explain, the docs and bench all read; `build.py` renders a
whole catalog from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from .derivation import Derivation, derive
from .kernels import fuse
from .lower import STYLES, LoweredOp, lower
from .model import OpSpec, SpecError
from .plan import plan
from .signature import Signature, backward_signature
from .spec import line_of_op


@dataclass(frozen=True)
class Built:
    """One op carried through every stage, kept for code, docs, explain and bench alike."""

    derivation: Derivation
    lowered: dict[str, LoweredOp]     # style -> lowered op
    signatures: dict[str, Signature]  # style -> the backward's arguments, reads, saved tensors and sizes

    @property
    def op(self) -> OpSpec:
        return self.derivation.op


def build_op(op: OpSpec, styles=STYLES) -> Built:
    with spec_errors(op):
        derivation = derive(op)
        fused = fuse(derivation) if "contraction" in styles else None
        lowered = {style: lower(plan(fused if style == "contraction" else derivation), style) for style in styles}
        return Built(derivation, lowered, {style: backward_signature(derivation, lowered[style]) for style in styles})


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
