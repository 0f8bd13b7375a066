"""Forward values the backward reuses: the log-softmax a loss's forward computes anyway.

`x[..., p] - logsumexp(x[..., c], c)` in a forward is the log-softmax of x, read at p (an
index, or a class gathered through an integer input as cross-entropy does). When a
gradient of the same op needs `softmax(x)` or `log_softmax(x)`, the forward computes
`saved_log_softmax = torch.log_softmax(x, dim)` once, reads its result from it, and hands it
to the backward, as autograd saves its log_softmax output; the backward then reads
`exp(saved)` for the softmax, and its VJP shape `g - exp(saved) * sum(g)` becomes PyTorch's
fused `_log_softmax_backward_data`. Without such a gradient, an index-position log-softmax
in the forward is still printed as one `torch.log_softmax` (see `fuse_log_softmax`).

Only the contraction style saves (it fuses); the broadcast style keeps every formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from . import naming
from .derivation import Term
from .functions import log_softmax, log_softmax_backward, logsumexp, one_hot, softmax
from .spec import tensor_symbol


@dataclass(frozen=True)
class SavedValue:
    """A tensor the forward computes, returns alongside its result, and the backward reads."""

    name: str                    # variable in both functions: saved_log_softmax
    expr: sympy.Expr             # what it holds, in the op's indices: log_softmax(logits[n, c], c)
    indices: tuple[str, ...]     # its dims (those of the tensor it normalizes)


def save_forward_values(forward: list[Term], gradients: list[list[Term]]):
    """(saved values, forward terms reading them, gradient terms reading them)."""
    bodies = _log_softmax_bodies(forward)
    needed = [b for b in bodies if any(_uses_softmax_of(t, b) for terms in gradients for t in terms)]
    if not needed:
        return (), forward, gradients
    saved = []
    for body, index in needed:
        name = naming.SAVED_PREFIX + "log_softmax"
        if len(needed) > 1:
            name += "_" + body.base.label.name
        value = SavedValue(name, log_softmax(body, index), tuple(i.name for i in body.indices))
        reading = _read_forward(forward, value, body, index)
        if reading == forward:      # the forward never forms x - logsumexp(x): nothing to save
            continue
        forward = reading
        gradients = [[_read_gradient(t, value, body, index) for t in terms] for terms in gradients]
        saved.append((value, body, index))
    gradients = [fuse_log_softmax_vjp(terms) for terms in gradients]
    return tuple(value for value, _, _ in saved), forward, gradients


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

    def rewrite(add):
        for lse in add.args:
            sign, core = lse.as_coeff_Mul()
            if not (isinstance(core, logsumexp) and sign in (1, -1) and _same(core, body, index)):
                continue
            for other in add.args:
                other_sign, access = other.as_coeff_Mul()
                position = _position(access, body, index)
                if other_sign == -sign and position is not None:
                    rest = [a for a in add.args if a is not lse and a is not other]
                    return sympy.Add(other_sign * at(position), *rest)
        return add

    terms = [_signs_out(replace(t, factors=tuple(f.replace(lambda e: isinstance(e, sympy.Add), rewrite)
                                                 for f in t.factors))) for t in terms]
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


def _signs_out(term: Term) -> Term:
    """A number a rewrite left in front of a factor joins the coefficient: no full-size negation."""
    split = [f.as_coeff_Mul() for f in term.factors]
    return replace(term, coefficient=term.coefficient * sympy.Mul(*[number for number, _ in split]),
                   factors=tuple(f for _, f in split))


def fuse_log_softmax_vjp(terms: list[Term]) -> list[Term]:
    """The two terms of a log-softmax VJP, with any common scalar factors, become one fused term.

        a * g[c] - a * sum(exp(y[c]) * g[c1], c1)   ->  a * log_softmax_backward(g, y, c)
        a * exp(y[n, c]) - a * one_hot(t[n], c)       ->  a * log_softmax_backward(-one_hot(t[n], c), y, c)

    (g may be a product; the second holds because one_hot sums to one over c). A match is on
    the algebra alone; anything else is left as it is.
    """
    if len(terms) != 2:
        return terms
    first, second = terms
    if first.coefficient != -second.coefficient:
        return terms
    scalars = [f for f in first.factors if not f.atoms(sympy.Idx) and f in second.factors]
    own = [[f for f in t.factors if f not in scalars] for t in (first, second)]
    for (plain, plain_factors), (summed, summed_factors) in (((first, own[0]), (second, own[1])),
                                                             ((second, own[1]), (first, own[0]))):
        fused = _fused_vjp(plain, plain_factors, summed, summed_factors)
        if fused is not None:
            sign, kernel = fused
            return [Term(sign * plain.coefficient, tuple(scalars) + (kernel,), ())]
    return terms


def _fused_vjp(plain: Term, plain_factors, other: Term, other_factors):
    exps = [f for f in other_factors if isinstance(f, sympy.exp) and isinstance(f.args[0], sympy.Indexed)]
    if len(exps) != 1 or plain.summed:
        return None
    y = exps[0].args[0]
    rest = [f for f in other_factors if f is not exps[0]]
    if not other.summed and not rest and len(plain_factors) == 1 and isinstance(plain_factors[0], one_hot):
        position = plain_factors[0].args[1]
        if position in y.indices:      # a * exp(y) - a * one_hot: the plain term holds -a
            return -1, log_softmax_backward(-plain_factors[0], y, position)
        return None
    if len(other.summed) != 1 or not rest:
        return None
    moved = other.summed[0]
    g = sympy.Mul(*plain_factors)
    for position in y.indices:
        if isinstance(position, sympy.Idx) and position.upper == moved.upper and \
                sympy.Mul(*rest) == g.xreplace({position: moved}) and g.has(position):
            return 1, log_softmax_backward(g, y, position)
    return None
