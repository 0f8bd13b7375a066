"""Stage 2, model -> derivation: SymPy computes each input's vector-Jacobian product.

For an input X[d...] and a result y[o...] with upstream gradient grad_y[o...]:

    grad_X[d...] = sum over o of grad_y[o...] * d y[o...] / d X[d...]

`sympy.diff` on `Indexed` objects gives the partial derivative with Kronecker deltas
inside `Sum`s. SymPy only removes those for some orders of the summation limits and
wraps what it removes in `Piecewise` range guards, so this module eliminates every
delta itself: any delta with a summed index substitutes the other index for it. No
range guard is needed because both indices range over the same declared dim.
Non-smooth points follow PyTorch: the unit step takes the op's `step_at_zero` value.

Forward mode reuses each partial derivative: X's share of the output's tangent is

    tangent_y[o...] += sum over d' of d y[o...] / d X[d'...] * tangent_X[d'...]

with the deltas eliminated by the same rule (`_derive_tangent`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from . import naming
from .model import OpSpec, SpecError
from .functions import canonical, logsumexp, one_hot, renamed_match, softmax, stabilize
from .spec import index_symbol, scalar_symbol, tensor_symbol


@dataclass(frozen=True)
class Term:
    """One summand of an index expression: coefficient * sum over `summed` of prod(factors)."""

    coefficient: sympy.Expr              # index-free scalar: numbers, sizes, params
    factors: tuple[sympy.Expr, ...]      # factors that depend on tensors (accesses or elementwise expressions)
    summed: tuple[sympy.Idx, ...]        # indices the term sums over, in the order they were bound

    def to_expr(self) -> sympy.Expr:
        body = sympy.Mul(*self.factors)
        if self.summed:
            body = sympy.Sum(body, *[(i, 0, i.upper) for i in self.summed])
        return self.coefficient * body


@dataclass(frozen=True)
class GradientDerivation:
    """How one input's gradient was obtained, step by step."""

    input: str                    # the input X
    indices: tuple[str, ...]      # X's dims: the gradient's index order
    wrt: sympy.Expr               # X[d'...] with fresh indices, the variable of differentiation
    partial: sympy.Expr           # d y[o...] / d X[d'...] as SymPy gives it, deltas included
    vjp_raw: sympy.Expr           # sum over o of grad_y[o...] * partial, before delta elimination
    vjp: sympy.Expr               # grad_X[d...] after delta elimination and the kink convention
    terms: tuple[Term, ...]       # vjp split into canonical terms for the shape planner


@dataclass(frozen=True)
class TangentDerivation:
    """Forward mode: how one input's share of the output's tangent was obtained, from the same partial
    derivative as its gradient (the GradientDerivation of the same input holds `wrt` and `partial`)."""

    input: str                    # the input X
    tangent: str                  # X's tangent, a tensor shaped like X: tangent_X
    jvp_raw: sympy.Expr           # sum over d' of partial * tangent_X[d'...], before delta elimination
    jvp: sympy.Expr               # X's share of tangent_y[o...] after delta elimination and the kink convention
    terms: tuple[Term, ...]       # jvp split into canonical terms for the shape planner


@dataclass(frozen=True)
class Derivation:
    """Everything derived for one op; code, docs and `explain` all render this one record."""

    op: OpSpec
    forward: sympy.Expr                       # the right-hand side in numerically stable form (functions.py)
    forward_terms: tuple[Term, ...]           # ... as canonical terms
    gradients: tuple[GradientDerivation, ...]  # one per differentiable input, in input order
    # the Jacobian-vector product tangent_y = sum over inputs X of (d y / d X) . tangent_X, one share
    # per differentiable input, in input order
    tangents: tuple[TangentDerivation, ...] = ()

    @property
    def grad_output(self) -> str:
        return naming.grad(self.op.output)

    @property
    def uses_output(self) -> bool:
        """Whether some gradient reuses the forward's result."""
        output = self.op.output
        return any(output in {a.base.label.name for a in g.vjp.atoms(sympy.Indexed)}
                   | {s.name for s in g.vjp.free_symbols} for g in self.gradients)


