"""Stage 2b, derivation -> derivation: fused PyTorch kernels, one record per kernel (contraction style).

`KERNELS` is the table. A `Kernel` says what it matches in the terms of a gradient (or of a
tangent), which forward values it needs saved, how its call prints and what the call computes,
for the comment above it. `fuse` walks the table once, in order; the fused call stands in the
terms as one factor, an instance of the record's `node` (a `Fused` SymPy function), which the
printer prints through the record and nothing else. The broadcast style skips this stage: its
plan is the derivation as it is, every formula spelled out.

Every match is on the algebra alone, whatever the op: `where(x <= 0, 0, g)` is ReLU's backward
for any tensor g, `y * (g - sum(g * y))` a softmax's for any g and y.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import sympy

from . import naming
from .derivation import Derivation, Term
from .functions import (Sum, _Extremum, free_indices, fresh_index, logsumexp, log_softmax, one_hot, renamed_match,
                        replace_index, rewrite_log_softmax)
from .naming import BATCH
from .saving import (Saving, SavedValue, save_first_positions, save_forward_values, save_normalization,
                     save_reduced_values, save_statistics, signs_out, worth_saving)
from .model import tensor_symbol


class Fused(sympy.Function):
    """One call of a fused PyTorch kernel in a term; `kernel_of(self)` is its record."""

    is_real = True

    def bound_index_names(self) -> set[str]:
        """Indices the call sums away (its free indices leave them out)."""
        return set()

    def shape_only(self) -> set[sympy.Indexed]:
        """Arguments the call reads for their shape alone (a Function keeps their shapes, not them)."""
        return set()


class threshold_backward(Fused):  # noqa: N801 - named like the kernel
    nargs = 3    # g, x, threshold


class leaky_relu_backward(Fused):  # noqa: N801
    nargs = 3    # g, x, slope


class softmax_backward(Fused):  # noqa: N801
    nargs = 3    # g, y, index


class log_softmax_backward(Fused):  # noqa: N801
    nargs = 3    # g, y, index


class one_hot_log_softmax_backward(Fused):  # noqa: N801
    nargs = 3    # -one_hot(t[n], c), y, c


class _normalization_backward(Fused):
    """One output (part 0: d/dx, 1: d/dweight, 2: d/dbias) of a native normalization backward; `dims` are the
    normalized ones. `weight` is 1 for part 0 (a weight in grad_out is passed to the kernel), the input
    differentiated for parts 1 and 2 (the kernel gives its output that input's shape)."""
    nargs = 7    # part, grad_out, weight, x, mean, rstd, dims (a Tuple)

    def shape_only(self) -> set[sympy.Indexed]:
        return {self.args[2]} if self.args[0] == 2 else set()     # d/dbias: the kernel makes it the bias's shape

    def bound_index_names(self) -> set[str]:
        part, _, _, x, _, _, dims = self.args
        return set() if part == 0 else {i.name for i in x.indices} - {i.name for i in kernel_of(self).weight_dims(x.indices, tuple(dims))}


class layer_norm_backward(_normalization_backward):  # noqa: N801 - named like the kernel
    pass


class batch_norm_backward(_normalization_backward):  # noqa: N801
    pass


class group_norm_backward(_normalization_backward):  # noqa: N801
    pass


class cumsum(Fused):  # noqa: N801 - named like the kernel
    """sum over s of body[s] where s REL t, at t: a running sum along s, read at t (same size)."""
    nargs = 5    # body, s, t, reverse (1: s >= t), exclusive (1: strict)

    def bound_index_names(self) -> set[str]:
        return {self.args[1].name}


class diag_embed(Fused):  # noqa: N801 - named like the kernel
    """where(i == j, body[i], 0): body placed on the diagonal of the dims i and j (one size)."""
    nargs = 3    # body, i, j


@dataclass(frozen=True)
class Kernel:
    """One fused PyTorch kernel: what it replaces, what it needs, how it prints."""

    name: str                     # PyTorch's name for it
    node: type[Fused] | None      # the SymPy function that stands for its call in a term (None: a record that
                                  # only saves forward values for the formulas to read)
    # a gradient's (or tangent's) terms -> the same with the kernel where it matches; `found` is what
    # `save` found (() for a tangent, or when nothing is saved), `like` (input, dims) of the gradient
    fuse: Callable[[list[Term], tuple, tuple | None], list[Term]]
    # printer, node, index-free factor -> the call: every kernel is linear in its g, so a factor
    # (grad_loss / size_n) scales g on its way in. The printer gives `text(expr, layout)`,
    # `dim(index, layout)` and `placed(text, dims)` (printing.TorchCodePrinter).
    print: Callable
    formulas: tuple[str, ...]     # what its calls compute, one comment line each
    # node, factor -> which of `formulas` a printed call shows (default: all)
    comments: Callable[[Fused, sympy.Expr], tuple[str, ...]] | None = None
    # (forward terms, gradient terms) -> the forward values it reads, saved, or None
    save: Callable[[list[Term], list[list[Term]]], Saving | None] | None = None
    # node, factor -> the size symbols its printed call reads (default: those of its one-hots)
    sizes: Callable[[Fused, sympy.Expr], set] | None = None
    forward: bool = False         # it also rewrites the forward's terms (none of the others fuses a forward)
    # a normalization kernel's weight dims, from (x's indices, normalized dims)
    weight_dims: Callable[[tuple, tuple], tuple] | None = None
    # its saving stays only where a gradient calls it (else the saving is dropped and the next records try)
    needs_call: bool = False
    # (op, forward terms reading the saved values, the saving) -> a native call computing the forward and the
    # saved values at once (NativeForward), or None
    native_forward: Callable | None = None
    # a kernel with several outputs: (printer, grad_out text, weight, bias, x, mean, rstd, dims, layout, mask text)
    # -> the call that returns them all, those the mask asks for (emit joins the gradients that are its outputs)
    joint: Callable | None = None
    # False: the kernel has no derivative of its own (native_group_norm_backward). The backward calls it only where
    # no graph is recorded (not torch.is_grad_enabled(), as torch's derivatives.yaml does for native_group_norm);
    # a double backward takes the fallback, the gradients that the table without such records gives
    differentiable: bool = True
    # (output, x, normalized dims) -> the suffix that views that output of a joint kernel as its gradient ("": none)
    output_view: Callable[[int, sympy.Indexed, tuple], str] = lambda part, x, dims: ""
    # its saving stays only where the forward is its native call, with a weight (else the next records try)
    native_only: bool = False

    def comment(self, node: Fused, factor: sympy.Expr = sympy.S.One) -> tuple[str, ...]:
        return self.comments(node, factor) if self.comments else self.formulas

    def sizes_read(self, node: Fused, factor: sympy.Expr = sympy.S.One) -> set:
        if self.sizes:
            return self.sizes(node, factor)
        return {hot.args[1].upper + 1 for hot in node.atoms(one_hot)}


def fuse(derivation: Derivation, differentiable_only: bool = False) -> Derivation:
    """The derivation with every match of the table's kernels fused, and the forward values they read saved;
    `differentiable_only` leaves out the records of kernels without a derivative (the fallback of their calls)."""
    forward = list(derivation.forward_terms)
    gradients = [list(g.terms) for g in derivation.gradients]
    tangents = [list(t.terms) for t in derivation.tangents]
    likes = [(g.input, g.indices) for g in derivation.gradients]
    saved: list[SavedValue] = []
    native = native_terms = None
    native_saved = 0        # how many values the native call computes: all that are saved
    for kernel in KERNELS:
        if differentiable_only and not kernel.differentiable:
            continue
        tangents = [kernel.fuse(terms, (), None) for terms in tangents]
        forward = kernel.fuse(forward, (), None) if kernel.forward else forward
        saving = kernel.save(forward, gradients) if kernel.save and worth_saving(derivation.op, kernel.save) else None
        reading_forward, reading = (saving.forward, saving.gradients) if saving else (forward, gradients)
        fused = [kernel.fuse(terms, saving.found if saving else (), like) for terms, like in zip(reading, likes)]
        fused = [_bias_with_weight(terms, unfused, fused) for terms, unfused in zip(fused, reading)]
        if saving and (_read_outside_kernels(fused, saving.values) or kernel.needs_call and not any(
                f.atoms(kernel.node) for terms in fused for t in terms for f in t.factors)
                or kernel.native_only and not _weighted_native(kernel, derivation.op, reading_forward, saving, saved)):
            fused = [kernel.fuse(terms, (), like) for terms, like in zip(gradients, likes)]
            saving, reading_forward = None, forward       # the formulas stay, reading no saved value
        if saving and kernel.needs_call and not _read_outside_kernels(
                fused, tuple(replace(v, recompute=False) for v in saving.values)):
            # only the kernel reads them: a double backward needs them not again (nor the inputs to compute them)
            saving = replace(saving, values=tuple(replace(v, recompute=False) for v in saving.values))
        forward, gradients = reading_forward, fused
        saved += saving.values if saving else ()
        if saving and kernel.native_forward and native is None and len(saved) == len(saving.values):
            native = kernel.native_forward(derivation.op, forward, saving)
            native_terms, native_saved = forward, len(saved)
    if native is not None and (forward != native_terms or len(saved) != native_saved):
        native = None       # a later record rewrote the forward, or saved more
    return replace(derivation, forward_terms=tuple(forward), saved=tuple(saved), native_forward=native,
                   gradients=tuple(replace(g, terms=tuple(terms)) for g, terms in zip(derivation.gradients, gradients)),
                   tangents=tuple(replace(t, terms=tuple(terms)) for t, terms in zip(derivation.tangents, tangents)))


def undifferentiable(derivation: Derivation) -> bool:
    """Whether a gradient calls a kernel without a derivative of its own (`Kernel.differentiable`)."""
    return any(not kernel_of(call).differentiable for g in derivation.gradients for t in g.terms
               for f in t.factors for call in f.atoms(Fused))


def with_fallback(fused: Derivation, fallback: Derivation) -> Derivation | None:
    """`fused`, whose calls of kernels without a derivative need `fallback` in a double backward, with each saved
    value the fallback's formulas read marked to be computed again there (a native forward then computes it, with
    its graph: native_group_norm's mean and rstd have one); None when the fallback saves a value `fused` lacks."""
    mine = {v.name: v for v in fused.saved}
    if any(v.name not in mine or replace(mine[v.name], recompute=v.recompute) != v for v in fallback.saved):
        return None
    again = {v.name for v in fallback.saved if v.recompute}
    return replace(fused, saved=tuple(replace(v, recompute=v.recompute or v.name in again) for v in fused.saved))


def spell(derivation: Derivation) -> Derivation:
    """The broadcast style's share of this stage: a softmax VJP whose upstream side is a contraction, or
    that more factors multiply (attention's), regrouped as `fuse` would, with the call written out as its
    formula y * (g - sum(g * y, c)): every product then spans one contraction's indices, not both sides'.
    Any other formula stays as derived."""
    def spelled(terms: tuple[Term, ...]) -> tuple[Term, ...]:
        fused = _softmax_vjp(list(terms))
        calls = [(t, f) for t in fused for f in t.factors if isinstance(f, softmax_backward)]
        if not calls or any(isinstance(f.args[0], sympy.Indexed) and len(t.factors) == 1 for t, f in calls):
            return terms
        return tuple(replace(t, factors=tuple(_softmax_formula(f) if isinstance(f, softmax_backward) else f
                                              for f in t.factors)) for t in fused)

    return replace(derivation,
                   gradients=tuple(replace(g, terms=spelled(g.terms)) for g in derivation.gradients),
                   tangents=tuple(replace(t, terms=spelled(t.terms)) for t in derivation.tangents))


def _softmax_formula(call: "softmax_backward") -> sympy.Expr:
    g, y, c = call.args
    other = fresh_index(c, {i.name for i in call.atoms(sympy.Idx)})
    return y * (g - Sum(g.xreplace({c: other}) * y.xreplace({c: other}), (other, 0, other.upper)))


def _bias_with_weight(terms: list[Term], unfused: list[Term], gradients: list[list[Term]]) -> list[Term]:
    """A normalization kernel's d/dbias stays a kernel output only where its call has a weight (from d/dx's g, or
    the weight's own gradient): without one, torch's double backward of the kernel drops the bias's share."""
    calls = [f for t in terms for f in t.factors if isinstance(f, _normalization_backward) and f.args[0] == 2]
    if not calls:
        return terms
    weights = [joint_weights(f)[1] for g in gradients for t in g for f in t.factors
               if isinstance(f, _normalization_backward) and f.args[0] != 2]
    return terms if any(w is not None for w in weights) else unfused


def _weighted_native(kernel: "Kernel", op, forward: list[Term], saving: Saving, saved: list) -> bool:
    """Whether the forward is the record's native call with a weight, and saves nothing else."""
    native = None if saved else kernel.native_forward(op, forward, replace(
        saving, values=tuple(replace(v, recompute=False) for v in saving.values)))
    return native is not None and native.weight is not None


def _read_outside_kernels(gradients: list[list[Term]], values: tuple[SavedValue, ...]) -> bool:
    """Whether a gradient reads a value only fused kernels may read (recompute=False) outside of one."""
    private = {v.name for v in values if not v.recompute}
    for factor in (f for terms in gradients for t in terms for f in t.factors):
        outside = factor.xreplace({call: sympy.S.Zero for call in factor.atoms(Fused)})
        if private & {a.base.label.name for a in outside.atoms(sympy.Indexed)}:
            return True
    return False


KERNEL_OF: dict[type, Kernel] = {}


def kernel_of(node: Fused) -> Kernel:
    return KERNEL_OF[type(node)]


def comments(calls: list[tuple[Fused, sympy.Expr]]) -> tuple[str, ...]:
    """The comment lines for some (call, factor) pairs, each line once, in table order."""
    said = {line for call, factor in calls for line in kernel_of(call).comment(call, factor)}
    return tuple(dict.fromkeys(line for kernel in KERNELS for line in kernel.formulas if line in said))


# Steps: where(x <= c, 0, g) and where(x > 0, g, s * g) -------------------------------------------

def _step(build: Callable[[sympy.Expr, sympy.Boolean, sympy.Expr], Fused | None]):
    """A matcher of a term's one two-valued step: the factors over the step's dims go inside it, and
    `build(value, condition, otherwise)` of the result gives the call (or None: no match)."""
    def fuse(terms: list[Term], found=(), like=None) -> list[Term]:
        return [_fold_step(term, build) for term in terms]
    return fuse


def _fold_step(term: Term, build) -> Term:
    steps = [f for f in term.factors if isinstance(f, sympy.Piecewise)]
    if len(steps) != 1 or len(steps[0].args) != 2 or steps[0].args[1].cond != sympy.true:
        return term
    (step,) = steps
    room = free_indices(step)
    inside = [f for f in term.factors if f is not step and free_indices(f) <= room]
    (value, condition), (otherwise, _) = step.args
    wrapped = sympy.Mul(*inside)
    call = build(value * wrapped, condition, otherwise * wrapped)
    if call is None:
        return term
    return replace(term, factors=(call,) + tuple(f for f in term.factors if f is not step and f not in inside))


def _threshold(value, condition, otherwise):
    """where(x <= c, 0, g) -> threshold_backward(g, x, c): not the forward's where(x <= 0, 0, x)."""
    if isinstance(condition, sympy.LessThan) and condition.rhs.is_number and value == 0 \
            and otherwise.atoms(sympy.Indexed) and otherwise != condition.lhs:
        return threshold_backward(otherwise, condition.lhs, condition.rhs)
    return None


def _leaky_relu(value, condition, otherwise):
    """where(x > 0, g, s * g) -> leaky_relu_backward(g, x, s), for a slope s that is not a tensor and not 0:
    where(x > 0, g, 0) is 0 where x <= 0 even where g is inf or NaN (a row of a softmax masked whole with
    -inf), where leaky_relu_backward's 0 * g is NaN."""
    if isinstance(condition, sympy.StrictGreaterThan) and condition.rhs == 0 and value.atoms(sympy.Indexed) \
            and value != condition.lhs and otherwise != 0:
        slope = sympy.cancel(otherwise / value)
        if not slope.atoms(sympy.Indexed):
            return leaky_relu_backward(value, condition.lhs, slope)
    return None


def _print_step(call: str, *flags: str):
    """`call(g, x, constant, *flags)`, in the printer's layout."""
    def print_(printer, node, factor=sympy.S.One):
        g, x, constant = node.args
        return f"{call}({', '.join([printer.text(factor * g), printer.text(x), printer.text(constant), *flags])})"
    return print_


# Softmax and log-softmax VJPs -------------------------------------------------------------------

def _softmax_vjp(terms: list[Term], found=(), like=None) -> list[Term]:
    """Each pair of terms that is a softmax's VJP, with anything before and after it:

        a * sum(y[c] * W[c] * U[c])  -  a * sum(y[c] * y[c1] * W[c1] * U[c], c1)
            ->  a * sum(U[c] * softmax_backward(sum(W[c], w...), y, c))

    y any expression (the output, or a softmax of the inputs), W the upstream side (its own sums w...
    over indices only it has: for attention's q, sum(grad_o[t, d] * v[s, d], d), a contraction the
    lowering computes once by @), U the rest (k[s, e]; sums over c and U's indices stay outside the call,
    so the term is then a contraction of the call with U). The same pair is a softmax's JVP, so it fuses
    tangents too."""
    for minus in terms:
        for plus in terms:
            if plus is minus or plus.coefficient != -minus.coefficient:
                continue
            fused = _softmax_pair(plus, minus)
            if fused is not None:
                rest = [fused if t is plus else t for t in terms if t is not minus]
                return _softmax_vjp(rest)
    return terms


def _softmax_pair(plus: Term, minus: Term) -> Term | None:
    """The fused term of one pair (see _softmax_vjp), or None."""
    factors = list(minus.factors)
    for inner, outer_y in ((a, b) for a in range(len(factors)) for b in range(len(factors)) if a != b):
        y_inner, y = factors[inner], factors[outer_y]
        for c_inner in minus.summed:
            if c_inner.name not in free_indices(y_inner):
                continue
            for c in {i for i in y.atoms(sympy.Idx) if i.name in free_indices(y) and i != c_inner
                      and i.upper == c_inner.upper and i.name not in free_indices(y_inner)}:
                if y_inner.xreplace({c_inner: c}) != y:
                    continue
                fused = _softmax_sides(plus, minus, [f for p, f in enumerate(factors) if p not in (inner, outer_y)],
                                       y, c, c_inner)
                if fused is not None:
                    return fused
    return None


def _softmax_sides(plus: Term, minus: Term, others: list, y, c: sympy.Idx, c_inner: sympy.Idx) -> Term | None:
    rows = free_indices(y) - {c.name}
    upstream = [f for f in others if c_inner.name in free_indices(f)]
    rest = [f for f in others if c_inner.name not in free_indices(f)]
    if not upstream or any(c.name in free_indices(f) for f in upstream):
        return None
    # the upstream side takes the factors tied to it by sums over indices no other side has
    own = {i for i in minus.summed if i not in (c, c_inner) and i.name not in rows}
    grown = True
    while grown:
        reach = {i for i in own if i.name in set().union(*(free_indices(f) for f in upstream))}
        tied = [f for f in rest if {i.name for i in reach} & free_indices(f)]
        grown = bool(tied)
        upstream += tied
        rest = [f for f in rest if f not in tied]
    summed_inside = tuple(i for i in minus.summed if i in own and
                          i.name in set().union(*(free_indices(f) for f in upstream)))
    moved = sympy.Mul(*upstream).xreplace({c_inner: c})
    g = Sum(moved, *[(i, 0, i.upper) for i in summed_inside]) if summed_inside else moved
    if free_indices(g) != free_indices(y) or any(free_indices(f) & {i.name for i in summed_inside} for f in rest):
        return None
    outside = tuple(i for i in minus.summed if i != c_inner and i not in summed_inside)
    expected = sympy.Mul(y, moved, *rest)
    chosen = renamed_match(expected, outside + summed_inside, sympy.Mul(*plus.factors))
    if chosen is None or set(chosen) != set(plus.summed) or len(chosen) != len(plus.summed):
        return None
    call = softmax_backward(g, y, c)
    term = Term(plus.coefficient, tuple(rest) + (call,), outside)
    # a summed c takes the name the upstream side summed: the same call in every gradient reads alike
    return term if c not in outside else replace(
        term, factors=tuple(f.xreplace({c: c_inner}) for f in term.factors),
        summed=tuple(c_inner if i == c else i for i in outside))


def _scaled_pair(match):
    """A matcher of two terms a * P - a * Q, with any common scalar factors in a: `match(plain,
    plain_factors, other, other_factors)` gives (sign, call) for P - Q, tried in both orders."""
    def fuse(terms: list[Term], found=(), like=None) -> list[Term]:
        if len(terms) != 2:
            return terms
        first, second = terms
        if first.coefficient != -second.coefficient:
            return terms
        scalars = [f for f in first.factors if not f.atoms(sympy.Idx) and f in second.factors]
        own = [[f for f in t.factors if f not in scalars] for t in (first, second)]
        for (plain, plain_factors), (other, other_factors) in (((first, own[0]), (second, own[1])),
                                                               ((second, own[1]), (first, own[0]))):
            fused = match(plain, plain_factors, other, other_factors)
            if fused is not None:
                sign, call = fused
                return [Term(sign * plain.coefficient, tuple(scalars) + (call,), ())]
        return terms
    return fuse


def _the_exp(factors) -> sympy.Indexed | None:
    """y when exactly one factor is exp(y[...])."""
    exps = [f for f in factors if isinstance(f, sympy.exp) and isinstance(f.args[0], sympy.Indexed)]
    return exps[0].args[0] if len(exps) == 1 else None


def _log_softmax_vjp_pair(plain, plain_factors, other, other_factors):
    """a * g[c] - a * sum(exp(y[c]) * g[c1], c1)  ->  a * log_softmax_backward(g, y, c) (g may be a product)."""
    y = _the_exp(other_factors)
    if y is None or plain.summed or len(other.summed) != 1:
        return None
    rest = [f for f in other_factors if f != sympy.exp(y)]
    moved = other.summed[0]
    g = sympy.Mul(*plain_factors)
    if not rest or {i.name for i in g.atoms(sympy.Idx)} != {i.name for i in y.indices}:
        return None      # the kernel takes g and y of one shape
    for position in y.indices:
        if isinstance(position, sympy.Idx) and position.upper == moved.upper and \
                sympy.Mul(*rest) == g.xreplace({position: moved}) and g.has(position):
            return 1, log_softmax_backward(g, y, position)
    return None


def _log_softmax_vjp(terms: list[Term], found=(), like=None) -> list[Term]:
    """The VJP pair, then every x - logsumexp(x) left in a factor as log_softmax(x)."""
    terms = _scaled_pair(_log_softmax_vjp_pair)(terms)
    return [signs_out(replace(t, factors=tuple(fuse_log_softmax(f) for f in t.factors))) for t in terms]


def fuse_log_softmax(expr: sympy.Expr) -> sympy.Expr:
    """Every `a * (x[c] - logsumexp(x[c'], c'))` inside `expr` (any index names) becomes
    `a * log_softmax(x[c], c)`: one torch.log_softmax."""
    def inline(lse: logsumexp, access):
        for position in access.atoms(sympy.Idx):
            if position.upper == lse.index.upper and lse.body.xreplace({lse.index: position}) == access:
                return log_softmax(access, position)
        return None

    return rewrite_log_softmax(expr, inline)


def _one_hot_pair(plain, plain_factors, other, other_factors):
    """a * exp(y[n, c]) - a * one_hot(t[n], c)  ->  a * log_softmax_backward(-one_hot(t[n], c), y, c):
    g - exp(y) * sum(g) with g = -one_hot, which sums to -1 over c."""
    y = _the_exp(other_factors)
    if y is None or other.summed or plain.summed or len(other_factors) != 1 or len(plain_factors) != 1 \
            or not isinstance(plain_factors[0], one_hot):
        return None
    position = plain_factors[0].args[1]
    if position not in y.indices:
        return None
    return -1, one_hot_log_softmax_backward(-plain_factors[0], y, position)   # the plain term holds -a


def _print_vjp(call: str):
    """`call(g, y, dim, y.dtype)`, g and y in g's own layout."""
    def print_(printer, node, factor=sympy.S.One, grad_text: str | None = None):
        g, y, index = node.args
        layout = tuple(i for i in printer.layout if i in free_indices(g))
        if grad_text is None:
            grad_text = printer.text(factor * g, layout)
        # the dtype the softmax was taken in: y's own, or that of a tensor it is computed from
        dtype = (y if isinstance(y, sympy.Indexed) else sorted(y.atoms(sympy.Indexed), key=sympy.default_sort_key)[0])
        text = f"{call}({grad_text}, {printer.text(y, layout)}, {printer.dim(index.name, layout)}, " \
               f"{printer.named(dtype.base.label.name)}.dtype)"
        return printer.placed(text, layout)
    return print_


def one_hot_by_rows(hot: one_hot, dims, scale: sympy.Expr) -> bool:
    """Whether `scale * hot`, laid out in `dims`, can be written one value per row at its class:
    one row index (no batch dims), dims (row, class), and a 0-d tensor in `scale` to write."""
    target, klass = hot.args
    rows = tuple(i.name for i in target.indices)
    return len(rows) == 1 and rows[0] != BATCH and tuple(dims) == rows + (klass.name,) \
        and any(naming.is_zero_dim_tensor(s) for s in scale.free_symbols)


def _written_by_rows(node: Fused, factor: sympy.Expr) -> sympy.Expr | None:
    """The value nll_loss_backward writes at each row's class for `factor * g`, when it can build it
    (zeros with one value per row, as autograd's nll_loss does); else None."""
    g, y, _ = node.args
    value, hot = (factor * g).as_independent(one_hot, as_Add=False)
    if isinstance(hot, one_hot) and one_hot_by_rows(hot, tuple(i.name for i in y.indices), value):
        return value
    return None


def _print_one_hot_vjp(printer, node, factor=sympy.S.One):
    value = _written_by_rows(node, factor)
    if value is None:
        return _print_vjp("torch._log_softmax_backward_data")(printer, node, factor)
    # nll_loss_backward with sum reduction (2) writes -grad_output at each row's class into zeros, in
    # one kernel that vmap and jacrev batch (an in-place index_put_ they refuse); total_weight only
    # divides a mean, and must not require grad in a double backward
    hot, y = node.args[0].as_independent(one_hot, as_Add=False)[1], node.args[1]
    saved = y.base.label.name
    grad_text = f"torch.ops.aten.nll_loss_backward({printer.text(-value, ())}, {saved}, " \
                f"{hot.args[0].base.label.name}, weight=None, reduction=2, ignore_index=-100, " \
                f"total_weight={saved}.new_ones(()))"
    return _print_vjp("torch._log_softmax_backward_data")(printer, node, factor, grad_text)


def _one_hot_comments(node, factor):
    return ONE_HOT_FORMULAS if _written_by_rows(node, factor) is not None else ONE_HOT_FORMULAS[:1]


def _one_hot_sizes(node, factor):
    """nll_loss_backward needs no number of classes; the one-hot formula does."""
    return set() if _written_by_rows(node, factor) is not None else {node.args[2].upper + 1}


# Normalizations: torch's native backward kernels from the saved mean and rstd ------------------------

@dataclass(frozen=True)
class NormLayout:
    """Where a native normalization kernel applies: which dims of x it normalizes and which its weight has."""

    applies: Callable[[tuple, tuple], bool]           # (x's indices, normalized dims) -> whether the kernel fits
    weight_dims: Callable[[tuple, tuple], tuple]      # (x's indices, normalized dims) -> the weight's dims
    # (x, weight or "None", bias or "None", eps, number of normalized dims, x's rank) -> the forward's native call,
    # which returns (y, mean, rstd), mean and rstd over the kept dims of x, in x's order ...
    forward_call: Callable[[str, str, str, str, int, int], str] | None = None
    # ... once viewed as (x, number of normalized dims) -> this suffix says ("": as they come)
    statistics_view: Callable[[str, int], str] = lambda x, k: ""
    # and its result viewed as x's shape, x -> this suffix ("": it has it)
    output_view: Callable[[str], str] = lambda x: ""


# layer norm: the normalized dims trail x, the weight has them; batch norm: all dims but dim 1 (the channel, which
# the weight has). (A group norm, GROUP below, comes first in the table: its x also has trailing normalized dims.)
LAYER = NormLayout(lambda xs, dims: tuple(xs[-len(dims):]) == tuple(dims) and len(xs) > len(dims),
                   lambda xs, dims: tuple(dims),
                   lambda x, w, b, eps, k, rank: f"torch.native_layer_norm({x}, {x}.shape[-{k}:], {w}, {b}, {eps})",
                   # native_layer_norm keeps the normalized dims in mean and rstd, as 1s: viewed without them
                   lambda x, k: f".view({x}.shape[:-{k}])")
BATCH_NORM = NormLayout(lambda xs, dims: len(xs) >= 2 and BATCH not in xs and set(dims) == set(xs) - {xs[1]},
                        lambda xs, dims: (xs[1],),
                        # training mode: the batch statistics, returned as mean and 1 / sqrt(var + eps)
                        lambda x, w, b, eps, k, rank: f"torch.native_batch_norm({x}, {w}, {b}, None, None, True, 0.0, {eps})")


def _group_sizes(x: str, k: int, rank: int) -> tuple[str, str, str, str]:
    """native_group_norm's N, C, HxW and group of x[*lead, g, c, *rest] normalized over its last k dims (c, *rest):
    x seen as (N, G*C, HxW), which it is in memory."""
    lead = rank - k - 1
    n = "1" if lead == 0 else f"{x}.shape[0]" if lead == 1 else f"{x}.shape[:{lead}].numel()"
    rest = "1" if k == 1 else f"{x}.shape[{lead + 2}]" if k == 2 else f"{x}.shape[{lead + 2}:].numel()"
    return n, f"{x}.shape[{lead}] * {x}.shape[{lead + 1}]", rest, f"{x}.shape[{lead}]"


# group norm: x[*lead, g, c, *rest] over (c, *rest), the weight over (g, c): torch's group norm of x seen as
# (N, G*C, HxW) with the weight flattened. Its forward returns mean and rstd over (N, G), viewed as x's lead and g.
GROUP = NormLayout(lambda xs, dims: len(xs) >= len(dims) + 1 and BATCH not in xs and tuple(xs[-len(dims):]) == tuple(dims),
                   lambda xs, dims: (xs[-len(dims) - 1], xs[-len(dims)]),
                   lambda x, w, b, eps, k, rank: (
                       f"torch.native_group_norm({_channels(x, k, rank)}, {_flat(w)}, {_flat(b)}, "
                       f"{', '.join(_group_sizes(x, k, rank))}, {eps})"),
                   lambda x, k: f".view({x}.shape[:-{k}])",
                   lambda x: f".view({x}.shape)")


def _flat(name: str) -> str:
    """A weight over (g, c) as the kernels take it, over g * c channels (torch.compile's shape rules insist)."""
    return name if name == "None" else f"{name}.flatten()"


def _channels(x: str, k: int, rank: int) -> str:
    """x[*lead, g, c, *rest] as (N, G*C, *rest), the layout whose dim 1 torch.compile's native_group_norm wants."""
    lead = rank - k - 1
    merged = f"{x}.flatten({lead}, {lead + 1})"
    return merged if lead == 1 else f"{merged}.unsqueeze(0)" if lead == 0 else f"{merged}.flatten(0, {lead - 1})"


@dataclass(frozen=True)
class NativePool:
    """A window max with tie="first", y[..., t] = max(x[..., s*t + k - p], k, tie="first") over a whole read of x
    (the window along its last dim), and the input position of each window's first maximum (the
    saved argmax), both from torch's max pooling kernel in one call: its padding reads -inf (`pad_value`)."""

    x: str
    output: str
    size: int                    # the window's size (k's, from `sizes`)
    stride: int
    padding: int                 # before and after alike: the window starts at s*t - padding
    batched: bool = False        # x has batch dims `...`, however many: none too (a leading dim of 1 is added)
    comment = "the window maxima and their first positions in one native kernel, each row of x a batch entry"

    def call(self, text: Callable[[sympy.Expr], str]) -> str:
        # (rows as the batch: torch's kernel refuses an empty channel dim, and takes 2 or 3 dims only)
        rows = f"{self.x}{'.unsqueeze(0)' if self.batched else ''}.flatten(0, -2).unsqueeze(1)"
        return (f"torch.max_pool1d_with_indices({rows}, {self.size}, {self.stride}"
                + (f", {self.padding}" if self.padding else "") + ")")

    @property
    def view(self) -> str:
        """What the call's values and positions are viewed as: x's leading dims, then the windows."""
        return f".view({self.x}.shape[:-1] + {self.output}.shape[-1:])"

    output_view = view


def _native_pool(op, forward: list[Term], saving: Saving) -> NativePool | None:
    """The NativePool of a forward that is one window max with tie="first" of an input read as it is (the same
    dims before the window's, in the same order in the result), or None. torch's kernel picks the
    first maximum of a window as tie="first" does (and the NaN it meets last, where argmax picks the first)."""
    if len(forward) != 1 or len(saving.values) != 1:
        return None
    (term,) = forward
    if term.coefficient != 1 or term.summed or len(term.factors) != 1:
        return None
    (pool,) = term.factors
    if not (isinstance(pool, _Extremum) and pool.first and pool.largest and isinstance(pool.body, sympy.Indexed)):
        return None
    x, (k,), (value,) = pool.body.base.label.name, pool.indices, saving.values
    declared, read = op.input(x), pool.body.indices
    if len(read) < 2 or declared.integer or tuple(op.output_indices) != value.indices or \
            any(not isinstance(i, sympy.Idx) or i.name != d for i, d in zip(read[:-1], declared.indices[:-1])):
        return None
    subscript, t = read[-1], next((i for i in read[-1].atoms(sympy.Idx) if i != k), None)
    size = dict(op.fixed_sizes).get(k.name)
    if t is None or size is None or tuple(op.output_indices) != tuple(declared.indices[:-1]) + (t.name,):
        return None
    stride, start = subscript.coeff(t), subscript.subs({t: 0, k: 0})
    before, after = op.pad_of(x, declared.indices[-1])
    padded = (before or after) and op.pad_value_of(x) != -sympy.oo
    if subscript != stride * t + k + start or not (stride.is_Integer and stride > 0 and start.is_Integer) or \
            before != after or before != -start or padded or 2 * before > size or \
            value.expr.start != stride * t + start:
        return None
    return NativePool(x, op.output, size, int(stride), int(before), BATCH in declared.indices)


@dataclass(frozen=True)
class NativeForward:
    """A normalization's forward, r * (x - m) * w + b (w and b over the kernel's weight dims, each optional),
    computed with its saved mean and rstd by one native kernel (`NormLayout.forward_call`)."""

    layout: NormLayout
    x: str                       # the input normalized
    weight: str | None
    bias: str | None
    eps: sympy.Expr              # index-free: the constant added to the variance
    dims: int                    # how many dims are normalized
    rank: int                    # how many x has
    comment = "the normalization and its statistics in one native kernel"

    def call(self, text: Callable[[sympy.Expr], str]) -> str:
        """The call, given the printer of an index-free expression (eps)."""
        return self.layout.forward_call(self.x, self.weight or "None", self.bias or "None", text(self.eps), self.dims,
                                        self.rank)

    @property
    def view(self) -> str:
        """What the call's mean and rstd are viewed as to be the saved values ("" for as they come)."""
        return self.layout.statistics_view(self.x, self.dims)

    @property
    def output_view(self) -> str:
        """What the call's result is viewed as to be the op's ("" for as it comes)."""
        return self.layout.output_view(self.x)


def _native_forward(layout: NormLayout):
    """The NativeForward of a forward whose terms are those of a normalization that `layout` fits, or None."""
    def match(op, forward: list[Term], saving: Saving) -> NativeForward | None:
        body, dims, m, r = saving.found
        if m is None or layout.forward_call is None or not layout.applies(body.indices, dims) \
                or any(v.recompute for v in saving.values):
            return None        # a formula reads the statistics: a double backward needs their graph
        x = body.base.label.name
        # (an optional input is given on this path: None takes the op's variant without it)
        if tuple(i.name for i in body.indices) != tuple(op.input(x).indices) or len(set(body.indices)) != len(body.indices):
            return None
        weight_dims = tuple(layout.weight_dims(body.indices, dims))
        names = {t.name for t in op.inputs if not t.integer}

        def affine(factor) -> str | None:
            if isinstance(factor, sympy.Indexed) and factor.indices == weight_dims and factor.base.label.name in names \
                    and factor.base.label.name != x and tuple(op.input(factor.base.label.name).indices) == \
                    tuple(i.name for i in weight_dims):
                return factor.base.label.name
            return None

        scaled = [t for t in forward if len(t.factors) > 1 or t.factors and t.factors[0] in (r, body - m)]
        shifted = [t for t in forward if t not in scaled]
        if len(scaled) != 1 or len(shifted) > 1 or any(t.coefficient != 1 or t.summed for t in forward):
            return None
        rest = list(scaled[0].factors)
        if r not in rest or body - m not in rest:
            return None
        rest.remove(r)
        rest.remove(body - m)
        weight = affine(rest[0]) if len(rest) == 1 else None
        bias = affine(shifted[0].factors[0]) if shifted and len(shifted[0].factors) == 1 else None
        if (rest and weight is None) or len(rest) > 1 or (shifted and bias is None):
            return None
        rstd = next(v for v in saving.values if v.name == r.base.label.name)
        eps = rstd.expr.base.as_independent(sympy.Sum, as_Add=True)[0]
        if eps.atoms(sympy.Indexed) or free_indices(eps):
            return None
        return NativeForward(layout, x, weight, bias, eps, len(dims), len(body.indices))
    return match


def _normalization_vjp(layout: NormLayout, node: type):
    """The VJP shapes of xhat = (x - m) * r over the normalized dims R (|R| = D values), g any product over x's dims:

        a * r * g - a/D * sum over R' of r * g[R'] - a/D * sum over R' of r**3 * c[R'] * c * g[R']
            ->  a * node(0, g, ...)        (c = x - m; R' a copy of R)
        a * sum over the dims the weight lacks of r * c * h  ->  a * node(1, h, like, ...)

    where `layout` says the kernel applies to x's dims (the kernel wants a weight to give d/dw its shape:
    the input differentiated, `like`, has it)."""
    def fuse(terms: list[Term], found: tuple, like) -> list[Term]:
        if not found or like is None:
            return terms
        body, dims, m, r = found
        if m is None or not layout.applies(body.indices, dims):
            return terms
        size = sympy.Mul(*[i.upper + 1 for i in dims])
        x = body.base
        weight_dims = layout.weight_dims(body.indices, dims)
        call_dims = sympy.Tuple(*dims)
        if len(terms) == 1:
            (term,) = terms
            rest = list(term.factors)
            centered = body - m
            summed = {i.name for i in body.indices} - {i.name for i in weight_dims}
            name, wanted = like
            h = sympy.Mul(*rest)
            if {i.name for i in term.summed} == summed and not h.has(x) and not h.has(r.base) \
                    and free_indices(h) == {i.name for i in body.indices} \
                    and tuple(wanted) == tuple(i.name for i in weight_dims):
                # a bias's gradient, sum of g over the dims the weight lacks: the kernel's third output
                bias = tensor_symbol(name)[tuple(weight_dims)]
                return [Term(term.coefficient, (node(2, h, bias, body, m, r, call_dims),), ())]
            if {i.name for i in term.summed} == summed and r in rest and centered in rest:
                rest.remove(r)
                rest.remove(centered)
                h = sympy.Mul(*rest)
                if not h.has(x) and tuple(wanted) == tuple(i.name for i in weight_dims):
                    weight = tensor_symbol(name)[tuple(weight_dims)]
                    return [Term(term.coefficient, (node(1, h, weight, body, m, r, call_dims),), ())]
            return terms
        if len(terms) != 3:
            return terms
        plain = [t for t in terms if not t.summed]
        if len(plain) != 1 or r not in plain[0].factors:
            return terms
        a = plain[0].coefficient
        g = sympy.Mul(*[f for f in plain[0].factors if f != r])
        if not set(dims) <= g.atoms(sympy.Idx) or g.has(x):
            return terms
        others = [t for t in terms if t is not plain[0]]
        for first, second in (others, others[::-1]):
            if first.coefficient != -a / size or second.coefficient != -a / size:
                continue
            for copy in _renamings(dims, list(first.summed)):
                if len(first.summed) != len(dims) or sympy.Mul(*first.factors) != r * g.xreplace(copy):
                    continue
                for other in _renamings(dims, list(second.summed)):
                    if len(second.summed) == len(dims) and sympy.Mul(*second.factors) == \
                            r ** 3 * (body.xreplace(other) - m) * (body - m) * g.xreplace(other):
                        return [Term(a, (node(0, g, sympy.S.One, body, m, r, call_dims),), ())]
        return terms
    return fuse


def _weight_out(grad: sympy.Expr, weight_dims: tuple) -> tuple[sympy.Expr, sympy.Indexed | None]:
    """A weight over `weight_dims` that multiplies grad_out is passed as the kernel's weight instead of being
    multiplied in: (the rest, the weight or None)."""
    weights = [f for f in sympy.Mul.make_args(grad) if isinstance(f, sympy.Indexed) and f.indices == tuple(weight_dims)]
    return (grad / weights[0], weights[0]) if weights else (grad, None)


def _print_norm(call):
    """`call(printer, node, grad text, weight text, x, mean, rstd, dims)` -> one output of the kernel, in x's layout."""
    def print_(printer, node, factor=sympy.S.One):
        part, grad, weight, x, mean, rstd, dims = node.args
        weight_dims = kernel_of(node).weight_dims(x.indices, tuple(dims))
        grad = factor * grad
        if weight == 1:
            grad, weight = _weight_out(grad, weight_dims)
        layout = tuple(i.name for i in x.indices)
        weights = ("None" if weight is None else weight.base.label.name, "None") if part != 2 \
            else ("None", weight.base.label.name)
        text = call(printer, printer.text(grad, layout), *weights, x, mean, rstd, tuple(dims), layout, _mask(part))
        text = f"{text}[{part}]{kernel_of(node).output_view(part, x, tuple(dims))}"
        return printer.placed(text, layout if part == 0 else tuple(i.name for i in weight_dims))
    return print_


def _mask(part) -> str:
    return "[" + ", ".join(str(part == k) for k in range(3)) + "]"


def joint_key(node: Fused, factor: sympy.Expr = sympy.S.One) -> tuple | None:
    """What makes two outputs of a normalization kernel one call (the kernel, its grad_out, x, mean, rstd, dims),
    or None for another kernel; with `joint_weights`, the weight and bias the call passes."""
    if not isinstance(node, _normalization_backward):
        return None
    part, grad, weight, x, mean, rstd, dims = node.args
    if part == 0 and weight == 1:
        grad, _ = _weight_out(factor * grad, kernel_of(node).weight_dims(x.indices, tuple(dims)))
    else:
        grad = factor * grad
    return type(node), grad, x, mean, rstd, dims


def joint_weights(node: Fused, factor: sympy.Expr = sympy.S.One) -> tuple[int, sympy.Expr | None, sympy.Expr | None]:
    """(part, the weight it passes or None, the bias it passes or None) of one output's call."""
    part, grad, weight, x, _, _, dims = node.args
    if part == 0:
        return 0, _weight_out(factor * grad, kernel_of(node).weight_dims(x.indices, tuple(dims)))[1] \
            if weight == 1 else weight, None
    return (1, weight, None) if part == 1 else (2, None, weight)


def joint_call(printer, node: Fused, factor: sympy.Expr, weight, bias, mask: str) -> str:
    """The kernel's call that returns all its outputs (those `mask`, a list's text, asks for), for `node`'s arguments."""
    _, _, _, x, mean, rstd, dims = node.args
    key = joint_key(node, factor)
    layout = tuple(i.name for i in x.indices)
    name = lambda t: "None" if t is None else t.base.label.name  # noqa: E731
    return kernel_of(node).joint(printer, printer.text(key[1], layout), name(weight), name(bias), x, mean, rstd,
                                 tuple(dims), layout, mask)


def _layer_norm_call(printer, grad, weight, bias, x, mean, rstd, dims, layout, mask):
    # mean and rstd keep the normalized dims, as native_layer_norm returns them (vmap's rule needs it)
    name = x.base.label.name
    return (f"torch.ops.aten.native_layer_norm_backward({grad}, {name}, {name}.shape[-{len(dims)}:], "
            f"{_detached(printer.text(mean, layout))}, {_detached(printer.text(rstd, layout))}, {weight}, {bias}, "
            f"{mask})")


def _detached(text: str) -> str:
    """A saved statistic as a kernel takes it: a double backward computes it again from x, with its graph, for
    the formulas; the kernel's own derivative accounts for it (and refuses one that requires grad)."""
    return f"{text}.detach()"


def _batch_norm_call(printer, grad, weight, bias, x, mean, rstd, dims, layout, mask):
    # training mode reads the saved mean and rstd (eps is only read in eval mode); the bias's gradient needs no bias
    name = x.base.label.name
    return (f"torch.ops.aten.native_batch_norm_backward({grad}, {name}, {weight}, None, None, "
            f"{_detached(mean.base.label.name)}, {_detached(rstd.base.label.name)}, True, 0.0, {mask})")


def _group_norm_call(printer, grad, weight, bias, x, mean, rstd, dims, layout, mask):
    # the kernel gives d/dweight and d/dbias the weight's shape, over g * c (and needs the weight for either)
    name = x.base.label.name
    weight = _flat(bias if weight == "None" else weight)    # d/dbias alone: the kernel reads only its shape
    sizes = ", ".join(_group_sizes(name, len(dims), len(layout)))
    lead = len(layout) - len(dims) - 1
    flat = "" if lead == 1 else ".reshape(1, -1)" if lead == 0 else f".flatten(0, {lead - 1})"
    return (f"torch.ops.aten.native_group_norm_backward({grad}, {name}, {_detached(mean.base.label.name + flat)}, "
            f"{_detached(rstd.base.label.name + flat)}, {weight}, {sizes}, {mask})")


def _group_weight_view(part: int, x: sympy.Indexed, dims: tuple) -> str:
    """d/dweight and d/dbias of native_group_norm_backward, over g * c, viewed as (g, c)."""
    lead = len(x.indices) - len(dims) - 1
    return "" if part == 0 else f".view({x.base.label.name}.shape[{lead}:{lead + 2}])"


def _renamings(dims, candidates):
    """Each map of the dims to distinct `candidates` of the same sizes."""
    if not dims:
        yield {}
        return
    first, rest = dims[0], dims[1:]
    for candidate in candidates:
        if candidate.upper == first.upper:
            for more in _renamings(rest, [c for c in candidates if c != candidate]):
                yield {first: candidate, **more}


# Running sums: sum over s of f[s] where s <= t (or <, >=, >) ------------------------------------

# (relation of s to t, as s REL t) -> (reverse, exclusive)
CUMULATIVE = {sympy.LessThan: (0, 0), sympy.StrictLessThan: (0, 1), sympy.GreaterThan: (1, 0),
              sympy.StrictGreaterThan: (1, 1)}


def _cumulative(terms: list[Term], found=(), like=None) -> list[Term]:
    return [_running_sum(term) for term in terms]


def _running_sum(term: Term) -> Term:
    """sum over s of where(s <= t, v, 0) * f[s]  ->  cumsum(v * f, s, t): the mask of positions s <= t is never
    built. s is summed, s and t range over one size, and the factors that read s do not read t (t may be
    summed too: then the running sum is read at each t and summed there)."""
    for mask in term.factors:
        if not (isinstance(mask, sympy.Piecewise) and len(mask.args) == 2 and mask.args[1] == (0, True)):
            continue
        value, condition = mask.args[0]
        if type(condition) not in CUMULATIVE or not all(isinstance(side, sympy.Idx) for side in condition.args):
            continue
        factors = [f for f in term.factors if f is not mask] + list(sympy.Mul.make_args(value))
        for s, t, relation in (*condition.args, type(condition)), (*condition.reversed.args, type(condition.reversed)):
            if s not in term.summed or s.upper != t.upper:
                continue
            inside = [f for f in factors if s.name in free_indices(f)]
            body = sympy.Mul(*inside)
            if t.name in free_indices(body) or not inside:
                continue
            reverse, exclusive = CUMULATIVE[relation]
            rest = tuple(f for f in factors if s.name not in free_indices(f) and f != 1)
            call = cumsum(body, s, t, sympy.Integer(reverse), sympy.Integer(exclusive))
            return Term(term.coefficient, rest + (call,), tuple(i for i in term.summed if i != s))
    return term


def _print_cumsum(printer, node, factor=sympy.S.One):
    """torch.cumsum along the dim s, read as t (a reversed one flips before and after); a strict one
    subtracts the body: sum over s < t of f[s] is cumsum(f)[t] - f[t]."""
    body, s, t, reverse, exclusive = node.args
    layout = tuple(s.name if i == t.name else i for i in printer.layout)
    if t.name not in printer.layout:
        raise ValueError(f"a running sum along {s} is read at {t}, which its layout {printer.layout} lacks")
    dim = layout.index(s.name) - len(layout)     # from the end: leading dims the body lacks are not written
    text = printer.text(factor * body, layout)
    operand = text if re.fullmatch(r"[\w.]+", text) else f"({text})"
    total = f"{operand}.flip({dim}).cumsum({dim}).flip({dim})" if reverse else f"torch.cumsum({text}, {dim})"
    return f"({total} - {operand})" if exclusive else total


# Diagonals: where(i == j, f[i], 0) ----------------------------------------------------------------

def _diagonal(terms: list[Term], found=(), like=None) -> list[Term]:
    return [_on_diagonals(term) for term in terms]


def _on_diagonals(term: Term) -> Term:
    """`_on_diagonal` until no mask is left to place: a[i, i, i]'s gradient has two, where(i == j) and where(i == k)."""
    while (placed := _on_diagonal(term)) != term:
        term = placed
    return term


def _on_diagonal(term: Term) -> Term:
    """where(i == j, v, 0) * f[i]  ->  diag_embed(v * f, i, j), for free indices i and j of one size and factors
    that read i, not j: a diagonal's gradient (a[i, i] read) without the (i, j) mask of positions."""
    for mask in term.factors:
        if not _index_mask(mask):
            continue
        value, condition = mask.args[0]
        i, j = condition.args
        factors = [f for f in term.factors if f is not mask] + list(sympy.Mul.make_args(value))
        if i.upper != j.upper or {i, j} <= set(term.summed):
            continue
        if {i, j} & set(term.summed):      # sum over j of where(i == j, f[j], 0) is f[i]: j is summed away
            j, i = (i, j) if i in term.summed else (j, i)
            return Term(term.coefficient, tuple(replace_index(f, j, i) for f in factors if f != 1),
                        tuple(k for k in term.summed if k != j))
        for i, j in ((i, j), (j, i)):
            # the factors that read i (or, when none does, all: a trace's gradient is grad_y on the diagonal)
            # (another mask of positions is placed next, around this one: a[i, i, i]'s gradient has two)
            values = [f for f in factors if not _index_mask(f)]
            inside = [f for f in values if free_indices(f) & {i.name, j.name}] or [f for f in values if f != 1]
            body = sympy.Mul(*inside)
            if j.name not in free_indices(body) and (i.name in free_indices(body) or BATCH not in free_indices(body)):
                rest = tuple(f for f in factors if not any(f is g for g in inside) and f != 1)
                return Term(term.coefficient, rest + (diag_embed(body, i, j),), term.summed)
    return term


def _index_mask(factor) -> bool:
    """where(i == j, v, 0): a mask of index positions (a diagonal's), with any value v."""
    return isinstance(factor, sympy.Piecewise) and len(factor.args) == 2 and factor.args[1] == (0, True) \
        and isinstance(factor.args[0][1], sympy.Equality) and all(isinstance(a, sympy.Idx) for a in factor.args[0][1].args)


def _print_diag_embed(printer, node, factor=sympy.S.One):
    """torch.diag_embed of the body laid out with i last, its diagonal placed at the dims of i and j."""
    body, i, j = node.args
    have = free_indices(body) | {i.name, j.name}
    out = tuple(x for x in printer.layout if x in have)
    inner = tuple(x for x in out if x not in (i.name, j.name)) + (i.name,)
    text = printer.text(factor * body, inner)
    if i.name not in free_indices(body):     # the same value all along the diagonal (lined up, i has size 1)
        operand = text if re.fullmatch(r"[\w.]+", text) else f"({text})"
        text = f"{operand}.expand({', '.join(['-1'] * (len(inner) - 1) + [printer.text(i.upper + 1)])})"
    dims = (out.index(i.name) - len(out), out.index(j.name) - len(out))
    return printer.placed(f"torch.diag_embed({text}, 0, {dims[0]}, {dims[1]})", out)


LOG_SOFTMAX_FORMULA = "_log_softmax_backward_data(g, y, dim) = g - exp(y) * sum(g, dim)"
ONE_HOT_FORMULAS = (LOG_SOFTMAX_FORMULA,
                    "nll_loss_backward(v, y, t, reduction=2) = zeros like y, with -v at [i, t[i]]")
LAYER_NORM_FORMULAS = ("native_layer_norm_backward(g, x, ..., w)[0] = rstd * (g w - mean(g w) - "
                       "xhat * mean(g w xhat)), xhat = (x - mean) * rstd",
                       "native_layer_norm_backward(g, x, ...)[1] = sum over rows of g * xhat",
                       "native_layer_norm_backward(g, x, ...)[2] = sum over rows of g")
BATCH_NORM_FORMULAS = ("native_batch_norm_backward(g, x, w, ...)[0] = rstd * (g w - mean(g w) - xhat * mean(g w xhat)) "
                       "over all dims but 1, xhat = (x - mean) * rstd",
                       "native_batch_norm_backward(g, x, ...)[1] = sum over all dims but 1 of g * xhat",
                       "native_batch_norm_backward(g, x, ...)[2] = sum over all dims but 1 of g")

GROUP_NORM_FORMULAS = ("native_group_norm_backward(g, x, ..., w)[0] = rstd * (g w - mean(g w) - xhat * mean(g w xhat)) "
                       "over each group, xhat = (x - mean) * rstd",
                       "native_group_norm_backward(g, x, ...)[1] = sum over all dims but (g, c) of g * xhat",
                       "native_group_norm_backward(g, x, ...)[2] = sum over all dims but (g, c) of g")

KERNELS: tuple[Kernel, ...] = (
    Kernel("threshold_backward", threshold_backward, _step(_threshold),
           _print_step("torch.ops.aten.threshold_backward"),
           ("threshold_backward(g, x, 0) = where(x <= 0, 0, g)",)),
    Kernel("leaky_relu_backward", leaky_relu_backward, _step(_leaky_relu),
           _print_step("torch.ops.aten.leaky_relu_backward", "False"),
           ("leaky_relu_backward(g, x, s, False) = where(x > 0, g, s * g)",)),
    Kernel("values costly to recompute", None, lambda terms, found, like: terms, None, (), save=save_reduced_values),
    Kernel("_softmax_backward_data", softmax_backward, _softmax_vjp, _print_vjp("torch._softmax_backward_data"),
           ("_softmax_backward_data(g, y, dim) = y * (g - sum(g * y, dim))",)),
    Kernel("_log_softmax_backward_data", log_softmax_backward, _log_softmax_vjp,
           _print_vjp("torch._log_softmax_backward_data"), (LOG_SOFTMAX_FORMULA,), save=save_forward_values),
    Kernel("nll_loss_backward", one_hot_log_softmax_backward, _scaled_pair(_one_hot_pair), _print_one_hot_vjp,
           ONE_HOT_FORMULAS, comments=_one_hot_comments, sizes=_one_hot_sizes),
    Kernel("native_group_norm_backward", group_norm_backward, _normalization_vjp(GROUP, group_norm_backward),
           _print_norm(_group_norm_call), GROUP_NORM_FORMULAS, joint=_group_norm_call,
           comments=lambda node, factor: (GROUP_NORM_FORMULAS[node.args[0]],), save=save_normalization,
           weight_dims=GROUP.weight_dims, needs_call=True, native_forward=_native_forward(GROUP),
           differentiable=False, native_only=True, output_view=_group_weight_view),
    Kernel("native_layer_norm_backward", layer_norm_backward, _normalization_vjp(LAYER, layer_norm_backward),
           _print_norm(_layer_norm_call), LAYER_NORM_FORMULAS, joint=_layer_norm_call,
           comments=lambda node, factor: (LAYER_NORM_FORMULAS[node.args[0]],), save=save_normalization,
           weight_dims=LAYER.weight_dims, needs_call=True, native_forward=_native_forward(LAYER)),
    Kernel("native_batch_norm_backward", batch_norm_backward, _normalization_vjp(BATCH_NORM, batch_norm_backward),
           _print_norm(_batch_norm_call), BATCH_NORM_FORMULAS, joint=_batch_norm_call,
           comments=lambda node, factor: (BATCH_NORM_FORMULAS[node.args[0]],), save=save_normalization,
           weight_dims=BATCH_NORM.weight_dims, needs_call=True, native_forward=_native_forward(BATCH_NORM)),
    Kernel("normalization statistics", None, lambda terms, found, like: terms, None, (), save=save_statistics),
    Kernel("first extremum positions", None, lambda terms, found, like: terms, None, (), save=save_first_positions,
           native_forward=_native_pool),
    Kernel("cumsum", cumsum, _cumulative, _print_cumsum,
           ("cumsum(f, d)[t] = sum over s <= t of f[s]; f.flip(d).cumsum(d).flip(d)[t] = sum over s >= t of f[s]",),
           sizes=lambda node, factor: set(), forward=True),
    Kernel("diag_embed", diag_embed, _diagonal, _print_diag_embed,
           ("diag_embed(f, 0, d1, d2)[..., i, j] = f[..., i] where i == j, else 0",),
           sizes=lambda node, factor: set() if node.args[1].name in free_indices(node.args[0])
           else {node.args[1].upper + 1}, forward=True),
)
KERNEL_OF.update({kernel.node: kernel for kernel in KERNELS if kernel.node is not None})
