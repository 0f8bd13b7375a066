"""Forward values the backward reuses, as autograd saves them: a log-softmax, a normalization's mean and rstd.

`x[..., p] - logsumexp(x[..., c], c)` in a forward is the log-softmax of x, read at p (an
index, or a class gathered through an integer input as cross-entropy does). When a
gradient of the same op needs `softmax(x)` or `log_softmax(x)`, the forward computes
`saved_log_softmax = torch.log_softmax(x, dim)` once, reads its result from it, and hands it
to the backward, as autograd saves its log_softmax output; the backward then reads
`exp(saved)` for the softmax, and its VJP shape `g - exp(saved) * sum(g)` becomes PyTorch's
fused `_log_softmax_backward_data`. Without such a gradient, an index-position log-softmax
in the forward is still printed as one `torch.log_softmax` (see `kernels.fuse_log_softmax`).

Likewise a forward that spells out a normalization over any set of dims R, (x - m) * r with
m = mean(x, R) and r = (e + mean((x - m)**2, R))**(-1/2), saves `saved_mean` and `saved_rstd`
(an RMS norm, x * r with r = (e + mean(x**2, R))**(-1/2), `saved_rstd` alone): for a native
kernel's VJP (`save_normalization`), or for the formulas (`save_statistics`).

Each function here is the `save` of a record in `kernels.KERNELS`: only the contraction style saves
(it fuses); the broadcast style keeps every formula. The fused style saves also the chains of transcendental
functions its compiled backward would evaluate again (`save_function_values`, applied by pipeline.build_op).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from . import naming
from .derivation import Derivation, Term, tensor_symbols
from .functions import (Sum, Tied, _Extremum, _OverIndex, bound_indices, canonical, first_max, first_min_position,
                        first_position, fold_window, free_indices, log_softmax, logsumexp, one_hot, renamed_match,
                        rewrite_log_softmax, sigmoid, softmax, softplus)
from .model import index_symbol, tensor_symbol


@dataclass(frozen=True)
class Adjoint:
    """How the autograd.Function returns a saved value as a differentiable output of its own (as autograd saves
    log_softmax's result, whose node a double backward goes through), so that it keeps no input to compute the
    value again: the value's gradient and tangent, in terms of the value and the one input it is a function of."""

    input: str       # the input the value is computed from: logits
    vjp: str         # Python: that input's share of `grad_<value>`, a gradient reaching the value
    tangent: str     # Python: the value's tangent, given `tangent_<input>` (not None) and the input
    meaning: str     # what the vjp's kernel computes, for the comment above it


@dataclass(frozen=True)
class SavedValue:
    """A tensor the forward computes, returns alongside its result, and the backward reads."""

    name: str                    # variable in both functions: saved_log_softmax
    expr: sympy.Expr             # what it holds, in the op's indices: log_softmax(logits[n, c], c)
    indices: tuple[str, ...]     # its dims (those of the tensor it normalizes)
    # A double backward differentiates the backward. Where the backward reads a value through
    # plain tensor ops, the value must be computed again from the inputs so that the graph sees
    # through it; where only fused kernels read it, their own double backward accounts for it
    # (a kernel that refuses a value that requires grad takes it detached).
    recompute: bool = True
    adjoint: Adjoint | None = None   # the Function returns it as a differentiable output: it recomputes nothing


@dataclass(frozen=True)
class Saving:
    """Forward values a kernel needs, and the op's terms rewritten to read them."""

    values: tuple[SavedValue, ...]
    forward: list[Term]              # the forward's terms, reading the values
    gradients: list[list[Term]]      # each gradient's terms, reading them
    found: tuple = ()                # what the kernel's matcher needs to know of them (for layer norm:
                                     # x[..., d], d and the saved mean and rstd as accesses)


def save_forward_values(forward: list[Term], gradients: list[list[Term]]) -> Saving | None:
    """The log-softmax of each input whose softmax a gradient reads, saved by the forward."""
    bodies = _log_softmax_bodies(forward)
    needed = [b for b in bodies if any(_uses_softmax_of(t, b) for terms in gradients for t in terms)]
    if not needed:
        return None
    saved = []
    labels = [body.base.label.name for body, _ in needed]
    for body, index in needed:
        name = naming.SAVED_PREFIX + "log_softmax"
        if len(needed) > 1:      # one per input, and per dim when an input has two
            name += "_" + body.base.label.name + ("_" + index.name if labels.count(body.base.label.name) > 1 else "")
        value = SavedValue(name, log_softmax(body, index), tuple(i.name for i in body.indices),
                           adjoint=_log_softmax_adjoint(name, body, index))
        reading = _read_forward(forward, value, body, index)
        if reading == forward:      # the forward never forms x - logsumexp(x): nothing to save
            continue
        forward = reading
        gradients = [[_read_gradient(t, value, body, index) for t in terms] for terms in gradients]
        saved.append(value)
    return Saving(tuple(saved), forward, gradients) if saved else None


def _log_softmax_adjoint(name: str, body: sympy.Indexed, index: sympy.Idx) -> Adjoint:
    """log_softmax(x, dim)'s own derivatives, read off its result: g - exp(s) * sum(g, dim), t - sum(softmax(x) * t, dim)."""
    position = list(body.indices).index(index)
    batch_before = any(i.name == naming.BATCH for i in body.indices[:position])
    dim = position - len(body.indices) if batch_before else position
    source = body.base.label.name
    tangent = naming.tangent(source)
    return Adjoint(source, f"torch._log_softmax_backward_data({naming.grad(name)}, {name}, {dim}, {name}.dtype)",
                   f"{tangent} - (torch.softmax({source}, {dim}) * {tangent}).sum({dim}, keepdim=True)",
                   "_log_softmax_backward_data(g, y, dim) = g - exp(y) * sum(g, dim)")


def _log_softmax_bodies(forward: list[Term]) -> list[tuple[sympy.Indexed, sympy.Idx]]:
    """(x[..., c], c) for each plain input access x whose log-softmax the forward spells out."""
    found = []
    for expr in [f for t in forward for f in t.factors]:
        for lse in expr.atoms(logsumexp):
            body = lse.body
            if isinstance(body, sympy.Indexed) and all(isinstance(i, sympy.Idx) for i in body.indices) \
                    and (body, lse.index) not in found:
                found.append((body, lse.index))
    return found


def _uses_softmax_of(term: Term, body_index) -> bool:
    body, index = body_index
    return any(_same(f, body, index) for factor in term.factors
               for f in factor.atoms(softmax, log_softmax, logsumexp))


def _same(function, body, index) -> bool:
    """Whether softmax/log_softmax/logsumexp `function` works on `body` along `index`, under any index names."""
    return function.index.upper == index.upper and function.body == body.xreplace({index: function.index})


def _read_forward(terms: list[Term], value: SavedValue, body, index) -> list[Term]:
    """x[..., p] - logsumexp(x[..., c], c) -> saved[..., p], inside a factor or across two terms."""
    def at(position):
        return tensor_symbol(value.name)[tuple(position if i == index else i for i in body.indices)]

    def read(lse, access):
        position = _position(access, body, index) if _same(lse, body, index) else None
        return None if position is None else at(position)

    terms = [signs_out(replace(t, factors=tuple(rewrite_log_softmax(f, read) for f in t.factors))) for t in terms]
    for lse_term in terms:
        if len(lse_term.factors) != 1 or not isinstance(lse_term.factors[0], logsumexp) \
                or not _same(lse_term.factors[0], body, index):
            continue
        for other in terms:
            position = _position(other.factors[0], body, index) if len(other.factors) == 1 else None
            if position is not None and other.coefficient == -lse_term.coefficient \
                    and other.summed == lse_term.summed:
                merged = replace(other, factors=(at(position),))
                return [merged if t is other else t for t in terms if t is not lse_term]
    return terms


def _position(access, body: sympy.Indexed, index: sympy.Idx):
    """p when `access` is body with its class index at p (an index or a gathered class), else None."""
    if not isinstance(access, sympy.Indexed) or access.base != body.base:
        return None
    where = list(body.indices).index(index)
    position = access.indices[where]
    return position if body.xreplace({index: position}) == access else None


def _read_gradient(term: Term, value: SavedValue, body, index) -> Term:
    """softmax(x) -> exp(saved), log_softmax(x) and x - logsumexp(x) -> saved, in every factor."""
    def at(function):
        return tensor_symbol(value.name)[tuple(function.index if i == index else i for i in body.indices)]

    def rewrite(expr):
        expr = expr.replace(lambda e: isinstance(e, softmax) and _same(e, body, index), lambda e: sympy.exp(at(e)))
        return expr.replace(lambda e: isinstance(e, log_softmax) and _same(e, body, index), at)

    (term,) = _read_forward([replace(term, factors=tuple(rewrite(f) for f in term.factors))], value, body, index)
    return term


def signs_out(term: Term) -> Term:
    """A number a rewrite left in front of a factor joins the coefficient: no full-size negation."""
    split = [f.as_coeff_Mul() for f in term.factors]
    return replace(term, coefficient=term.coefficient * sympy.Mul(*[number for number, _ in split]),
                   factors=tuple(f for _, f in split))


# Normalization statistics ------------------------------------------------------------------------

def save_normalization(forward: list[Term], gradients: list[list[Term]]) -> Saving | None:
    """Mean and rstd of a normalization the forward spells out, over any set of dims R, saved for a native kernel.

    With m = sum(x, R) / D and r = (e + sum((x - m)**2, R) / D)**(-1/2) in the forward (e index-free), the
    forward computes `saved_mean` and `saved_rstd` once and reads them; the backward reads them wherever the
    same sums occur (r**3 included). The kernel takes them detached, its own derivative accounting for them;
    formulas that read them too (a weight gradient the kernel does not give) read them as plain tensors, so a
    double backward computes them again from the inputs (`recompute=True`). The record drops the saving
    when no gradient calls its kernel (`Kernel.needs_call`): the next records try.
    """
    found = _normalization(forward)
    if found is None or found[3] is False:
        return None
    return _saving(found, forward, gradients, recompute=True)


def save_statistics(forward: list[Term], gradients: list[list[Term]]) -> Saving | None:
    """The statistics of any normalization the forward spells out, over any set of dims R, centered (x - m) or
    not (RMS), saved for the backward's formulas: `saved_mean` (when centered) and `saved_rstd`, computed once;
    the centered input is then one shared value of the backward, and every term holding a sum over R of the
    centered input, which is identically 0, is dropped. The formulas read them as plain tensors, so a double
    backward computes them again from the inputs (`recompute=True`)."""
    found = _normalization(forward)
    return None if found is None else _saving(found, forward, gradients, recompute=True)


def _saving(found, forward: list[Term], gradients: list[list[Term]], recompute: bool) -> Saving:
    body, dims, base, centered = found
    kept = tuple(i for i in body.indices if i not in dims)
    batch = tuple(i.name for i in kept)
    size = sympy.Mul(*[i.upper + 1 for i in dims])
    r = tensor_symbol(naming.SAVED_PREFIX + "rstd")[kept]
    values = []
    if centered:
        mean = SavedValue(naming.SAVED_PREFIX + "mean", _mean_sum(body, dims) / size, batch, recompute=recompute)
        m = tensor_symbol(mean.name)[kept]
        values.append(mean)
    else:
        m = None
    rstd = SavedValue(naming.SAVED_PREFIX + "rstd", _with_mean(base, body, dims, m) ** sympy.Rational(-1, 2), batch,
                      recompute=recompute)
    values.append(rstd)

    def reading(term: Term) -> Term | None:
        factors = []
        for factor in term.factors:
            factor = _with_mean(factor, body, dims, m)
            factor = factor.replace(lambda e: isinstance(e, sympy.Pow) and _same_base(e.base, base, body, dims, m),
                                    lambda e: r ** (-2 * e.exp))
            factors.append(factor)
        term = replace(term, factors=tuple(factors))
        return None if centered and _sums_centered(term, body, dims, m) else term

    def read(terms: list[Term]) -> list[Term]:
        return [t for t in (reading(t) for t in terms) if t is not None]

    return Saving(tuple(values), read(forward), [read(terms) for terms in gradients],
                  found=(body, dims, m, r))


def _sums_centered(term: Term, body, dims, m) -> bool:
    """Whether a factor of `term` is x - m over copies of the normalized dims that the term sums and no other
    factor reads: its sum over them, sum(x) - D * m, is identically 0."""
    for factor in term.factors:
        others = set().union(*[f.atoms(sympy.Idx) for f in term.factors if f is not factor])
        for copy in _renamings(dims, [i for i in term.summed if i not in others]):
            if factor == body.xreplace(copy) - m:
                return True
    return False


def _renamings(dims, candidates):
    """Each map of the normalized dims to distinct `candidates` of the same sizes."""
    if not dims:
        yield {}
        return
    first, rest = dims[0], dims[1:]
    for candidate in candidates:
        if candidate.upper == first.upper:
            for more in _renamings(rest, [c for c in candidates if c != candidate]):
                yield {first: candidate, **more}


def _normalization(forward: list[Term]):
    """(x[...], normalized dims R, variance base, centered) for the first normalization in the forward, or None:
    base = e + sum(s**2, R) / |R| with s = x - sum(x, R) / |R| (centered) or s = x (RMS), e index-free."""
    for factor in (f for t in forward for f in t.factors):
        for power in factor.atoms(sympy.Pow):
            if power.exp != -sympy.S.Half:
                continue
            constant, variance = power.base.as_independent(sympy.Sum, as_Add=True)
            coefficient, total = variance.as_independent(sympy.Sum, as_Add=False)
            if constant.atoms(sympy.Indexed) or not isinstance(total, sympy.Sum):
                continue
            dims = tuple(limit[0] for limit in total.limits)
            square = total.function
            size = sympy.Mul(*[i.upper + 1 for i in dims])
            if not (isinstance(square, sympy.Pow) and square.exp == 2) or coefficient != 1 / size:
                continue
            if isinstance(square.base, sympy.Indexed) and set(dims) <= set(square.base.indices) \
                    and len(square.base.indices) > len(dims) and all(isinstance(i, sympy.Idx) for i in square.base.indices):
                return square.base, dims, power.base, False      # RMS: no centering
            for inner in square.base.atoms(sympy.Sum):
                for copy in _renamings(tuple(limit[0] for limit in inner.limits), list(dims)):
                    body = inner.function.xreplace(copy)
                    if isinstance(body, sympy.Indexed) and set(dims) <= set(body.indices) \
                            and len(body.indices) > len(dims) and all(isinstance(i, sympy.Idx) for i in body.indices) \
                            and sympy.expand(square.base - (body - _mean_sum(body, dims) / size)) == 0:
                        return body, dims, power.base, True
    return None


def _mean_sum(body: sympy.Indexed, dims) -> sympy.Sum:
    return Sum(body, *[(i, 0, i.upper) for i in dims])


def _with_mean(expr: sympy.Expr, body, dims, m) -> sympy.Expr:
    """Every sum(x[...], R) read as |R| * saved_mean (nothing to read without a mean)."""
    if m is None:
        return expr
    size = sympy.Mul(*[i.upper + 1 for i in dims])

    def is_mean_sum(e):
        if not isinstance(e, sympy.Sum) or len(e.limits) != len(dims):
            return False
        bound = [limit[0] for limit in e.limits]
        return any(e.function == body.xreplace(copy) for copy in _renamings(dims, bound))
    return expr.replace(is_mean_sum, lambda e: size * m)


def _same_base(candidate, base, body, dims, m) -> bool:
    return canonical(candidate) == canonical(_with_mean(base, body, dims, m))


# Values that cost a contraction or a reduction to recompute ---------------------------------------

def save_reduced_values(forward: list[Term], gradients: list[list[Term]]) -> Saving | None:
    """Each forward value that a gradient reads again and whose recompute needs a contraction or a reduction over
    a function (`_costly`), saved by the forward: attention's P = softmax(sum(q * k, d) * s, s), tanh(sum(x * w, k)).

    A value is the largest subexpression of a forward factor that applies a function (softmax, tanh, exp, ...) to
    such a reduction and that a gradient reads, under any names of its free indices (softmax's index last in its
    dims, as the kernels read it). The forward and the gradients then read `saved_<function>` instead. Plain
    formulas read it, so a double backward computes it again from the inputs (`recompute=True`). A value that is
    the whole forward (the result itself) is not saved beside it."""
    found: list[tuple[sympy.Expr, tuple[sympy.Idx, ...]]] = []
    for factor in (f for t in forward for f in t.factors):
        for value in _reduced_values(factor, gradients):
            if not any(_renaming(known, dims, value) is not None for known, dims in found):
                found.append((value, _value_dims(value)))
    if not found:
        return None
    values, read = _saved_reads(found)

    def reading(terms: list[Term]) -> list[Term]:
        return [replace(t, factors=tuple(read(f) for f in t.factors)) for t in terms]

    read_forward = reading(forward)
    if len(read_forward) == 1 and not read_forward[0].summed and len(read_forward[0].factors) == 1 \
            and read_forward[0].factors[0].func == sympy.Indexed \
            and read_forward[0].factors[0].base.label.name in {v.name for v in values}:
        return None
    return Saving(tuple(values), read_forward, [reading(terms) for terms in gradients])


def _largest_read(expr: sympy.Expr, gradients: list[list[Term]], wanted):
    """The largest subexpressions of `expr` for which `wanted` holds and that a gradient reads, under any names
    of their indices."""
    if wanted(expr):
        dims = _value_dims(expr)
        if any(_renaming(expr, dims, e) is not None for terms in gradients for t in terms for f in t.factors
               for e in sympy.preorder_traversal(f) if isinstance(e, sympy.Basic) and e.func == expr.func):
            yield expr
            return
    for arg in expr.args:
        if isinstance(arg, sympy.Expr) and not isinstance(arg, sympy.Indexed):
            yield from _largest_read(arg, gradients, wanted)


def _reduced_values(expr: sympy.Expr, gradients: list[list[Term]]):
    """The largest subexpressions of `expr` that apply a function to a costly reduction and that a gradient reads."""
    return _largest_read(expr, gradients, lambda e: isinstance(e, sympy.Function) and not isinstance(
        e, (sympy.Sum, _Extremum)) and _costly(e) and not _sums_the_batch(e))


def _costly(expr: sympy.Expr) -> bool:
    """Whether `expr` holds a reduction whose body is more than one tensor access: a contraction (sum(q * k, d)) or
    a reduction over a function (softmax's exp and sum of a scaled score)."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.Sum, _OverIndex, _Extremum)) and node.args[0].atoms(sympy.Indexed) \
                and not isinstance(node.args[0], sympy.Indexed):
            return True
    return False


def _sums_the_batch(expr: sympy.Expr) -> bool:
    """Whether a reduction inside `expr` binds the batch dims `...`: such a value is left to the formulas, which
    read it where the batch dims lead (a saved value of its own dims would hold them in the middle)."""
    return any(naming.BATCH in bound_indices(node) for node in sympy.preorder_traversal(expr)
               if isinstance(node, (sympy.Sum, _OverIndex, _Extremum)))


def _value_dims(value: sympy.Expr) -> tuple[sympy.Idx, ...]:
    """A value's free indices, in the order its accesses read them, the batch dims first (they must lead) and
    the index a softmax is along last."""
    free = free_indices(value)
    dims = []
    for access in sorted(value.atoms(sympy.Indexed), key=sympy.default_sort_key):
        dims += [i for i in access.indices if isinstance(i, sympy.Idx) and i.name in free and i not in dims]
    dims.sort(key=lambda i: i.name != naming.BATCH)
    if isinstance(value, _OverIndex) and value.index in dims:
        dims = [i for i in dims if i != value.index] + [value.index]
    return tuple(dims)


def _renaming(value: sympy.Expr, dims: tuple, candidate: sympy.Expr):
    """The indices of `candidate` that `value`'s dims are renamed to for the two to be equal, or None."""
    if not isinstance(candidate, sympy.Expr) or candidate.func != value.func:
        return None
    return renamed_match(value, dims, candidate)


# Chains of elementwise functions, for the fused style -----------------------------------------------

# The functions whose evaluation is a transcendental kernel (a polynomial or rational approximation, tens of
# flops an element): what a backward recomputing a forward value pays for, where its loads and stores are a
# few bytes an element.
TRANSCENDENTAL = (sympy.exp, sympy.log, sympy.erf, sympy.functions.elementary.hyperbolic.HyperbolicFunction,
                  sympy.functions.elementary.trigonometric.TrigonometricFunction,
                  sympy.functions.elementary.trigonometric.InverseTrigonometricFunction, sigmoid, softplus)
# The fused style saves a value whose recompute evaluates more than this many of them: its backward is one
# compiled loop whose loads cost little beside them (mish's tanh(softplus(x)), measured: the backward without
# the chain is 0.7x torch.compile's step, which recomputes it), while one function (gelu's erf, silu's
# sigmoid) is cheaper recomputed than stored and loaded (see README, "The fused style").
FUSED_SAVE_ABOVE_FUNCTIONS = 1


def _saved_reads(found: list[tuple[sympy.Expr, tuple[sympy.Idx, ...]]], taken: set[str] = frozenset()):
    """The SavedValues of `found` (value, its dims), each named for the function it applies (`saved_tanh`;
    `saved_tanh_<k>` where several apply it or the name is `taken`), and `read`: an expression with every
    occurrence of one of them, under any names of its indices, read from its saved name."""
    values, reads = [], []
    for k, (value, dims) in enumerate(found):
        stem = naming.SAVED_PREFIX + type(value).__name__.lower()
        name = stem if [type(v) for v, _ in found].count(type(value)) == 1 and stem not in taken else f"{stem}_{k}"
        values.append(SavedValue(name, value, tuple(i.name for i in dims)))
        reads.append((value, dims, tensor_symbol(name)))

    def read(expr: sympy.Expr) -> sympy.Expr:
        for value, dims, saved in reads:
            expr = expr.replace(lambda e: _renaming(value, dims, e) is not None,
                                lambda e: saved[_renaming(value, dims, e)])
        return expr
    return values, read


def save_function_values(derivation: Derivation) -> Derivation:
    """The fused style's derivation: each forward value that a gradient reads again and whose recompute
    evaluates a chain of more than FUSED_SAVE_ABOVE_FUNCTIONS transcendental functions of the inputs,
    elementwise (mish's tanh(softplus(x))), saved by the forward as `saved_<function>` and read by both.

    A value is the largest subexpression of a forward factor that applies such a function, holds no reduction
    and reads inputs at plain indices, and that a gradient reads under any names of its free indices; not the
    whole result (`read_output` reads that). Plain formulas read it, so a double backward computes it again
    from the inputs (`recompute=True`). The contraction style recomputes them: an eager backward pays a few
    kernels for them, and keeps half the memory (README, "Composite ops"). The op's `saving` key: "recompute"
    saves none, "save" every such value of one function or more."""
    above = {"auto": FUSED_SAVE_ABOVE_FUNCTIONS, "save": 0}.get(derivation.op.saving)
    if above is None:
        return derivation
    forward = list(derivation.forward_terms)
    gradients = [list(g.terms) for g in derivation.gradients]
    found: list[tuple[sympy.Expr, tuple[sympy.Idx, ...]]] = []
    for factor in (f for t in forward for f in t.factors):
        for value in _function_chains(factor, gradients, above):
            if not any(_renaming(known, dims, value) is not None for known, dims in found) and \
                    not any(_renaming(v.expr, _value_dims(v.expr), value) is not None for v in derivation.saved):
                found.append((value, _chain_dims(value)))
    if not found:
        return derivation
    values, read = _saved_reads(found, {v.name for v in derivation.saved})

    def reading(terms) -> tuple[Term, ...]:
        return tuple(replace(t, factors=tuple(read(f) for f in t.factors)) for t in terms)

    read_forward = reading(forward)
    if len(read_forward) == 1 and not read_forward[0].summed and len(read_forward[0].factors) == 1 \
            and read_forward[0].factors[0].func == sympy.Indexed:
        return derivation      # the value is the result itself
    return replace(derivation, forward_terms=read_forward, saved=derivation.saved + tuple(values),
                   gradients=tuple(replace(g, terms=reading(g.terms)) for g in derivation.gradients))


def _function_chains(expr: sympy.Expr, gradients: list[list[Term]], above: int):
    """The largest subexpressions of `expr` that evaluate more than `above` transcendental functions
    elementwise and that a gradient reads."""
    # (a chain with no dims, of constants or 0-d tensors, costs a few scalar evaluations: never saved)
    return _largest_read(expr, gradients, lambda e: isinstance(e, TRANSCENDENTAL) and _elementwise(e) and free_indices(
        e) and sum(isinstance(n, TRANSCENDENTAL) for n in sympy.preorder_traversal(e)) > above)


def _chain_dims(value: sympy.Expr) -> tuple[sympy.Idx, ...]:
    """A chain's free indices in the order of its widest read (x[n, d] in tanh(x[n, d] + b[d])), where the
    forward's broadcast computes it, the batch dims first."""
    free = free_indices(value)
    accesses = sorted(value.atoms(sympy.Indexed), key=lambda a: (-len({i.name for i in a.indices} & free),
                                                                 sympy.default_sort_key(a)))
    dims: list[sympy.Idx] = []
    for access in accesses:
        dims += [i for i in access.indices if i.name in free and i not in dims]
    return tuple(sorted(dims, key=lambda i: i.name != naming.BATCH))


def _elementwise(expr: sympy.Expr) -> bool:
    """Whether `expr` is numbers, sums, products and powers of plain reads (every index a plain one) and of the
    TRANSCENDENTAL functions: one loop over its dims computes it."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Indexed):
            if not all(isinstance(i, sympy.Idx) for i in node.indices):
                return False
        elif isinstance(node, sympy.Function) and not isinstance(node, TRANSCENDENTAL):
            return False
    return True


# Positions of a max(..., tie="first") -----------------------------------------------------------------

def save_first_positions(forward: list[Term], gradients: list[list[Term]]) -> Saving | None:
    """Where each max (min) with tie="first" of the forward is reached, saved for the backward, as autograd saves
    the indices of torch.max(x, dim) and of max pooling.

    For m = max(body, k, tie="first") in the forward over a window (a pool, max(x[n, c, s*t + k], k)), the share
    first_max(body, k') (1 at the first maximal position along k', the same body under any name of k) of a
    gradient folded back onto the input (fold_window) reads `saved_argmax`, the forward's first_position(body,
    k, s*t + e), each window's first maximum as a position of the input, as one_hot(saved_argmax[...] - s*t - e,
    k'): the windows are then never cut and reduced again, and the gradient is one scatter_add at the saved
    positions. A share outside a window's fold (torch.max(x, dim)'s) keeps its
    formula, one argmax of the input the backward has. The positions are integers: no gradient
    flows through them, and a double backward computes them again from the inputs (`recompute=True`)."""
    extrema = []
    for factor in (f for t in forward for f in t.factors):
        for extremum in sorted(factor.atoms(_Extremum), key=sympy.default_sort_key):
            if extremum.first and extremum not in extrema:
                extrema.append(extremum)
    values, reads = [], []
    for extremum in extrema:
        index = extremum.indices[0]
        start = _start(extremum.body, index)
        position = (first_position if extremum.largest else first_min_position)(extremum.body, index, start)
        kept = _first_appearance(extremum.body, free_indices(position))
        if not kept:
            continue     # a window always keeps its start (t)
        name = naming.SAVED_PREFIX + ("argmax" if extremum.largest else "argmin")
        if len(extrema) > 1:
            name += f"_{len(values)}"
        value = SavedValue(name, position, tuple(i.name for i in kept))
        reads.append((extremum, tensor_symbol(name)[kept] - start))
        values.append(value)

    def saved(share):
        for extremum, access in reads:
            if share.largest == extremum.largest and \
                    share.body == extremum.body.xreplace({extremum.indices[0]: share.index}):
                return one_hot(access, share.index)
        return share

    def separable(fold: fold_window) -> bool:
        # the scatter_add at the saved positions adds what multiplies the share once per window: a value that
        # also varies along the window (a function's derivative at each position, min(sigmoid(x[..]), k))
        # keeps its formulas
        inner = fold.cut()[1]
        rest = [f for f in sympy.Mul.make_args(fold.value) if not isinstance(f, first_max)]
        return all(inner.name not in free_indices(f) for f in rest)

    def read(expr: sympy.Expr) -> sympy.Expr:
        return expr.replace(lambda e: isinstance(e, fold_window) and separable(e), lambda fold: fold.func(
            fold.value.replace(lambda e: isinstance(e, first_max), saved), *fold.args[1:]))

    def reading(term: Term) -> Term:
        # a term with the shares of two extrema (a max over two indices, nested) keeps its formulas: the
        # scatter_add of a window reads one saved position
        shares = [s for f in term.factors for s in f.atoms(first_max)]
        return term if len(shares) > 1 else replace(term, factors=tuple(read(f) for f in term.factors))

    rewritten = [[reading(t) for t in terms] for terms in gradients]
    used = {a.base.label.name for terms in rewritten for t in terms for f in t.factors for a in f.atoms(sympy.Indexed)}
    values = [v for v in values if v.name in used]
    return Saving(tuple(values), forward, rewritten) if values else None


def _start(body: sympy.Expr, index: sympy.Idx) -> sympy.Expr:
    """Where the window along `index` starts in the input its read reads, s*t + e of x[n, c, s*t + k + e] (one
    other index, k's step 1), or 0: the positions are then counted from the window's start."""
    subscripts = {i for a in body.atoms(sympy.Indexed) for i in a.indices if index in i.atoms(sympy.Idx)}
    if len(subscripts) != 1:
        return sympy.S.Zero
    (subscript,) = subscripts
    start = subscript.subs(index, 0)
    if subscript.coeff(index) != 1 or len(start.atoms(sympy.Idx)) != 1:
        return sympy.S.Zero
    return start


def _first_appearance(body: sympy.Expr, names: set[str]) -> tuple[sympy.Idx, ...]:
    """The indices of `body` named in `names`, in the order its reads carry them (within an affine subscript,
    the one with the largest step first: t before k in 2*t + k)."""
    found: list[sympy.Idx] = []
    for access in sorted(body.atoms(sympy.Indexed), key=sympy.default_sort_key):
        for subscript in access.indices:
            for index in sorted(subscript.atoms(sympy.Idx), key=lambda i: (-abs(subscript.coeff(i)), i.name)):
                if index.name in names and index not in found:
                    found.append(index)
    return tuple(found)


# Save or recompute -------------------------------------------------------------------------------

# The cost rule. A forward value that a kernel reads (a log-softmax, a normalization's statistics) is either saved
# by the forward or recomputed by the backward from the inputs, which the Function then keeps instead. Its cost of
# recomputing, in elementwise passes over the input it comes from (a reduction is a pass, an elementwise
# function of it another):
RECOMPUTE_PASSES = {
    save_forward_values: 4,   # log_softmax(x): max over c, x - max, exp and its sum over c, log and subtract
    save_normalization: 3,    # mean and rstd: a sum over d, the squares of x - mean and their sum, rsqrt
    # a function of a contraction (a matrix product, as many multiply-adds per element as the contracted dims hold)
    # or of a reduction over a function (softmax of scores: 4 passes, after the function's own)
    save_reduced_values: 5,
    # argmax along k: one reduction, but over strided windows (a pool's) a slow one (3x autograd's whole max pool
    # backward on CPU, which reads the indices its forward saved)
    save_first_positions: 3,
}
# and the line: "auto" saves a value that costs more than this many passes to recompute, as autograd saves
# log_softmax's result and native_layer_norm's mean and rstd; one element-wise pass or two (a sigmoid, a product)
# is recomputed, as the generated code always recomputes elementwise functions of the inputs (gelu's erf, silu's
# sigmoid) instead of keeping them.
SAVE_ABOVE_PASSES = 2


def worth_saving(op, save) -> bool:
    """Whether the op saves the values that `save` (a kernel's save function) finds, by the op's `saving` key:
    "save" always, "recompute" never (the least memory where the values would be kept beside the inputs they come
    from: layer norm's statistics), "auto" (the default) by the cost rule above."""
    if op.saving == "auto":
        return RECOMPUTE_PASSES.get(save, SAVE_ABOVE_PASSES + 1) > SAVE_ABOVE_PASSES
    return op.saving == "save"


# Reading the output instead of the inputs ---------------------------------------------------------

def read_output(derivation: Derivation) -> Derivation:
    """The gradients rewritten to read the forward's result instead of an input, where SymPy proves it equal
    and the Function then saves less (or the same, with the output instead of an input: the next op, a linear
    layer or another activation, usually saves that output too, so it is stored once, as autograd stores it).

    Two rules, for a forward that is elementwise (it reads its inputs at the output's indices and sums nothing),
    with y = F(s) where s is a subexpression holding every read of the inputs (the inputs themselves included):

    - a value: where F(w) = c * w (c a number or params), each occurrence of s in a gradient becomes y / c
      (`exp(x)` -> `y`, `tanh(3*x)` -> `y / 2` for y = 2*tanh(3*x)); no inverse function is introduced (no log(y),
      no atanh(y)), nor a subtraction, so nothing is lost to rounding;
    - a kink: a step or comparison of a(s), linear in s with its surface at s = w0, becomes the same of
      y - F(w0) when SymPy proves both take the same value at w0, and above and below it for every distance
      (`x <= 0` -> `y <= 0` for y = relu(x), its gradient at 0 unchanged; not for Max(x, 0, tie=1), whose
      gradient at 0 is 1 while y = 0 cannot tell x = 0 from x < 0, nor for a leaky relu of a symbolic slope).

    The op keeps its own gradients when no rewrite frees an input, or when the output would join inputs that
    are still read (`_cheaper`).
    """
    op = derivation.op
    reads = _elementwise_reads(derivation.forward, op)
    if reads is None:
        return derivation
    output = tensor_symbol(op.output)[tuple(index_symbol(i, op.size_of(i)) for i in op.output_indices)]
    rewrite = _OutputReader(derivation.forward, output, reads)
    gradients = [replace(g, vjp=rewrite(g.vjp),
                         terms=tuple(replace(t, factors=tuple(rewrite(f) for f in t.factors)) for t in g.terms))
                 for g in derivation.gradients]
    before, after = (_value_reads(gs, op) for gs in (derivation.gradients, gradients))
    if not _cheaper(op, before, after):
        return derivation
    tangents = []
    for tangent in derivation.tangents:
        rewritten = replace(tangent, jvp=rewrite(tangent.jvp),
                            terms=tuple(replace(t, factors=tuple(rewrite(f) for f in t.factors)) for t in tangent.terms))
        freed = _value_reads([rewritten], op) <= after
        tangents.append(rewritten if freed else tangent)
    return replace(derivation, gradients=tuple(gradients), tangents=tuple(tangents))


def _elementwise_reads(forward: sympy.Expr, op) -> frozenset | None:
    """The input accesses of an elementwise forward (every one at the output's indices, nothing summed), or None."""
    if not op.output_indices or forward.has(sympy.Sum, _OverIndex, _Extremum, sympy.KroneckerDelta):
        return None
    indices = tuple(index_symbol(i, op.size_of(i)) for i in op.output_indices)
    accesses = forward.atoms(sympy.Indexed)
    if not accesses or any(a.indices != indices for a in accesses) or forward.free_symbols & tensor_symbols(op):
        return None
    return frozenset(accesses)


def _value_reads(gradients, op) -> frozenset[str]:
    """The tensors whose values the gradients' terms read (the upstream gradient left out)."""
    upstream = {naming.grad(op.output)} | {naming.tangent(t.name) for t in op.inputs}
    return frozenset(a.base.label.name for g in gradients for t in g.terms for f in t.factors
                     for a in f.atoms(sympy.Indexed)) - upstream


def _cheaper(op, before: frozenset[str], after: frozenset[str]) -> bool:
    """Whether the Function saves less reading `after` than `before`: an input is freed, and the output joins
    only in place of an input at least its size."""
    removed, added = before - after, after - before
    if not removed or not added <= {op.output}:
        return False
    return not added or any(set(op.input(name).indices) >= set(op.output_indices) for name in removed)


class _OutputReader:
    """Rewrites an expression's reads of the inputs into reads of the output (see read_output)."""

    def __init__(self, forward: sympy.Expr, output: sympy.Indexed, reads: frozenset):
        self.forward = _untied(forward)
        self.output = output
        self.reads = reads
        self.w = sympy.Dummy("w", real=True)
        # every subexpression that holds all the reads, the largest first, with the forward as F(w) of it
        self.cores = {}
        for core in _subexpressions(self.forward):
            outer = _replaced(self.forward, core, self.w)
            if outer is not None and not outer.atoms(sympy.Indexed):
                self.cores[core] = outer
        # y = c * core: the core is y / c
        self.values = {}
        for core, outer in self.cores.items():
            coefficient, rest = outer.as_independent(self.w, as_Add=False)
            if rest == self.w and coefficient != 0 and not coefficient.atoms(sympy.Indexed) \
                    and not coefficient.has(sympy.Function):
                self.values[core] = output / coefficient

    def __call__(self, expr: sympy.Expr) -> sympy.Expr:
        if not expr.atoms(sympy.Indexed) & self.reads:
            return expr
        expr = expr.replace(lambda e: isinstance(e, (sympy.Heaviside, sympy.core.relational.Relational))
                            and self._kink(e) is not None, lambda e: self._kink(e))
        return expr.xreplace(self.values) if self.values else expr

    def _kink(self, node):
        """The step or comparison `node` of a(core), read as the same of y - F(w0); None when not proved."""
        if not node.atoms(sympy.Indexed) & self.reads:
            return None
        argument = node.args[0] if isinstance(node, sympy.Heaviside) else node.lhs - node.rhs
        for core, outer in self.cores.items():
            a = _replaced(argument, core, self.w)
            if a is None or a.atoms(sympy.Indexed) & self.reads:
                continue
            slope = a.diff(self.w)
            if not slope.is_number or slope == 0 or a.diff(self.w, 2) != 0:
                return None        # only a surface a = slope * (w - w0)
            root = sympy.simplify(-a.xreplace({self.w: 0}) / slope)
            surface = self.output - outer.xreplace({self.w: root})
            if isinstance(node, sympy.Heaviside):
                mine, read = sympy.Heaviside(a, *node.args[1:]), sympy.Heaviside(surface, *node.args[1:])
            else:
                mine, read = type(node)(a, 0), type(node)(surface, 0)
            claim = read.xreplace({self.output: outer})
            return read if _same_around(mine, claim, self.w, root) else None
        return None


def _replaced(expr: sympy.Expr, old: sympy.Expr, new: sympy.Expr):
    """`expr` with `old` replaced by `new`, or None where that makes no expression (a condition replaced)."""
    try:
        return expr.xreplace({old: new})
    except (TypeError, ValueError):
        return None


def _subexpressions(expr: sympy.Expr):
    """`expr` and its subexpressions that read a tensor, outermost first (an access is one, not its indices)."""
    if not expr.atoms(sympy.Indexed):
        return
    if isinstance(expr, sympy.Expr):
        yield expr
    if not isinstance(expr, sympy.Indexed):
        for arg in expr.args:
            yield from _subexpressions(arg)


def _untied(expr: sympy.Expr) -> sympy.Expr:
    """The forward's values, with Max/Min ties forgotten (they decide the gradient, not the value)."""
    return expr.replace(lambda e: isinstance(e, Tied), lambda e: e.untied)


def _same_around(mine: sympy.Expr, claim: sympy.Expr, w: sympy.Dummy, root: sympy.Expr) -> bool:
    """Whether `mine` and `claim`, functions of w, provably take the same value at w = root, above and below it."""
    p = sympy.Dummy("p", positive=True)
    for point in (root, root + p, root - p):
        a, b = mine.xreplace({w: point}), claim.xreplace({w: point})
        if not (a in (sympy.true, sympy.false) or a.is_number) or a != b:
            return False
    return True



# Steps instead of the inputs they read ------------------------------------------------------------

def save_steps(derivation: Derivation) -> Derivation:
    """Where the gradients read inputs only through steps (sign(pred - target), a where() mask of them), the
    forward saves each step instead, as `saved_step` (or `saved_step_0`, ...), and the inputs are not kept.

    A step is piecewise constant, so its derivative is 0: a double backward needs nothing computed again from
    the inputs (`recompute=False`). It is saved only when that frees more inputs than it adds values, each
    freed input having every dim of the step (l1_loss keeps sign(pred - target), not pred and target); an
    input read for its shape (a sum back to a broadcast input's size) is then kept as its shape."""
    op = derivation.op
    inputs = {t.name for t in op.inputs}
    steps: list[sympy.Expr] = []
    for factor in (f for g in derivation.gradients for t in g.terms for f in t.factors):
        for step in _steps(factor, inputs):
            if step not in steps:
                steps.append(step)
    if not steps:
        return derivation
    names = [naming.SAVED_PREFIX + "step" + (f"_{k}" if len(steps) > 1 else "") for k in range(len(steps))]
    values, reads = [], {}
    for name, step in zip(names, steps):
        indices = next(iter(step.atoms(sympy.Indexed))).indices
        values.append(SavedValue(name, step, tuple(i.name for i in indices), recompute=False))
        reads[step] = tensor_symbol(name)[indices]
    gradients = [replace(g, terms=tuple(replace(t, factors=tuple(f.xreplace(reads) for f in t.factors))
                                        for t in g.terms)) for g in derivation.gradients]
    before, after = (_value_reads(gs, op) & inputs for gs in (derivation.gradients, gradients))
    freed = before - after
    dims = {i for v in values for i in v.indices}
    if len(freed) <= len(values) or not all(set(op.input(name).indices) >= dims for name in freed):
        return derivation
    return replace(derivation, gradients=tuple(gradients), saved=derivation.saved + tuple(values))


def _steps(expr: sympy.Expr, inputs: set[str]):
    """The largest subexpressions of `expr` that read inputs, all at the same plain indices (a saved step is a
    tensor over them: not an affine read's s*t + k), and are piecewise constant in them: sign(a), a step, a
    where() whose branches are numbers."""
    accesses = {a for a in expr.atoms(sympy.Indexed) if a.base.label.name in inputs}
    if not accesses:
        return
    constant = isinstance(expr, (sympy.sign, sympy.Heaviside)) or \
        (isinstance(expr, sympy.Piecewise) and all(value.is_number for value, _ in expr.args))
    plain = all(isinstance(i, sympy.Idx) for a in accesses for i in a.indices)
    if constant and plain and len({a.indices for a in accesses}) == 1 and \
            not (expr.atoms(sympy.Indexed) - accesses) and not expr.has(sympy.Sum, _OverIndex, _Extremum):
        yield expr
        return
    for arg in expr.args:
        if isinstance(arg, sympy.Expr):
            yield from _steps(arg, inputs)