def tensor_symbols(op: OpSpec) -> frozenset[sympy.Symbol]:
    """The 0-d tensors of an op (as opposed to hyperparameters and sizes)."""
    names = [t.name for t in op.inputs if not t.indices]
    names += [naming.tangent(t.name) for t in op.inputs if not t.indices]
    if not op.output_indices:
        names += [op.output, naming.grad(op.output)]
    return frozenset(scalar_symbol(n) for n in names)


def depends_on_tensor(expr: sympy.Expr, scalars: frozenset[sympy.Symbol]) -> bool:
    return bool(expr.atoms(sympy.Indexed)) or bool(expr.free_symbols & scalars)


def derive(op: OpSpec) -> Derivation:
    scalars = tensor_symbols(op)
    forward = stabilize(op.rhs)
    gradients = tuple(_derive_input(op, forward, tensor.name, scalars)
                      for tensor in op.inputs if tensor.differentiable)
    tangents = tuple(_derive_tangent(op, forward, gradient, scalars) for gradient in gradients)
    return Derivation(op=op, forward=forward, forward_terms=tuple(expand_terms(forward, scalars)),
                      gradients=gradients, tangents=tangents)


def _derive_input(op: OpSpec, forward: sympy.Expr, name: str, scalars) -> GradientDerivation:
    tensor = op.input(name)
    primed = {d: index_symbol(f"{d}'", op.size_of(d)) for d in tensor.indices}
    wrt = tensor_symbol(name)[tuple(primed.values())] if tensor.indices else scalar_symbol(name)
    partial = _explicit_kinks(_deltas_out_of_piecewise(sympy.diff(forward, wrt)), op.step_at_zero)

    out_indices = [index_symbol(o, op.size_of(o)) for o in op.output_indices]
    grad_out = naming.grad(op.output)
    upstream = tensor_symbol(grad_out)[tuple(out_indices)] if out_indices else scalar_symbol(grad_out)
    vjp_raw = upstream * partial
    if out_indices:
        vjp_raw = sympy.Sum(vjp_raw, *[(o, 0, o.upper) for o in out_indices])

    terms = []
    for term in expand_terms(vjp_raw, scalars):
        term = _eliminate_deltas(term, op, name)
        if term is not None:
            terms.append(_rename_primed(term, primed, op))
    terms = [_reuse_output(t, op, forward) for t in _combine(terms) if not _vanishes(t)]
    vjp = sympy.Add(*[t.to_expr() for t in terms])
    terms = [Term(t.coefficient, tuple(_lower_kinks(f) for f in t.factors), t.summed) for t in terms]
    return GradientDerivation(input=name, indices=tensor.indices, wrt=wrt, partial=partial,
                              vjp_raw=vjp_raw, vjp=vjp, terms=tuple(terms))


# --- forward mode ----------------------------------------------------------------------------

def _derive_tangent(op: OpSpec, forward: sympy.Expr, gradient: GradientDerivation, scalars) -> TangentDerivation:
    """X's share of the Jacobian-vector product, from the partial derivative its gradient was built from:

        tangent_y[o...] += sum over d' of d y[o...] / d X[d'...] * tangent_X[d'...]

    The deltas are eliminated as for the gradient; here they substitute the output's indices (or a
    gathered value) for X's primed ones, so the result is indexed like the output.
    """
    name = naming.tangent(gradient.input)
    primed = tuple(gradient.wrt.indices) if isinstance(gradient.wrt, sympy.Indexed) else ()
    jvp_raw = gradient.partial * (tensor_symbol(name)[primed] if primed else scalar_symbol(name))
    if primed:
        jvp_raw = sympy.Sum(jvp_raw, *[(p, 0, p.upper) for p in primed])
    terms = []
    for term in expand_terms(jvp_raw, scalars):
        term = _eliminate_deltas(term, op, gradient.input)
        if term is not None:
            terms.append(_unprime_sums(term, primed, op.output_indices))
    terms = [_reuse_output(t, op, forward) for t in _combine(terms) if not _vanishes(t)]
    jvp = sympy.Add(*[t.to_expr() for t in terms])
    terms = [Term(t.coefficient, tuple(_lower_kinks(f) for f in t.factors), t.summed) for t in terms]
    return TangentDerivation(input=gradient.input, tangent=name, jvp_raw=jvp_raw, jvp=jvp, terms=tuple(terms))


