"""Stage 3, derivation -> shape plan: which tensors each term multiplies and how they line up.

A term `c * sum over s of prod(factors)` becomes a `TermPlan`: its operands (each a
tensor with an index tuple), the aligned index order in which the operands broadcast
against each other, and the indices summed away. The order is the op's own index
order (first appearance in the inputs), which is exactly how the seed lines tensors up:
for linear, grad_y[n, m] and w[k, m] meet in (n, k, m).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import sympy

from .derivation import Derivation, Term, integer_inputs, is_tied_step, step_as_sign, tensor_symbols
from .functions import (atoms_of, canonical, fold_piecewise, free_indices, in_range, integers_as_float, is_affine_read,
                        window, window_dims)
from . import naming
from .model import OpSpec, exact_fraction, scalar_symbol, size_symbol, tensor_symbol
from .naming import BATCH
from .saving import SavedValue


@dataclass(frozen=True)
class Operand:
    """A tensor a term multiplies: an access such as w[k, m], or an elementwise expression of accesses."""

    expr: sympy.Expr            # the SymPy expression it evaluates
    indices: tuple[str, ...]    # its dims, in the op's index order (() for a scalar tensor)


@dataclass(frozen=True)
class TermPlan:
    """One term, lined up for broadcasting."""

    coefficient: sympy.Expr           # index-free scalar factor
    operands: tuple[Operand, ...]     # in reading order: declaration order, grad_out where the input stood
    aligned: tuple[str, ...]          # index order of the broadcast product
    summed: tuple[str, ...]           # indices reduced away, in aligned order
    sizes: tuple[tuple[str, sympy.Expr], ...]  # size of each summed or target index
    # when it sums over `...` and its operands may span fewer batch positions than the batch shape
    # the inputs' `...` broadcast to: those inputs (name, dims), whose shapes the sum expands to first
    expand_batch: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # the value of each size the spec fixes or the shape checks infer from others (size_t = size_l // 2 for a
    # pooling): what the lowering may assume of it
    known: tuple[tuple[sympy.Symbol, sympy.Expr], ...] = ()

    @property
    def indices(self) -> tuple[str, ...]:
        """Dims of the term's value after the sum, in aligned order."""
        return tuple(i for i in self.aligned if i not in self.summed)


@dataclass(frozen=True)
class ExprPlan:
    """A whole tensor expression: the forward result or one input's gradient."""

    target: str                       # variable it is assigned to (`y`, `grad_x`)
    like: str | None                  # input whose exact shape it must have (None for the forward)
    indices: tuple[str, ...]          # its dims, in order
    terms: tuple[TermPlan, ...]       # summands (empty: identically zero)
    unbroadcast: bool = False         # batch dims broadcast against another input's: sum back to `like`'s shape
    # with unbroadcast, the inputs whose `...` broadcast together (name, dims), and whether no term is known
    # to span that whole batch shape (then the sum of the terms is expanded to it before it is summed back)
    batch_inputs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    short_of_batch: bool = False
    scale: sympy.Expr = sympy.S.One   # index-free factor common to every term, applied once to their sum


@dataclass(frozen=True)
class OpPlan:
    derivation: Derivation
    forward: ExprPlan
    gradients: tuple[ExprPlan, ...]   # one per differentiable input, in input order
    saved: tuple[SavedValue, ...] = ()   # forward values the backward reads (contraction style)
    tangents: tuple[ExprPlan, ...] = ()  # forward mode: each differentiable input's share of the output's tangent

    @property
    def op(self) -> OpSpec:
        return self.derivation.op


def plan(derivation: Derivation) -> OpPlan:
    """Shape plans for the forward and every gradient, of the derivation as it stands (fused or not:
    `kernels.fuse` runs before, for the contraction style)."""
    op = derivation.op
    order = op.index_order
    forward = _plan_expr(op, derivation.forward_terms, op.output, None, op.output_indices, order, stand_in=None)
    gradients = tuple(
        _plan_expr(op, g.terms, f"grad_{g.input}", g.input, g.indices, order, stand_in=g.input)
        for g in derivation.gradients)
    return OpPlan(derivation=derivation, forward=forward, gradients=gradients, saved=derivation.saved,
                  tangents=_plan_tangents(derivation))


