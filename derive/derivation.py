"""Stage 2, model -> derivation: SymPy computes each input's vector-Jacobian product.

For an input X[d...] and a result y[o...] with upstream gradient grad_y[o...]:

    grad_X[d...] = sum over o of grad_y[o...] * d y[o...] / d X[d...]

`sympy.diff` on `Indexed` objects gives the partial derivative with Kronecker deltas
inside `Sum`s. SymPy only removes those for some orders of the summation limits and
wraps what it removes in `Piecewise` range guards, so this module eliminates every
delta itself: any delta with a summed index substitutes the other index for it. No
range guard is needed because both indices range over the same declared dim.

Kinks (`settle_kinks`): the derivative of Max, Min, Abs and where() is a step that jumps
where some argument s is 0. Each step takes the value PyTorch's primitive gives there:
Max/Min split a tie evenly unless the spec says `tie=`, Abs has sign(0) = 0, where()
follows its comparison. Then every kink s = 0 of a gradient is compared from both sides:
where the two one-sided formulas are equal the step is dropped, where they agree at s = 0
the gradient takes that value whatever the conventions, and only a real jump keeps one.

Forward mode reuses each partial derivative: X's share of the output's tangent is

    tangent_y[o...] += sum over d' of d y[o...] / d X[d'...] * tangent_X[d'...]

with the deltas eliminated by the same rule (`_derive_tangent`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import sympy

from . import naming
from .model import OpSpec, SpecError, index_symbol, scalar_symbol, tensor_symbol
from .functions import (Sum, _Extremum, _OverIndex, as_pow, atoms_of, canonical, differentiable_powers, first_max,
                        fold_window, fresh_index, in_range, is_max, logsumexp, one_hot, reaches, renamed_match, replace_index,
                        softmax, stabilize)


@dataclass(frozen=True)
class Term:
    """One summand of an index expression: coefficient * sum over `summed` of prod(factors)."""

    coefficient: sympy.Expr              # index-free scalar: numbers, sizes, params
    factors: tuple[sympy.Expr, ...]      # factors that depend on tensors (accesses or elementwise expressions)
    summed: tuple[sympy.Idx, ...]        # indices the term sums over, in the order they were bound

    def to_expr(self) -> sympy.Expr:
        body = sympy.Mul(*self.factors)
        if self.summed:
            body = Sum(body, *[(i, 0, i.upper) for i in self.summed])
        return self.coefficient * body


@dataclass(frozen=True)
class Kink:
    """A surface s = 0 where a step of one gradient jumps, and how the gradient's value there was settled."""

    surface: sympy.Expr          # s; the kink is where s == 0
    above: sympy.Expr            # the gradient where s > 0
    below: sympy.Expr            # the gradient where s < 0
    at: sympy.Expr               # the gradient where s == 0, as the generated code computes it
    verdict: str                 # one of KINK_VERDICTS

    @property
    def equation(self) -> sympy.Eq:
        """s == 0 written as two sides: x[i] = 0, a[i] = b[i]."""
        return sympy.Eq(*_sides(self.surface), evaluate=False)


KINK_VERDICTS = {
    "smooth": "one formula on both sides: the step cancels and is gone",
    "continuous": "both sides agree on the kink: the gradient there is their common value, whatever the conventions",
    "jump": "the gradient jumps: its value on the kink follows the conventions (Max/Min tie, sign(0) = 0, where())",
}


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
    kinks: tuple[Kink, ...] = ()  # each place s = 0 where the derivative may jump, and what derive did there


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
    # forward values the forward computes once and the backward reads, which the fused kernels
    # (kernels.fuse) need: empty as derived, each a saving.SavedValue after fusion
    saved: tuple = ()
    # a native kernel's call that computes the whole forward and its saved values at once
    # (kernels.NativeForward: a normalization's native_batch_norm / native_layer_norm; kernels.NativePool: a max
    # pool's max_pool1d_with_indices), or None
    native_forward: object = None

    @property
    def grad_output(self) -> str:
        return naming.grad(self.op.output)

    @functools.cached_property    # (a frozen record: computed once)
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


def integer_inputs(op: OpSpec) -> frozenset[str]:
    """The op's integer inputs: indices and masks, never differentiated."""
    return frozenset(t.name for t in op.inputs if t.integer)