def _unprime_sums(term: Term, primed: tuple[sympy.Idx, ...], output: tuple[str, ...]) -> Term:
    """A primed index a delta did not remove is summed: it takes its dim's own name unless the term or
    the output (which every term broadcasts to) uses it, else a fresh one."""
    factors, summed = term.factors, list(term.summed)
    taken = _index_names(term) | set(output)
    for position, index in enumerate(summed):
        if index in primed:
            plain = sympy.Idx(index.name.rstrip("'"), index.upper + 1)
            fresh = plain if plain.name not in taken else _fresh_index(plain, taken)
            taken.add(fresh.name)
            factors = tuple(f.xreplace({index: fresh}) for f in factors)
            summed[position] = fresh
    return Term(term.coefficient, factors, tuple(summed))


def _split_piecewise(piecewise: sympy.Piecewise) -> tuple[list[sympy.Expr], sympy.Expr]:
    """Piecewise((d * a, c), (d * b, True)) -> ([d], Piecewise((a, c), (b, True))) for deltas d in every branch."""
    branches = [set(sympy.Mul.make_args(value)) for value, _ in piecewise.args if value != 0]
    common = set.intersection(*branches) if branches else set()
    deltas = sorted((f for f in common if isinstance(f, sympy.KroneckerDelta)), key=sympy.default_sort_key)
    if not deltas:
        return [], piecewise
    rest = sympy.Piecewise(*[(value / sympy.Mul(*deltas), condition) for value, condition in piecewise.args])
    return deltas, rest


def _deltas_out_of_piecewise(expr: sympy.Expr) -> sympy.Expr:
    """The partial derivative with deltas moved out of Piecewise branches, for display and elimination."""
    def pull(piecewise):
        deltas, rest = _split_piecewise(piecewise)
        return sympy.Mul(*deltas) * rest
    return expr.replace(lambda e: isinstance(e, sympy.Piecewise) and _split_piecewise(e)[0], pull)


def _explicit_kinks(expr: sympy.Expr, step_at_zero: sympy.Expr) -> sympy.Expr:
    """Heaviside(a) -> Heaviside(a, step_at_zero): the value at the kink becomes part of the math."""
    return expr.replace(lambda e: isinstance(e, sympy.Heaviside),
                        lambda e: sympy.Heaviside(e.args[0], step_at_zero))


def _lower_kinks(expr: sympy.Expr) -> sympy.Expr:
    """Heaviside(a, h0) -> Piecewise, ordered so that NaN takes the last branch (gradient passes, as in torch)."""
    def piecewise(step):
        arg, at_zero = step.args
        if at_zero == 0:
            return sympy.Piecewise((0, arg <= 0), (1, True))
        if at_zero == 1:
            return sympy.Piecewise((0, arg < 0), (1, True))
        return sympy.Piecewise((0, arg < 0), (at_zero, sympy.Eq(arg, 0)), (1, True))
    return expr.replace(lambda e: isinstance(e, sympy.Heaviside), piecewise)