def _plan_tangents(derivation: Derivation) -> tuple[ExprPlan, ...]:
    """Each input's share of tangent_y, planned as the forward is (indexed like the output); it reads
    the inputs and the output, not the values the forward saves for the backward."""
    op = derivation.op
    return tuple(_plan_expr(op, t.terms, naming.tangent(op.output), None, op.output_indices, op.index_order,
                            stand_in=None)
                 for t in derivation.tangents)


def _plan_expr(op, terms, target, like, indices, order, stand_in) -> ExprPlan:
    scalars = tensor_symbols(op)
    reading = {t.name: position for position, t in enumerate(op.inputs)}
    reading |= {naming.tangent(t.name): position for position, t in enumerate(op.inputs)}
    if stand_in is not None:
        reading[f"grad_{op.output}"] = reading[stand_in]
    # integer inputs read as values compute in the dtype of the gradient (backward) or of a float input
    dtype_of = naming.grad(op.output) if stand_in is not None else next(t.name for t in op.inputs if not t.integer)
    plans = [_plan_term(op, term, indices, order, scalars, reading, dtype_of) for term in terms]
    plans.sort(key=lambda t: min((_reading_position(o.expr, reading, scalars) for o in t.operands), default=0))
    unbroadcast = like is not None and BATCH in indices and \
        any(BATCH in t.indices for t in op.inputs if t.name != like)
    short = unbroadcast and all(short_of_batch(op, [o.expr for o in t.operands]) for t in plans)
    scale, plans = _factor_out(plans)
    return ExprPlan(target=target, like=like, indices=indices, terms=tuple(plans), unbroadcast=unbroadcast,
                    batch_inputs=batch_inputs(op) if unbroadcast else (), short_of_batch=short, scale=scale)


def batch_inputs(op: OpSpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, dims) of the inputs that carry `...`: their batch dims broadcast together."""
    return tuple((t.name, t.indices) for t in op.inputs if BATCH in t.indices)


def short_of_batch(op: OpSpec, exprs) -> bool:
    """Whether a product of `exprs` may span fewer batch positions than the shape every input's `...`
    broadcasts to: `x[...]` stands for x broadcast to that shape, but a tensor expression of x alone
    has x's. A product reading the output (or its gradient or tangent) or every batched input spans it."""
    batched = {name for name, _ in batch_inputs(op)}
    if len(batched) < 2:
        return False
    whole = {op.output, naming.grad(op.output), naming.tangent(op.output)} if BATCH in op.output_indices else set()
    names = {a.base.label.name for e in exprs for a in e.atoms(sympy.Indexed)}
    names |= {t.name for t in op.inputs if naming.tangent(t.name) in names}
    return not names & whole and not batched <= names


def _factor_out(plans: list[TermPlan]) -> tuple[sympy.Expr, list[TermPlan]]:
    """Pull the coefficient and the scalar tensors (such as grad_loss) every term has out of the sum,
    so that a full-size tensor is scaled once instead of once per term. A lone term gives up its
    scalar tensors and coefficient too (unless a reduction may read the coefficient as a mean): the
    scalars are then multiplied together before they meet the tensor, and the elementwise rest is
    what common-subexpression elimination compares across gradients."""
    if len(plans) == 1:
        (term,) = plans
        scalars = sorted((o for o in term.operands if not o.indices), key=lambda o: sympy.default_sort_key(o.expr))
        if term.summed or not scalars or len(scalars) == len(term.operands):
            return sympy.S.One, plans
        rest = tuple(o for o in term.operands if o.indices)
        return term.coefficient * sympy.Mul(*[o.expr for o in scalars]), \
            [replace(term, coefficient=sympy.S.One, operands=rest)]
    if not plans:
        return sympy.S.One, plans
    coefficients = [t.coefficient for t in plans]
    # (decimals such as 0.044715 have no useful common divisor: it would gather them over 10**20)
    small = all(exact_fraction(n) for c in coefficients for n in c.atoms(sympy.Rational))
    coefficient = functools.reduce(sympy.gcd, coefficients) if small else sympy.S.One
    scalars = set.intersection(*[{o for o in t.operands if not o.indices} for t in plans])
    scalars = {o for o in scalars if all(len(t.operands) > len(scalars) for t in plans)}
    plans = [replace(t, coefficient=sympy.cancel(t.coefficient / coefficient),
                     operands=tuple(o for o in t.operands if o not in scalars)) for t in plans]
    return coefficient * sympy.Mul(*[o.expr for o in sorted(scalars, key=lambda o: sympy.default_sort_key(o.expr))]), plans