def reads_values(expr: sympy.Expr, op: OpSpec) -> bool:
    """Whether `expr` reads a tensor's values: a condition on them is a kink; one on index positions alone
    (k <= t, i == j) or on params is the same for every input value."""
    return bool(expr.atoms(sympy.Indexed)) or bool(expr.free_symbols & tensor_symbols(op))


def kinked(expr: sympy.Expr, op: OpSpec, jumps: tuple = ()) -> bool:
    """Whether `expr` holds a kink: one of the functions `jumps`, or a Piecewise with a condition on values."""
    return expr.has(*jumps) or any(reads_values(condition, op) for piecewise in expr.atoms(sympy.Piecewise)
                                   for _, condition in piecewise.args)


def depends_on_tensor(expr: sympy.Expr, scalars: frozenset[sympy.Symbol]) -> bool:
    """Whether `expr` varies along indices: it reads a tensor, or is an index range (in_range)."""
    return bool(atoms_of(expr, sympy.Indexed)) or bool(expr.free_symbols & scalars) or expr.has(in_range)


def is_factor(expr: sympy.Expr, scalars: frozenset[sympy.Symbol]) -> bool:
    """Whether `expr` is a factor of a term rather than part of its index-free coefficient: it reads a tensor,
    holds a delta, or compares index positions (where(k <= t, 1, 0) is a mask over k and t)."""
    return depends_on_tensor(expr, scalars) or expr.has(sympy.KroneckerDelta) or bool(expr.atoms(sympy.Idx))


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
    partial = _deltas_out_of_piecewise(_differentiate(forward, wrt))

    out_indices = [index_symbol(o, op.size_of(o)) for o in op.output_indices]
    grad_out = naming.grad(op.output)
    upstream = tensor_symbol(grad_out)[tuple(out_indices)] if out_indices else scalar_symbol(grad_out)
    vjp_raw = upstream * partial
    if out_indices:
        vjp_raw = Sum(vjp_raw, *[(o, 0, o.upper) for o in out_indices])

    terms = []
    for term in expand_terms(vjp_raw, scalars):
        term = _eliminate_deltas(term, op, name)
        if term is not None:
            terms.append(_rename_primed(term, primed, op))
    terms, kinks = settle_kinks(_combine(terms), scalars, integer_inputs(op))
    # a delta that SymPy had folded into a where() branch comes out when the branch is chosen
    terms = [t for t in (_eliminate_deltas(t, op, name) for t in terms) if t is not None]
    terms = [_reuse_output(t, op, forward) for t in terms if not _vanishes(t)]
    vjp = sympy.Add(*[t.to_expr() for t in terms])
    terms = [Term(t.coefficient, tuple(lower_kinks(f) for f in t.factors), t.summed) for t in terms]
    return GradientDerivation(input=name, indices=tensor.indices, wrt=wrt, partial=partial,
                              vjp_raw=vjp_raw, vjp=vjp, terms=tuple(terms), kinks=kinks)