def _vanishes(term: Term) -> bool:
    """Whether a summed index meets only one factor and that factor sums to zero over it.

    This is the case of a centered value, sum over d of (x[d] - mean(x)) = 0, which
    layer_norm's derivative produces and SymPy does not see.
    """
    for index in term.summed:
        depending = [f for f in term.factors if index in f.atoms(sympy.Idx)]
        if len(depending) != 1:
            continue
        total = sympy.Integer(0)
        for part in sympy.Add.make_args(sympy.expand(canonical(depending[0], depth=1))):
            total += sympy.Sum(part, (index, 0, index.upper)) if index in part.atoms(sympy.Idx) \
                else part * (index.upper + 1)
        if canonical(total) == 0:
            return True
    return False


def _reuse_output(term: Term, op: OpSpec, forward: sympy.Expr) -> Term:
    """Replace each occurrence of the forward expression (at any indices) by the saved result."""
    if isinstance(forward, (sympy.Indexed, sympy.Symbol)) or not forward.has(sympy.Function, sympy.Pow):
        return term
    indices = [index_symbol(o, op.size_of(o)) for o in op.output_indices]
    output = tensor_symbol(op.output) if indices else scalar_symbol(op.output)

    def as_output(expr):
        chosen = renamed_match(forward, indices, expr)
        if chosen is None:
            return None
        return output[chosen] if chosen else output

    def via_log(expr):
        """softmax(a, c) = exp(y) when the forward is y = a - logsumexp(a, c) (log_softmax)."""
        if isinstance(expr, softmax):
            saved = as_output(expr.body - logsumexp(expr.body, expr.index))
            return None if saved is None else sympy.exp(saved)
        return None

    factors = tuple(f.replace(lambda e: as_output(e) is not None, as_output)
                     .replace(lambda e: via_log(e) is not None, via_log) for f in term.factors)
    return Term(term.coefficient, factors, term.summed)


# --- canonical terms -------------------------------------------------------------------------

def expand_terms(expr: sympy.Expr, scalars: frozenset[sympy.Symbol]) -> list[Term]:
    """Split `expr` into terms with every Sum that is a factor pulled to the top of its term.

    Products distribute over sums only where a summand holds a delta; other sums such
    as (pred - target) or (x - mean(x)) stay whole, as one elementwise factor.
    """
    expr = sympy.sympify(expr)
    if isinstance(expr, sympy.Add):
        return [t for arg in expr.args for t in expand_terms(arg, scalars)]
    if isinstance(expr, sympy.Mul):
        terms = [Term(sympy.Integer(1), (), ())]
        for arg in expr.args:
            terms = [_multiply(a, b) for a, b in itertools.product(terms, _arg_terms(arg, scalars))]
        return terms
    if isinstance(expr, sympy.Sum):
        bound = []
        for limit in expr.limits:
            index, lower, upper = limit
            if lower != 0 or not isinstance(index, sympy.Idx) or upper != index.upper:
                raise ValueError(f"unexpected summation limits {limit}")
            bound.append(index)
        terms = [_rename_bound(t, {i.name for i in bound}) for t in expand_terms(expr.function, scalars)]
        return [Term(t.coefficient, t.factors, tuple(bound) + t.summed) for t in terms]
    return [_atom(expr, scalars)]


def _arg_terms(arg, scalars):
    """Terms of one factor of a product; a plain sum such as (pred - target) stays one factor."""
    if isinstance(arg, sympy.Add) and not arg.has(sympy.KroneckerDelta):
        return [_atom(arg, scalars)]
    return expand_terms(arg, scalars)


def _atom(expr, scalars) -> Term:
    if isinstance(expr, sympy.Piecewise):
        deltas, rest = _split_piecewise(expr)
        if deltas:   # SymPy folds products into Piecewise branches; the deltas must stay visible
            return Term(sympy.Integer(1), (*deltas, rest), ())
    if depends_on_tensor(expr, scalars) or expr.has(sympy.KroneckerDelta):
        return Term(sympy.Integer(1), (expr,), ())
    return Term(expr, (), ())