def _plan_term(op: OpSpec, term: Term, target: tuple[str, ...], order, scalars, reading, dtype_of: str) -> TermPlan:
    term = _batch_named(term)
    integers = integer_inputs(op)
    factors = _fold_piecewise([as_windows(op, integers_as_float(canonical(f), integers, dtype_of), target)
                               for f in term.factors])
    # Elementwise operands take the target's dim order where they can, so that no transpose follows.
    preferred = tuple(target) + tuple(i for i in order if i not in target)
    preferred = tuple(sorted(preferred, key=lambda i: i != BATCH))     # batch dims always lead
    operands = [Operand(f, _own_order(f, preferred)) for f in factors]
    operands.sort(key=lambda o: (_reading_position(o.expr, reading, scalars), sympy.default_sort_key(o.expr)))
    present = {i for o in operands for i in o.indices}
    # Summing something constant along an index is multiplying by that index's size.
    coefficient = term.coefficient * sympy.Mul(*[i.upper + 1 for i in term.summed if i.name not in present])
    summed = {i.name for i in term.summed} & present
    aligned = ordered(set(target) | present, order)
    sizes = {i.name: i.upper + 1 for i in term.summed} | {i: size_symbol(op.size_of(i)) for i in target}
    expand = BATCH in summed and short_of_batch(op, [o.expr for o in operands])
    return TermPlan(coefficient=coefficient, operands=tuple(operands), aligned=aligned,
                    sizes=tuple((i, sizes[i]) for i in aligned if i in sizes),
                    summed=tuple(i for i in aligned if i in summed),
                    expand_batch=batch_inputs(op) if expand else (), known=_known_sizes(op))


def _batch_named(term: Term) -> Term:
    """A term that sums a copy of the batch dims under another name (`..._1`, which the derivative of a max over
    `...` binds) and reads no `...` of its own sums over `...`: the batch dims, however many, lead and are
    reduced as the batch (sum_to_size), never laid out as one named dim."""
    copies = [i for i in term.summed if i.name != BATCH and i.upper + 1 == size_symbol(BATCH)]
    if len(copies) != 1 or any(i.name == BATCH for f in term.factors for i in f.atoms(sympy.Idx)):
        return term
    batch = sympy.Idx(BATCH, size_symbol(BATCH))
    renaming = {copies[0]: batch}
    return replace(term, factors=tuple(f.xreplace(renaming) for f in term.factors),
                   summed=tuple(renaming.get(i, i) for i in term.summed))


def _known_sizes(op: OpSpec) -> tuple[tuple[sympy.Symbol, sympy.Expr], ...]:
    """(size symbol, its value) of each size the spec fixes or the shape checks infer from the others."""
    return tuple((size_symbol(index), op.size_value(index)) for index, representative in sorted(dict(op.index_sizes).items())
                 if index == representative and op.size_value(index) != size_symbol(index))


def contraction_plan(term: Term, dims: tuple[str, ...], order) -> TermPlan:
    """A contraction found inside a function (`sum(q[t, e] * k[s, e], e)` in a softmax), planned as a term of
    its own whose value has `dims`: its factors are already as the plan reads them (windows, casts)."""
    preferred = tuple(sorted(tuple(dims) + tuple(i for i in order if i not in dims), key=lambda i: i != BATCH))
    operands = tuple(Operand(f, _own_order(f, preferred)) for f in term.factors)
    present = {i for o in operands for i in o.indices}
    sizes = {i.name: i.upper + 1 for f in term.factors for i in f.atoms(sympy.Idx)} | \
        {i.name: i.upper + 1 for i in term.summed}
    coefficient = term.coefficient * sympy.Mul(*[i.upper + 1 for i in term.summed if i.name not in present])
    aligned = ordered(set(dims) | present, order)
    return TermPlan(coefficient=coefficient, operands=operands, aligned=aligned,
                    sizes=tuple((i, sizes[i]) for i in aligned if i in sizes),
                    summed=tuple(i for i in aligned if i in {j.name for j in term.summed} & present))