def _differentiate(forward: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """d forward / d wrt, with torch's derivatives of a power (see `power`)."""
    return as_pow(sympy.diff(differentiable_powers(forward), wrt))


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
        jvp_raw = Sum(jvp_raw, *[(p, 0, p.upper) for p in primed])
    terms = []
    for term in expand_terms(jvp_raw, scalars):
        term = _eliminate_deltas(term, op, gradient.input)
        if term is not None:
            terms.append(_unprime_sums(term, primed, op.output_indices))
    terms, _ = settle_kinks(_combine(terms), scalars, integer_inputs(op))
    terms = [t for t in (_eliminate_deltas(t, op, gradient.input) for t in terms) if t is not None]
    terms = [_reuse_output(t, op, forward) for t in terms if not _vanishes(t)]
    jvp = sympy.Add(*[t.to_expr() for t in terms])
    terms = [Term(t.coefficient, tuple(lower_kinks(f) for f in t.factors), t.summed) for t in terms]
    return TangentDerivation(input=gradient.input, tangent=name, jvp_raw=jvp_raw, jvp=jvp, terms=tuple(terms))


def _unprime_sums(term: Term, primed: tuple[sympy.Idx, ...], output: tuple[str, ...]) -> Term:
    """A primed index a delta did not remove is summed: it takes its dim's own name unless the term or
    the output (which every term broadcasts to) uses it, else a fresh one."""
    factors, summed = term.factors, list(term.summed)
    taken = _index_names(term) | set(output)
    for position, index in enumerate(summed):
        if index in primed:
            plain = sympy.Idx(index.name.rstrip("'"), index.upper + 1)
            fresh = plain if plain.name not in taken else fresh_index(plain, taken)
            taken.add(fresh.name)
            factors = tuple(f.xreplace({index: fresh}) for f in factors)
            summed[position] = fresh
    return Term(term.coefficient, factors, tuple(summed))


def _split_piecewise(piecewise: sympy.Piecewise) -> tuple[list[sympy.Expr], sympy.Expr]:
    """Piecewise((d * a, c), (d * b, True)) -> ([d], Piecewise((a, c), (b, True))) for deltas d in every branch."""
    # factored, so that a delta common to a sum in a branch shows (Sum() folds a step added to a where())
    values = [(sympy.factor_terms(value), condition) for value, condition in piecewise.args]
    branches = [set(sympy.Mul.make_args(value)) for value, _ in values if value != 0]
    common = set.intersection(*branches) if branches else set()
    deltas = sorted((f for f in common if isinstance(f, sympy.KroneckerDelta)), key=sympy.default_sort_key)
    if not deltas:
        return [], piecewise
    rest = sympy.Piecewise(*[(value / sympy.Mul(*deltas), condition) for value, condition in values])
    return deltas, rest


def _deltas_out_of_piecewise(expr: sympy.Expr) -> sympy.Expr:
    """The partial derivative with deltas moved out of Piecewise branches, for display and elimination."""
    def pull(piecewise):
        deltas, rest = _split_piecewise(piecewise)
        return sympy.Mul(*deltas) * rest
    return expr.replace(lambda e: isinstance(e, sympy.Piecewise) and _split_piecewise(e)[0], pull)


# --- kinks ------------------------------------------------------------------------------------

def _surface(argument: sympy.Expr) -> tuple[sympy.Expr, int]:
    """(s, sign) with argument = c * s and sign = sign(c) for a positive-or-negative number c; s is the same
    for a and -a (and 2 * a), so the steps of one kink, whichever way they are written, meet."""
    content, s = argument.as_content_primitive()
    sign = 1 if content > 0 else -1
    if s.could_extract_minus_sign():
        s, sign = -s, -sign
    return s, sign


def _argument(step: sympy.Expr) -> sympy.Expr:
    """a of a step Heaviside(a, h) or sign(a), or of a where() condition a > 0 written as l > r (a = l - r)."""
    return step.lhs - step.rhs if isinstance(step, sympy.core.relational.Relational) else step.args[0]


def _steps(expr: sympy.Expr, scalars) -> dict[sympy.Expr, list[sympy.Expr]]:
    """Every step of a tensor in `expr`, by the surface s its kink lies on."""
    found = expr.atoms(sympy.Heaviside, sympy.sign) | {
        condition for piecewise in expr.atoms(sympy.Piecewise) for _, c in piecewise.args
        for condition in c.atoms(sympy.core.relational.Relational)}
    by_surface: dict[sympy.Expr, list[sympy.Expr]] = {}
    for step in sorted(found, key=sympy.default_sort_key):
        if depends_on_tensor(_argument(step), scalars):
            by_surface.setdefault(_surface(_argument(step))[0], []).append(step)
    return by_surface


def _value(step: sympy.Expr, side: int) -> sympy.Expr:
    """The value of a step where its surface s has the sign `side` (1, -1, or 0 on the kink)."""
    direction = _surface(_argument(step))[1] * side       # the sign of the step's own argument there
    if isinstance(step, sympy.Heaviside):
        return step.args[1] if direction == 0 else sympy.Integer(int(direction > 0))
    if isinstance(step, sympy.sign):
        return sympy.Integer(direction)
    return step.func(direction, 0)                          # a comparison, true or false


def _from_above(step: sympy.Expr, surface: sympy.Expr) -> sympy.Expr:
    """The same step, except that on the kink it takes its value for s > 0 (the side that s >= 0 includes)."""
    above = _value(step, 1)
    if isinstance(step, sympy.Heaviside):
        return sympy.Heaviside(step.args[0], above)
    if isinstance(step, sympy.sign):
        return above * (2 * sympy.Heaviside(surface, 1) - 1)
    return _compare(sympy.Ge if above else sympy.Lt, surface)


def _one_side(expr: sympy.Expr, steps, side: int) -> sympy.Expr:
    return expr.xreplace({step: _value(step, side) for step in steps})


def _on_kink(surface: sympy.Expr, scalars) -> dict | None:
    """A substitution that puts an expression on the kink s = 0: a tensor s is linear in, solved for; or None."""
    for atom in sorted(surface.atoms(sympy.Indexed) | (surface.free_symbols & scalars), key=sympy.default_sort_key):
        slope = surface.diff(atom)
        rest = sympy.expand(surface - slope * atom)
        if slope.is_number and slope != 0 and not rest.has(atom):
            return {atom: -rest / slope}
    return None


def _is_zero(expr: sympy.Expr, scalars) -> bool:
    """Whether the terms of `expr` cancel, sums over renamed indices and constant factors inside sums included."""
    return not _combine(expand_terms(sympy.expand(expr), scalars))


def settle_kinks(terms: list[Term], scalars, integers: frozenset[str] = frozenset()
                 ) -> tuple[list[Term], tuple[Kink, ...]]:
    """The key rule: where a function is differentiable its gradient is the true derivative, whatever the
    conventions at its kinks. For each surface s = 0 that steps of this gradient jump on (the steps of
    Max(0, x) and Min(0, x), the sign of Abs(x), the condition of where(x > 0, ...) all lie on x = 0):

    - the formulas for s > 0 and s < 0 are the same: the kinks cancel, the steps are replaced by their
      value for s > 0 and no kink is left (Max(0, x) + Min(0, x) is x, with gradient 1 at 0 too);
    - they differ but agree on s = 0: the gradient is continuous there and its value on the kink must be
      the common one; where the conventions would give another, each step takes its s > 0 value on the kink;
    - they differ on s = 0: a real jump, and each step keeps the value of its convention there.
    """
    verdicts = {}
    for surface in _steps(_total(terms), scalars):
        if not _names(surface, scalars) - integers:
            continue    # a condition on integer inputs alone (where(mask[i] > 0, ...)): they do not vary, no kink
        steps = _steps_of(terms, surface, scalars)
        if not steps:
            continue
        total = _total(terms)
        above, below = _one_side(total, steps, 1), _one_side(total, steps, -1)
        if _is_zero(above - below, scalars):
            terms = _replaced(terms, {step: _value(step, 1) for step in steps}, scalars)
            verdicts[surface] = "smooth"
            continue
        on_kink = _on_kink(surface, scalars)
        if on_kink is not None and _is_zero((above - below).xreplace(on_kink), scalars):
            if not _is_zero((_one_side(total, steps, 0) - above).xreplace(on_kink), scalars):
                terms = _replaced(terms, {step: _from_above(step, surface) for step in steps}, scalars)
            verdicts[surface] = "continuous"
        else:
            verdicts[surface] = "jump"
        terms = _one_way(terms, surface, scalars)
    total = _total(terms)
    kinks = []
    for surface, verdict in verdicts.items():
        steps = _steps_of(terms, surface, scalars)
        kinks.append(Kink(surface, *(_one_side(total, steps, side) for side in (1, -1, 0)), verdict))
    return terms, tuple(kinks)


def _names(expr: sympy.Expr, scalars) -> set[str]:
    """The tensors `expr` reads."""
    return {a.base.label.name for a in expr.atoms(sympy.Indexed)} | {s.name for s in expr.free_symbols & scalars}


def _total(terms: list[Term]) -> sympy.Expr:
    return sympy.Add(*[t.to_expr() for t in terms])


def _one_way(terms: list[Term], surface: sympy.Expr, scalars) -> list[Term]:
    """The terms with each step of `surface` written one way, step(-s, h) = 1 - step(s, 1 - h), when that lets
    terms merge: g * step(-x, 0) + g * step(x, 1) is g."""
    flipped = {step: 1 - sympy.Heaviside(-step.args[0], 1 - step.args[1])
               for step in _steps_of(terms, surface, scalars)
               if isinstance(step, sympy.Heaviside) and _surface(step.args[0])[1] < 0}
    merged = _replaced(terms, flipped, scalars, distribute=True)
    return merged if len(merged) < len(terms) else terms


def _steps_of(terms: list[Term], surface: sympy.Expr, scalars) -> list[sympy.Expr]:
    return _steps(_total(terms), scalars).get(surface, [])


def _replaced(terms: list[Term], replacement: dict, scalars, distribute: bool = False) -> list[Term]:
    """The terms with steps replaced; factors that become index-free join the coefficient, zero terms go.
    With `distribute`, a factor the replacement made a sum splits its term in several."""
    result = []
    for term in terms:
        choices = []
        for factor in term.factors:
            new = factor.xreplace(replacement)
            choices.append(sympy.Add.make_args(sympy.expand(new)) if distribute and new != factor else (new,))
        for chosen in itertools.product(*choices):
            coefficient, factors = term.coefficient, []
            for part in (p for factor in chosen for p in sympy.Mul.make_args(factor)):
                if is_factor(part, scalars):
                    factors.append(part)
                else:
                    coefficient *= part
            if coefficient != 0:
                result.append(Term(coefficient, tuple(factors), term.summed))
    return _combine(result)


def _sides(argument: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """(l, r) with argument = l - r, each side written without a leading minus: x[i] - lo -> (x[i], lo)."""
    left = [t for t in sympy.Add.make_args(argument) if not t.could_extract_minus_sign()]
    right = [-t for t in sympy.Add.make_args(argument) if t.could_extract_minus_sign()]
    return sympy.Add(*left), sympy.Add(*right)


def _compare(relation, argument: sympy.Expr) -> sympy.Expr:
    """relation(argument, 0) written as a comparison of its two sides, the tensor first: x[i] > 0, a[i] <= b[i]."""
    left, right = _sides(argument)
    comparison = relation(left, right)
    return comparison.reversed if left == 0 else comparison


def is_tied_step(piece: sympy.Expr) -> bool:
    """Whether `piece` is a step with a third value on its kink, as `lower_kinks` writes it (not any where())."""
    return isinstance(piece, sympy.Piecewise) and len(piece.args) == 3 and piece.args[0].expr == 0 \
        and isinstance(piece.args[1].cond, sympy.Eq) and piece.args[2] == (1, True)


def step_as_sign(piece: sympy.Piecewise) -> sympy.Expr:
    """A lowered step with a third value h on the kink, Piecewise((0, a < 0), (h, a == 0), (1, True)), written
    with sign(a): (1 + sign(a)) / 2 + (h - 1/2) * (1 - sign(a)**2). Unlike a torch.where of Python numbers it
    has a's dtype, for a step that multiplies a reduced value instead of wrapping a tensor."""
    (_, below), (at_zero, _), _ = piece.args
    sign = sympy.sign(below.lts - below.gts)
    return (1 + sign) / 2 + (at_zero - sympy.S.Half) * (1 - sign**2)


def lower_kinks(expr: sympy.Expr) -> sympy.Expr:
    """Heaviside(a, h) -> Piecewise, ordered so that NaN takes the last branch: the gradient passes at NaN, as
    torch.maximum, relu and hardtanh give it."""
    def piecewise(step):
        arg, at_zero = step.args
        if at_zero == 0:
            return sympy.Piecewise((0, _compare(sympy.Le, arg)), (1, True))
        if at_zero == 1:
            return sympy.Piecewise((0, _compare(sympy.Lt, arg)), (1, True))
        return sympy.Piecewise((0, _compare(sympy.Lt, arg)), (at_zero, _compare(sympy.Eq, arg)), (1, True))
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
            total += Sum(part, (index, 0, index.upper)) if index in part.atoms(sympy.Idx) \
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
    if isinstance(expr, sympy.Piecewise) and _split_piecewise(expr)[1].has(sympy.KroneckerDelta):
        return _branch_terms(expr, scalars)
    return [_atom(expr, scalars)]


def _branch_terms(piecewise: sympy.Piecewise, scalars) -> list[Term]:
    """A where() whose branches hold deltas that are not common to all of them (a delta bound by a sum in
    one branch, or one that only one branch has) as a sum of masked branches, one term for each summand
    of each branch, with the branch's sums and deltas pulled out of the mask:

        where(c, sum(a[m] * delta(m, m'), m), b)  ->  sum(delta(m, m') * where(c, a[m], 0), m) + where(c, 0, b)

    The condition does not use the branch's own summation indices (they are renamed apart from it), so
    the mask can move inside those sums; the deltas then meet the sums that eliminate them."""
    terms, earlier = [], []
    taken = {i.name for _, condition in piecewise.args for i in condition.atoms(sympy.Idx)}
    for value, condition in piecewise.args:
        for term in expand_terms(value, scalars) if value != 0 else ():
            term = _rename_bound(term, taken)
            deltas = tuple(f for f in term.factors if isinstance(f, sympy.KroneckerDelta))
            rest = sympy.Mul(*[f for f in term.factors if not isinstance(f, sympy.KroneckerDelta)])
            masked = sympy.Piecewise(*[(0, c) for c in earlier], (rest, condition), (0, True))
            terms.append(Term(term.coefficient, (*deltas, masked), term.summed))
        earlier.append(condition)
    return terms


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
    if is_factor(expr, scalars):
        return Term(sympy.Integer(1), (expr,), ())
    return Term(expr, (), ())


def _multiply(a: Term, b: Term) -> Term:
    """Product of two terms; summation indices of either that clash with the other's are renamed."""
    a = _rename_bound(a, _index_names(b))
    b = _rename_bound(b, _index_names(a))
    return Term(a.coefficient * b.coefficient, a.factors + b.factors, a.summed + b.summed)


def _index_names(term: Term) -> set[str]:
    """Every index name a term mentions, free or bound."""
    return set().union(*map(_factor_index_names, term.factors)) | {i.name for i in term.summed}


@functools.lru_cache(maxsize=8192)    # a factor recurs in every product that expanding a sum forms
def _factor_index_names(factor: sympy.Expr) -> frozenset[str]:
    return frozenset(i.name for i in factor.atoms(sympy.Idx))


def _rename_bound(term: Term, avoid: set[str], taken: set[str] | None = None) -> Term:
    """The term with each summed index named in `avoid` renamed to a fresh one: neither taken nor in `avoid`
    (`taken`: by default every index name the term mentions)."""
    factors, summed = term.factors, list(term.summed)
    taken = avoid | (_index_names(term) if taken is None else taken)
    for position, index in enumerate(summed):
        if index.name in avoid:
            fresh = fresh_index(index, taken)
            taken.add(fresh.name)
            factors = tuple(f.xreplace({index: fresh}) for f in factors)
            summed[position] = fresh
    return Term(term.coefficient, factors, tuple(summed))


def _eliminate_deltas(term: Term, op: OpSpec, name: str) -> Term | None:
    """Remove every KroneckerDelta from a term whatever the order of its sums; None if the term is zero."""
    factors, summed = list(term.factors), list(term.summed)
    while True:
        delta = next((d for f in factors for d in sympy.Mul.make_args(f) if isinstance(d, sympy.KroneckerDelta)), None)
        if delta is None:
            break
        a, b = delta.args[:2]
        folded = _fold_window(delta, summed, factors, op, name)
        if folded is not None:
            factors, summed = folded
            continue
        solved = _solve_affine(a, b, summed, factors) if a not in summed and b not in summed else None
        if solved is not None:
            old, new, guard = solved
            summed.remove(old)
            factors = [f.xreplace({delta: sympy.S.One}).xreplace({old: new}) for f in factors] + ([guard] if guard else [])
            if any(f == 0 for f in factors):
                return None
            factors = [f for f in factors if f != 1]
            continue
        if a in summed:
            old, new = a, b
        elif b in summed:
            old, new = b, a
        elif not (a - b).atoms(sympy.Indexed) and len((a - b).atoms(sympy.Idx)) > 1 and \
                any(not isinstance(i, sympy.Idx) for i in (a, b)):
            # no summed index with step 1 or -1 (a stride and a dilation both above 1, 2*t + 2*k): the
            # factors are folded back onto the positions the windows read, as a max's share is
            folded = _fold_window(delta, summed, factors, op, name, positional=False)
            if folded is not None:
                factors, summed = folded
                continue
            raise SpecError(f"the gradient of '{name}' needs the delta {delta} solved for a summed index, and "
                            f"no summed index has the coefficient 1 or -1 there: a stride and a dilation both "
                            f"above 1 (2*t + 2*k, 3*t + 2*k) are not supported", path=op.source, op=op.name)
        elif isinstance(a, sympy.Idx) != isinstance(b, sympy.Idx):
            # delta(idx[n], v) with v not summed: 1 where the integer tensor's value is v
            value, position = (b, a) if isinstance(a, sympy.Idx) else (a, b)
            factors = [f.xreplace({delta: one_hot(value, position)}) for f in factors]
            continue
        else:
            # between two free indices (a diagonal a[i, i] read): a mask of the positions where they are equal
            mask = sympy.Piecewise((1, sympy.Eq(a, b)), (0, True))
            factors = [f.xreplace({delta: mask}) for f in factors]
            continue
        summed.remove(old)
        replaced = []
        for factor in factors:
            factor = replace_index(factor, old, new) if isinstance(new, sympy.Idx) else factor.xreplace({old: new})
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


# factors that read an index as a position along which they look (the share of a max or min): an affine
# value (l - 2*t) cannot stand in for it
_POSITIONAL = (first_max, is_max, reaches, _OverIndex, _Extremum)


def _fold_window(delta, summed: list, factors: list, op: OpSpec, name: str, positional: bool = True):
    """delta(l, 2*t + k) with t and k summed, where a factor looks along t or k as positions (the share of a
    max over the window): every factor that has t or k becomes the value of one fold_window (the window's
    adjoint) at l, instead of k being solved as l - 2*t. With `positional` False, whatever the factors are: the
    delta no summed index solves (2*t + 2*k, a stride and a dilation both above 1). None: it is no such delta
    (two summed indices with positive integer steps, l not summed)."""
    a, b = delta.args[:2]
    position, subscript = (a, b) if isinstance(a, sympy.Idx) and a not in summed else (b, a)
    if not isinstance(position, sympy.Idx) or position in summed or isinstance(subscript, sympy.Idx) \
            or subscript.atoms(sympy.Indexed):
        return None
    indices = subscript.atoms(sympy.Idx)
    rest = [f for f in factors if not (f.atoms(sympy.Idx) & indices) and f != delta]
    moved = [f.xreplace({delta: sympy.S.One}) for f in factors if f.atoms(sympy.Idx) & indices]
    if not indices <= set(summed) or positional and not any(
            isinstance(node, _POSITIONAL) and node.atoms(sympy.Idx) & indices
            for f in moved for node in sympy.preorder_traversal(f)):
        return None
    coefficients = [subscript.coeff(i) for i in indices]
    if len(indices) != 2 or not all(c.is_Integer and c > 0 for c in coefficients):
        if not positional:
            return None
        raise SpecError(f"the gradient of '{name}' folds a max or min over the windows {subscript} back onto "
                        f"'{name}', which needs two indices, both with positive steps (2*t + k, t + 2*k, "
                        f"2*t + 2*k)", path=op.source, op=op.name)
    value = sympy.Mul(*moved)
    # the larger step leads; at equal steps the index a plain read carries (grad_y[n, c, t]) leads, so that
    # the one the max looks along is cut as the window
    carried = {i for f in moved for a in sympy.Mul.make_args(f) if isinstance(a, sympy.Indexed) for i in a.indices}
    outer, inner = sorted(indices, key=lambda i: (-subscript.coeff(i), i not in carried, i.name))
    return rest + [fold_window(value, subscript, position, sympy.Tuple(outer, inner))], \
        [i for i in summed if i not in indices]


def _solve_affine(a: sympy.Expr, b: sympy.Expr, summed: list, factors: list):
    """delta(t + k, l) with k summed: (k, l - t, guard), solving for a summed index with coefficient +-1 (the
    scatter of an affine read becomes a gather). The guard keeps k's range (in_range(l - t, size_k)) unless a
    factor reads some tensor at k, which reads zero outside it; None: it is no such delta."""
    difference = sympy.expand(a - b)
    if not difference.atoms(sympy.Idx) or difference.atoms(sympy.Indexed):
        return None
    candidates = [i for i in summed if isinstance(i, sympy.Idx) and difference.coeff(i) in (1, -1)
                  and not difference.coeff(i).atoms(sympy.Idx)]
    if not candidates:
        return None

    def carried(index) -> bool:
        return any(isinstance(part, sympy.Indexed) and index in part.indices
                   for f in factors for part in sympy.Mul.make_args(f))

    index = next((i for i in candidates if carried(i)), candidates[0])
    value = sympy.expand(index - difference / difference.coeff(index))
    guard = None if carried(index) else in_range(value, index.upper + 1)
    return index, value, guard


def _rename_primed(term: Term, primed: dict[str, sympy.Idx], op: OpSpec) -> Term:
    """Give the gradient the input's own index names, renaming sums that would capture them."""
    term = _rename_bound(term, set(primed), {s.name for s in term.to_expr().free_symbols}
                         | {i.name for i in term.summed})
    back = {p: index_symbol(d, op.size_of(d)) for d, p in primed.items()}
    return Term(term.coefficient, tuple(f.xreplace(back) for f in term.factors), term.summed)


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
