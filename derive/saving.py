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
(it fuses); the broadcast style keeps every formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from . import naming
from .derivation import Term
from .functions import Sum, canonical, log_softmax, logsumexp, rewrite_log_softmax, softmax
from .model import tensor_symbol


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
        value = SavedValue(name, log_softmax(body, index), tuple(i.name for i in body.indices))
        reading = _read_forward(forward, value, body, index)
        if reading == forward:      # the forward never forms x - logsumexp(x): nothing to save
            continue
        forward = reading
        gradients = [[_read_gradient(t, value, body, index) for t in terms] for terms in gradients]
        saved.append(value)
    return Saving(tuple(saved), forward, gradients) if saved else None


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
