"""Optional inputs: an input the spec declares `optional = { b = 0 }` may be None.

The rule, for every spec: an op called with an optional input None is the op whose equation has that
input replaced by the value the spec declares for it (its default), everywhere it is read. The op
without it is a spec of its own, the *variant*, derived by the same pipeline from the substituted
equation: `y[n, m] = sum(x[n, k] * w[k, m], k) + b[m]` with b = 0 is `y[n, m] = sum(x[n, k] * w[k, m], k)`,
whose forward is `x @ w`; `layer_norm`'s w = 1 drops the product. Its gradients are those of the other
inputs at that value (differentiating and substituting commute), and an absent input has no gradient.

The generated module keeps one public signature (`linear(x, w, None)`): each entry point hands a call
with None inputs to the variant's functions, generated beside the op's own (emit.py).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import sympy

from typing import TYPE_CHECKING

from .model import OpSpec, SpecError, scalar_symbol, tensor_symbol

if TYPE_CHECKING:
    from .signature import Signature


def absent_sets(op: OpSpec) -> tuple[tuple[str, ...], ...]:
    """Every non-empty set of optional inputs that may be None together, most inputs first, in input order."""
    names = op.optional_names
    return tuple(subset for count in range(len(names), 0, -1) for subset in itertools.combinations(names, count))


def substitute(expr: sympy.Expr, values: dict[str, float]) -> sympy.Expr:
    """`expr` with every read of the named tensors replaced by their value."""
    for name, value in values.items():
        number = sympy.Integer(value) if float(value).is_integer() else sympy.Float(value)
        base, scalar = tensor_symbol(name), scalar_symbol(name)
        expr = expr.replace(lambda e: isinstance(e, sympy.Indexed) and e.base == base, lambda e: number)
        expr = expr.xreplace({scalar: number})
    return expr


def without(op: OpSpec, absent: tuple[str, ...]) -> OpSpec:
    """The op with the inputs `absent` None: each replaced by its declared value, and no longer an input."""
    defaults = dict(op.optional)
    values = {name: defaults[name] for name in absent}
    kept = tuple(t for t in op.inputs if t.name not in values)
    return replace(
        op, inputs=kept, rhs=substitute(op.rhs, values), optional=(), layer=None,
        equation=f"{op.equation}  (with {', '.join(f'{n} = {_number(v)}' for n, v in values.items())})",
        pads=tuple(p for p in op.pads if p[0] not in values),
        affine_reads=tuple(r for r in op.affine_reads if r.access.base.label.name not in values),
        ranges=tuple(r for r in op.ranges if r[0] not in values))


def keep_optional(op: OpSpec, signature: Signature, variants: list[Signature]) -> Signature:
    """The op's backward signature with the Function keeping what the variants' backwards read too, so that it
    can hand a call with None inputs on. An optional input none of them reads the values of is not kept: the
    backward reads it only to tell it from None (and for its shape, in its shape contract), so the Function
    keeps its shape, None when it is absent, and hands the backward a stand-in of that shape holding no data
    (or None). A variant must save the forward values the op saves (its result, which the op's backward may
    lack, the entry point computes for it)."""
    for variant in variants:
        extra = [name for name in variant.arguments if name not in signature.arguments and name != op.output]
        if extra or variant.values != signature.values:
            missing = extra[0] if extra else ", ".join(variant.values)
            raise SpecError(f"with an optional input None the backward reuses {missing}, which the op's own "
                            f"backward does not: declare the input required, or write the equation so that "
                            f"both reuse the same forward values", path=op.source, op=op.name)
    wanted = set(signature.kept) | {name for v in variants for name in v.kept}
    shapes = set(signature.shaped) | set(op.optional_names) | {name for v in variants for name in v.shaped}
    kept = tuple(t.name for t in op.inputs if t.name in wanted)
    shaped = tuple(t.name for t in op.inputs if t.name in shapes and t.name not in wanted)
    return replace(signature, kept=kept, shaped=shaped, saved=kept + signature.saved[len(signature.kept):])


def variant_name(function: str, absent: tuple[str, ...]) -> str:
    """The private function of a variant: `_linear_forward_without_b`."""
    return f"_{function}_without_{'_'.join(absent)}"


def condition(absent: tuple[str, ...]) -> str:
    """When a call goes to the variant: `b is None`, `w is None and b is None`."""
    return " and ".join(f"{name} is None" for name in absent)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)