def _multiply(a: Term, b: Term) -> Term:
    """Product of two terms; summation indices of either that clash with the other's are renamed."""
    a = _rename_bound(a, _index_names(b))
    b = _rename_bound(b, _index_names(a))
    return Term(a.coefficient * b.coefficient, a.factors + b.factors, a.summed + b.summed)


def _index_names(term: Term) -> set[str]:
    """Every index name a term mentions, free or bound."""
    return {i.name for f in term.factors for i in f.atoms(sympy.Idx)} | {i.name for i in term.summed}


def _rename_bound(term: Term, avoid: set[str]) -> Term:
    factors, summed = term.factors, list(term.summed)
    taken = avoid | _index_names(term)
    for position, index in enumerate(summed):
        if index.name in avoid:
            fresh = _fresh_index(index, taken)
            taken.add(fresh.name)
            factors = tuple(f.xreplace({index: fresh}) for f in factors)
            summed[position] = fresh
    return Term(term.coefficient, factors, tuple(summed))


def _fresh_index(index: sympy.Idx, taken: set[str]) -> sympy.Idx:
    for n in itertools.count(1):
        name = f"{index.name}_{n}"
        if name not in taken:
            return sympy.Idx(name, index.upper + 1)


def _eliminate_deltas(term: Term, op: OpSpec, name: str) -> Term | None:
    """Remove every KroneckerDelta from a term whatever the order of its sums; None if the term is zero."""
    factors, summed = list(term.factors), list(term.summed)
    while True:
        delta = next((d for f in factors for d in sympy.Mul.make_args(f) if isinstance(d, sympy.KroneckerDelta)), None)
        if delta is None:
            break
        a, b = delta.args[:2]
        if a in summed:
            old, new = a, b
        elif b in summed:
            old, new = b, a
        elif isinstance(a, sympy.Idx) != isinstance(b, sympy.Idx):
            # delta(idx[n], v) with v not summed: 1 where the integer tensor's value is v
            value, position = (b, a) if isinstance(a, sympy.Idx) else (a, b)
            factors = [f.xreplace({delta: one_hot(value, position)}) for f in factors]
            continue
        else:
            raise SpecError(f"the gradient of '{name}' keeps a Kronecker delta {delta} between two free indices",
                            path=op.source, op=op.name)
        summed.remove(old)
        replaced = []
        for factor in factors:
            factor = factor.xreplace({old: new})
            if factor == 0:
                return None
            replaced.append(factor)
        factors = [f for f in replaced if f != 1]
    coefficient = term.coefficient
    tensor_factors = []
    for factor in factors:
        if factor.is_number:
            coefficient *= factor
        else:
            tensor_factors.append(factor)
    if coefficient == 0:
        return None
    return Term(coefficient, tuple(tensor_factors), tuple(summed))


def _rename_primed(term: Term, primed: dict[str, sympy.Idx], op: OpSpec) -> Term:
    """Give the gradient the input's own index names, renaming sums that would capture them."""
    factors, summed = term.factors, list(term.summed)
    taken = {s.name for s in term.to_expr().free_symbols} | set(primed) | {i.name for i in summed}
    for position, index in enumerate(summed):
        if index.name in primed:
            fresh = _fresh_index(index, taken)
            taken.add(fresh.name)
            factors = tuple(f.xreplace({index: fresh}) for f in factors)
            summed[position] = fresh
    back = {p: index_symbol(d, op.size_of(d)) for d, p in primed.items()}
    return Term(term.coefficient, tuple(f.xreplace(back) for f in factors), tuple(summed))


def _combine(terms: list[Term]) -> list[Term]:
    """Add the coefficients of terms that have the same factors and sums."""
    merged: dict[sympy.Expr, Term] = {}
    for term in terms:
        key = canonical(Term(sympy.Integer(1), term.factors, term.summed).to_expr())
        if key in merged:
            previous = merged[key]
            term = Term(previous.coefficient + term.coefficient, previous.factors, previous.summed)
        merged[key] = term
    return [t for t in merged.values() if t.coefficient != 0]