def as_windows(op: OpSpec, expr: sympy.Expr, target: tuple[str, ...] = ()) -> sympy.Expr:
    """`expr` with each read by affine subscripts wrapped in a `window` that says how generated code pads
    its input and cuts it (see functions.window), and each in_range given a tensor for its dtype and device.
    In each subscript the index with the largest step leads, then one of the result's (`target`): t of
    x[n, c, t + k] in y[n, o, t], its windows x.unfold(2, size_k, 1)."""
    reads = {a: _window(op, a, target) for a in atoms_of(expr, sympy.Indexed) if is_affine_read(a)}
    ranges = {r: in_range(*r.args, scalar_symbol(naming.grad(op.output))) for r in atoms_of(expr, in_range)
              if len(r.args) == 2}
    return expr.xreplace(reads | ranges) if reads or ranges else expr


def _window(op: OpSpec, access: sympy.Indexed, target: tuple[str, ...]) -> window:
    """The padding of an affine read: front = -(its lowest reach), back so that the padded dim holds exactly
    its reach; a read the spec writes whose subscript gave an index's size keeps the declared padding."""
    name = access.base.label.name
    output = {op.output, naming.grad(op.output), naming.tangent(op.output)}
    dims = op.output_indices if name in output else \
        op.input(name.removeprefix("tangent_") if name.startswith("tangent_") else name).indices
    own = tensor_symbol(name.removeprefix("tangent_"))[access.indices] if name.startswith("tangent_") else access
    declared = next((r for r in op.affine_reads if r.access == own), None)
    front, back = [], []
    for position, (subscript, dim) in enumerate(zip(access.indices, dims)):
        if isinstance(subscript, sympy.Idx):
            front.append(sympy.S.Zero)
            back.append(sympy.S.Zero)
            continue
        coefficients = {i: subscript.coeff(i) for i in subscript.atoms(sympy.Idx)}
        lowest = subscript.subs({i: (i.upper if c < 0 else 0) for i, c in coefficients.items()})
        reach = sum((abs(c) * i.upper for i, c in coefficients.items()), sympy.S.One)
        front.append(-lowest)
        if declared is not None and position in declared.exact and all(c > 0 for c in coefficients.values()):
            back.append(sympy.Integer(op.pad_of(own.base.label.name, dim)[1]))
        else:
            back.append(sympy.expand(lowest + reach - size_symbol(op.size_of(dim))))
    # an inferred size without a floor (no stride) is its formula: the pads read size_k - 1, not size_l - size_t
    exact = {size_symbol(i): size for i, size in op.inferred_sizes if not size.has(sympy.floor, sympy.Min)}
    front, back = [sympy.expand(f.xreplace(exact)) for f in front], [sympy.expand(b.xreplace(exact)) for b in back]
    order = [sympy.Tuple(*sorted(i.atoms(sympy.Idx), key=lambda j: (-abs(i.coeff(j)), j.name not in target, j.name)))
             if not isinstance(i, sympy.Idx) else sympy.Tuple(i) for i in access.indices]
    # the padding of an input reads its pad_value; a gradient's or a tangent's reads zeros there (the padding
    # is a constant: nothing flows back to it, and it has no tangent)
    value = op.pad_value_of(name) if any(t.name == name for t in op.inputs) else sympy.S.Zero
    return window(access, sympy.Tuple(*front), sympy.Tuple(*back), sympy.Tuple(*order), value)


def _own_order(expr: sympy.Expr, order) -> tuple[str, ...]:
    """A plain access keeps its tensor's dim order, a window the order its windows are cut in; an
    elementwise expression takes the op's order."""
    if isinstance(expr, sympy.Indexed) and all(isinstance(i, sympy.Idx) for i in expr.indices):
        return diagonal_dims(tuple(i.name for i in expr.indices))
    if isinstance(expr, window):
        return window_dims(expr)
    return ordered(free_indices(expr), order)


def diagonal_dims(indices: tuple[str, ...]) -> tuple[str, ...]:
    """The dims of an access as its code has them: a repeated index (a diagonal, a[i, b, i]) is read with
    `diagonal`, which drops both dims and appends one: (b, i)."""
    while len(set(indices)) < len(indices):
        index = next(i for i in indices if indices.count(i) > 1)
        first = indices.index(index)
        second = indices.index(index, first + 1)
        indices = tuple(i for p, i in enumerate(indices) if p not in (first, second)) + (index,)
    return indices


