"""One op through every stage: spec -> derivation -> plan -> lowering -> signature, in memory.

The record it returns is what emit, explain, the docs and bench all read; `build.py` renders a
whole catalog from it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import sympy

from . import functions
from .derivation import Derivation, derive
from .kernels import fuse, spell, undifferentiable, with_fallback
from .lower import STYLES, LoweredOp, lower
from .model import OpSpec, SpecError
from .naming import MODULE_STYLES, Style
from .optional import absent_sets, keep_optional, without
from .plan import plan
from .saving import read_output, save_function_values, save_steps
from .signature import Signature, backward_signature
from .spec import line_of_op


@dataclass(frozen=True)
class Built:
    """One op carried through every stage, kept for code, docs, explain and bench alike."""

    derivation: Derivation
    lowered: dict[str, LoweredOp]     # style -> lowered op
    signatures: dict[str, Signature]  # style -> the backward's arguments, reads, saved tensors and sizes
    # the op with optional inputs None, one per set of them (optional.py): (those inputs, the op without them)
    variants: tuple[tuple[tuple[str, ...], "Built"], ...] = ()
    # the compiled style's own lowering and signature, where it saves more than the contraction style
    # (saving.save_function_values); None: it prints the contraction style's
    fused: tuple[LoweredOp, Signature] | None = None

    @property
    def op(self) -> OpSpec:
        return self.derivation.op

    def printed(self, style: Style) -> tuple[LoweredOp, Signature]:
        """The lowered op and backward signature that a module style prints."""
        if style.compiled and self.fused is not None:
            return self.fused
        return self.lowered[style.lowering], self.signatures[style.lowering]


FUSED_STYLE = MODULE_STYLES["fused"]
DEFAULT_BUDGET = 60.0    # CPU seconds of derivation per op; the spec limits keep every accepted spec well inside


def build_op(op: OpSpec, styles=STYLES, budget: float | None = DEFAULT_BUDGET, stage: list[str] | None = None) -> Built:
    """Every stage for `op`; past `budget` seconds it stops with a SpecError (None: no limit, or the caller's,
    which then reads in `stage` where the time went)."""
    stage = ["deriving the gradients"] if stage is None else stage
    stage[0] = "deriving the gradients"
    with spec_errors(op), time_limit(op, budget, stage):
        derivation = read_output(derive(op))
        stage[0] = "fusing kernels"
        fused = save_steps(fuse(derivation)) if "contraction" in styles else None
        fallback = save_steps(fuse(derivation, differentiable_only=True)) \
            if fused is not None and undifferentiable(fused) else None
        if fallback is not None:
            fused = with_fallback(fused, fallback) or fallback
        stage[0] = "planning and lowering"
        spelled = spell(derivation) if "broadcast" in styles else None
        lowered = {style: lower(plan(fused if style == "contraction" else spelled), style) for style in styles}
        signatures = {style: backward_signature(derivation, lowered[style]) for style in styles}
        if fallback is not None and fused is not fallback:
            # the backward calls the kernel without a derivative where no graph is recorded, else the fallback,
            # with the same arguments (those of the call, when the fallback reads no more)
            below = lower(plan(fallback), "contraction")
            if set(backward_signature(derivation, below).arguments) <= set(signatures["contraction"].arguments):
                lowered["contraction"] = replace(lowered["contraction"], fallback=below)
            else:
                lowered["contraction"] = below
                signatures["contraction"] = backward_signature(derivation, below)
        variants = ()
        if op.optional:
            stage[0] = "deriving the op without its optional inputs"
            variants = tuple((absent, build_op(without(op, absent), styles, None, stage)) for absent in absent_sets(op))
            signatures = {style: keep_optional(op, signatures[style], [v.signatures[style] for _, v in variants])
                          for style in styles}
        compiled = save_function_values(fused) if "contraction" in styles else fused
        if compiled is fused and not any(v.fused for _, v in variants):
            return Built(derivation, lowered, signatures, variants)
        fused_lowered = lowered["contraction"] if compiled is fused else lower(plan(compiled), "contraction")
        signature = backward_signature(derivation, fused_lowered)
        if variants:
            signature = keep_optional(op, signature, [v.printed(FUSED_STYLE)[1] for _, v in variants])
        return Built(derivation, lowered, signatures, variants, (fused_lowered, signature))


class _OutOfTime(BaseException):
    """Raised by the timer inside SymPy: a BaseException, so that no `except Exception` there swallows it."""


@contextmanager
def time_limit(op: OpSpec, budget: float | None, stage: list[str]):
    """Stop the work inside after `budget` seconds of CPU time (the same on a loaded machine as on an idle one),
    with a SpecError that names the stage. A POSIX profiling timer interrupts SymPy wherever it is; without
    one (Windows, a thread other than the main one) there is no limit."""
    if budget is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        if armed:
            raise _OutOfTime

    armed = True
    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, budget)
    try:
        yield
    except _OutOfTime:
        raise _op_error(op, None, f"derivation exceeded {budget:g} s of CPU time (while {stage[0]}; the equation's "
                                  f"{_size(op)}); simplify it, or raise the budget with --budget or "
                                  f"[tool.derive] budget") from None
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


REDUCTIONS = (functions.Sum, functions.logsumexp, functions.softmax, functions.amax, functions.amin, functions.max_first)


def _size(op: OpSpec) -> str:
    """What makes an equation's derivation grow: reductions nested in reductions, and its operations."""
    return (f"reductions nest {_reduction_depth(op.rhs)} deep in {sympy.count_ops(op.rhs)} operations")


def _reduction_depth(expr: sympy.Basic) -> int:
    inner = max((_reduction_depth(arg) for arg in expr.args), default=0)
    return inner + isinstance(expr, REDUCTIONS)


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