def ordered(indices, order) -> tuple[str, ...]:
    """`indices` in the op's order; indices the derivation renamed (k_1) go last, by name."""
    known = [i for i in order if i in indices]
    return tuple(known + sorted(set(indices) - set(known)))


def _reading_position(expr, reading, scalars) -> int:
    names = [a.base.label.name for a in atoms_of(expr, sympy.Indexed)] + [s.name for s in expr.free_symbols & scalars]
    return min((reading.get(n, len(reading)) for n in names), default=len(reading))


def _narrow_mask(piece: sympy.Expr) -> list[sympy.Expr]:
    """where(s < t, a[t, s] * v[s, d], 0) as where(s < t, a[t, s], 0) * v[s, d]: a mask of index positions keeps
    only the smallest factor that spans its indices, so the others meet it in a contraction, not inside it."""
    if not (isinstance(piece, sympy.Piecewise) and len(piece.args) == 2 and piece.args[1] == (0, True)):
        return [piece]
    value, condition = piece.args[0]
    compared = {i.name for i in condition.free_symbols if isinstance(i, sympy.Idx)}
    if not compared or condition.atoms(sympy.Indexed):
        return [piece]
    parts = sympy.Mul.make_args(value)
    spanning = sorted((p for p in parts if compared <= free_indices(p)), key=lambda p: len(free_indices(p)))
    if not spanning or len(parts) == 1:
        return [piece]
    kept = spanning[0]
    return [sympy.Piecewise((kept, condition), (0, True))] + [p for p in parts if p is not kept]


def _fold_piecewise(factors: list[sympy.Expr]) -> list[sympy.Expr]:
    """Multiply factors into a Piecewise they fit in, so grad * step(x) becomes one torch.where."""
    factors = [part for f in factors for part in _narrow_mask(f)]
    pieces = [f for f in factors if isinstance(f, sympy.Piecewise)]
    if not pieces:
        return factors
    room = set().union(*(free_indices(p) for p in pieces))
    if not any(p.atoms(sympy.Indexed) for p in pieces):
        # a mask of index positions alone (where(k <= t, 1, 0)) has no tensor to take a dtype from: the
        # factors go inside it
        room |= set().union(*(free_indices(f) for f in factors))
    inside = [f for f in factors if free_indices(f) <= room]
    outside = [f for f in factors if not free_indices(f) <= room]
    # steps with a third value on the kink (a tie's 1/2) nest around the rest instead: folding them
    # together would multiply their cases
    nested = [f for f in inside if is_tied_step(f)]
    rest = [f for f in inside if f not in nested]
    if not any(f.free_symbols for f in rest):    # nothing to wrap: the step stands alone, in its input's dtype
        return [step_as_sign(f) for f in nested] + rest + outside
    folded = fold_piecewise(sympy.Mul(*rest))
    for piece in reversed(nested):
        folded = sympy.Piecewise(*[(value * folded, condition) for value, condition in piece.args])
    return _scalars_out_of_branches(folded) + outside


def _scalars_out_of_branches(piecewise: sympy.Expr) -> list[sympy.Expr]:
    """where(c, g * a, g * b) -> [g, where(c, a, b)] for index-free factors g (a 0-d tensor, a param, a number)
    that every branch shares (a branch of 0 shares any): the branches share g, which scales the result once."""
    if not isinstance(piecewise, sympy.Piecewise):
        return [piecewise]
    branches = [set(sympy.Mul.make_args(value)) for value, _ in piecewise.args if value != 0]
    common = set.intersection(*branches) if branches else set()
    common = sorted((f for f in common if not free_indices(f) and f.free_symbols), key=sympy.default_sort_key)
    if not common:
        return [piecewise]
    scale = sympy.Mul(*common)
    rest = sympy.Piecewise(*[(value / scale, condition) for value, condition in piecewise.args])
    # (a mask of index positions keeps its tensor, from which it takes a dtype)
    return common + [rest] if any(v.atoms(sympy.Indexed) for v, _ in rest.args) else [piecewise]
