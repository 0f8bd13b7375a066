"""The function table: SymPy functions derive adds, and the rewrites that make specs stable.

Each function states its derivative in terms of itself, so a backward that needs
sigmoid(x) or softmax(x) again can reuse the forward's result. The rewrites turn
numerically fragile spellings of a spec into these functions before differentiation:

    log(1 + exp(a))            -> softplus(a)          (no overflow for large a)
    1 / (1 + exp(-a))          -> sigmoid(a)
    log(sum(exp(a), c))        -> logsumexp(a, c)      (max-shifted by torch.logsumexp)
    exp(a) / sum(exp(a), c)    -> softmax(a, c)        (max-shifted by torch.softmax)
    log(softmax(a, c))         -> a - logsumexp(a, c)
    log(sigmoid(a))            -> -softplus(-a)
    log(1 + a)                 -> log1p(a)

They apply to any spec, matched structurally on the SymPy tree.
"""

from __future__ import annotations

import collections
import itertools
import functools

import sympy
from sympy.codegen.cfunctions import log1p
from sympy.core.cache import cacheit
from .naming import BATCH


class Sum(sympy.Sum):
    """sum over the limits of `function` that never moves a where() out of the reduction binding its condition.

    SymPy's Sum() folds every Piecewise of its summand to the top (piecewise_fold), and that fold goes into
    sums nested in the summand too: sum over n of g[n] * sum over k of where(x[n, k] > 0, w[k], 0) would
    become where(x[n, k] > 0, sum over n of g[n] * sum over k of w[k], 0), with k outside the only sum that
    binds it. Here a Piecewise whose condition uses an index bound by a sum, logsumexp or softmax inside the
    summand stays where it is, as one elementwise factor there; the rest folds as in SymPy. SymPy rebuilds a
    Sum with its own class (diff, xreplace, expand), so every sum derive makes or derives keeps the rule.
    """

    @cacheit    # (derivation and planning build the same sums many times over)
    def __new__(cls, function, *limits, **assumptions):
        function = sympy.sympify(function)
        masks = _pinned_piecewise(function)
        total = super().__new__(cls, function.xreplace(masks), *limits, **assumptions)
        if masks and isinstance(total, sympy.Sum):
            unmasked = total.function.xreplace({mask: piece for piece, mask in masks.items()})
            total._args = (unmasked, *total.limits)
            total.__dict__.pop("_free_symbols", None)
        return total

    @property
    def free_symbols(self) -> set[sympy.Symbol]:
        """SymPy's, computed once per sum (SymPy asks for it again at each `is_number`); a copy, as SymPy's is."""
        if "_free_symbols" not in self.__dict__:
            self.__dict__["_free_symbols"] = frozenset(super().free_symbols)
        return set(self.__dict__["_free_symbols"])


def fold_piecewise(expr: sympy.Expr) -> sympy.Expr:
    """sympy.piecewise_fold(expr), except that a Piecewise stays inside each sum that binds its condition."""
    masks = _pinned_piecewise(expr)
    return sympy.piecewise_fold(expr.xreplace(masks)).xreplace({mask: piece for piece, mask in masks.items()})


def _pinned_piecewise(expr: sympy.Expr) -> dict[sympy.Piecewise, sympy.Dummy]:
    """A Dummy for each Piecewise in `expr` whose condition uses an index that a sum, logsumexp or softmax
    in `expr` binds: piecewise_fold would move it out of that reduction."""
    pinned: dict[sympy.Piecewise, sympy.Dummy] = {}

    def visit(node: sympy.Basic, bound: frozenset) -> None:
        if isinstance(node, sympy.Piecewise) and bound:
            conditions = set().union(*(c.atoms(sympy.Idx) for _, c in node.args))
            if conditions & bound:
                pinned.setdefault(node, sympy.Dummy("where"))
                return
        bound = bound | _bound_by(node)
        for arg in node.args:
            visit(arg, bound)

    visit(expr, frozenset())
    return pinned


def _bound_by(node: sympy.Basic) -> set[sympy.Idx]:
    """The indices a sum, a logsumexp or a softmax binds in its body (a max or min, and its shares, too)."""
    if isinstance(node, sympy.Sum):
        return {limit[0] for limit in node.limits}
    if isinstance(node, _OverIndex):
        return {node.index}
    if isinstance(node, (_Extremum, is_max)):
        return set(node.indices)
    if isinstance(node, first_max):
        return {node.index}
    return set()


class sigmoid(sympy.Function):  # noqa: N801 - named like the math
    """1 / (1 + exp(-a))."""

    is_real = True

    @classmethod
    def eval(cls, arg):
        if arg.is_number:      # a constant: its closed form, which SymPy can compare and evaluate
            return 1 / (1 + sympy.exp(-arg))
        return None

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, arg, **kwargs):
        return 1 / (1 + sympy.exp(-arg))


class softplus(sympy.Function):  # noqa: N801
    """log(1 + exp(a))."""

    is_real = True

    @classmethod
    def eval(cls, arg):
        if arg.is_number:
            return sympy.log(1 + sympy.exp(arg))
        return None

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class power(sympy.Function):  # noqa: N801
    """base ** exponent for an exponent that is not a number (a param or a 0-d tensor), while it is
    differentiated: its derivatives are torch's (pow_backward), where SymPy's own rule for Pow,
    exponent * base**exponent / base, is NaN at base 0. Never evaluated: `as_pow` turns it back."""

    def fdiff(self, argindex=1):
        base, exponent = self.args
        if argindex == 1:
            return exponent * base ** (exponent - 1) if exponent.is_zero is False else power_slope(base, exponent)
        return base ** exponent * sympy.log(base) if base.is_zero is False \
            else power_log(base, exponent, base ** exponent)


class power_slope(sympy.Function):  # noqa: N801
    """d base**exponent / d base = exponent * base**(exponent - 1), but 0 where the exponent is 0, even
    at base 0 (where 0 * 0**-1 is NaN), as torch's pow_backward. An elementwise function, not a
    Piecewise, so that the deltas around it are eliminated as around any other factor."""

    is_real = True

    def _eval_rewrite_as_Piecewise(self, base, exponent, **kwargs):
        return sympy.Piecewise((0, sympy.Eq(exponent, 0)), (exponent * base ** (exponent - 1), True))


class power_log(sympy.Function):  # noqa: N801
    """d base**exponent / d exponent = base**exponent * log(base), but 0 at base 0 with exponent >= 0
    (where 0 * log(0) is NaN), as torch's pow_backward_exponent. The third argument is the power
    base**exponent itself: where it is the op's result, the backward reads the result instead (as torch's)."""

    nargs = 3
    is_real = True

    def _eval_rewrite_as_Piecewise(self, base, exponent, value, **kwargs):
        return sympy.Piecewise((0, sympy.Eq(base, 0) & (exponent >= 0)), (value * sympy.log(base), True))


class atan2(sympy.atan2):  # noqa: N801
    """atan2(a, b), the angle of the point (b, a), with torch's derivatives (atan2_backward):
    d/da = b * atan2_scale(a, b) and d/db = -a * atan2_scale(a, b), which are 0 at a = b = 0 (where
    SymPy's b / (a**2 + b**2) is NaN)."""

    def fdiff(self, argindex=1):
        a, b = self.args
        if argindex == 1:
            return b * atan2_scale(a, b)
        if argindex == 2:
            return -a * atan2_scale(a, b)
        raise sympy.ArgumentIndexError(self, argindex)


class atan2_scale(sympy.Function):  # noqa: N801
    """1 / (a**2 + b**2), but 0 where a**2 + b**2 is 0 (also where it underflows to 0), as torch's
    atan2_backward masks the reciprocal. Written out whenever a or b is a nonzero number."""

    nargs = 2
    is_real = True

    @classmethod
    def eval(cls, a, b):
        if (a.is_number and a.is_zero is False) or (b.is_number and b.is_zero is False):
            return 1 / (a ** 2 + b ** 2)
        return None

    def _eval_rewrite_as_Piecewise(self, a, b, **kwargs):
        squares = a ** 2 + b ** 2
        return sympy.Piecewise((0, sympy.Eq(squares, 0)), (1 / squares, True))


class sign(sympy.sign):  # noqa: N801
    """sign(a) with torch's derivative: 0 everywhere, at a = 0 too (SymPy's is 2 * DiracDelta(a))."""

    def _eval_derivative(self, symbol):
        return sympy.S.Zero


class Abs(sympy.Abs):
    """|a| as torch.abs differentiates it: SymPy rewrites |a| to a where it can prove a >= 0 (|Max(p, 0)| to
    Max(p, 0)), which changes the derivative where a = 0 (torch: abs'(0) = 0, whatever a's own derivative). Kept
    as |a| unless a > 0, where both agree."""

    @classmethod
    def eval(cls, arg):
        if arg.is_extended_nonnegative and not arg.is_extended_positive and not arg.is_zero:
            return None
        return super().eval(arg)

    def _eval_derivative(self, symbol):
        # every value of a spec is real (asin(tanh(x)) too, which SymPy cannot prove): sign(a) * a', never SymPy's
        # complex form (re(a) re(a)' + im(a) im(a)') / |a|, which is 0 / 0 at a = 0
        return sympy.Derivative(self.args[0], symbol, evaluate=True) * sympy.sign(self.args[0])


# Elementwise derivatives whose formula is undefined at some point, where they take torch's value instead.
SPECIAL_POINTS = (power_slope, power_log, atan2_scale)


def differentiable_powers(expr: sympy.Expr) -> sympy.Expr:
    """Every Pow with a symbolic exponent as `power`, so that differentiating uses its rule."""
    return expr.replace(lambda e: isinstance(e, sympy.Pow) and not e.exp.is_number,
                        lambda e: power(*e.args))


def as_pow(expr: sympy.Expr) -> sympy.Expr:
    return expr.replace(lambda e: isinstance(e, power), lambda e: sympy.Pow(*e.args))


class Tied(sympy.Function):
    """Max or Min of two arguments with the spec's tie convention, `Max(a, b, tie=t)`: where a == b, a gets
    the share t of the gradient and b the share 1 - t. SymPy's own Max and Min split a tie evenly, as
    torch.maximum and torch.minimum do; the derivative carries the convention as the value of its unit
    step at 0: d Max(a, b, tie=t) / da = Heaviside(a - b, t)."""

    nargs = 3
    is_real = True
    untied_function = sympy.Max     # the function without the convention: sympy.Max or sympy.Min
    sign = 1                        # d/da is a step of sign * (a - b)

    @classmethod
    def eval(cls, first, second, tie):
        untied = cls.untied_function(first, second)
        if (first - second).is_number:      # no tie at all, or the same argument twice (its shares add up to 1)
            return untied
        if tie == sympy.S.Half and not restructured(untied, first, second):
            return untied
        return None

    @property
    def untied(self) -> sympy.Expr:
        return self.untied_function(*self.args[:2])

    def fdiff(self, argindex=1):
        first, second, tie = self.args
        if argindex == 1:
            return sympy.Heaviside(self.sign * (first - second), tie)
        if argindex == 2:
            return sympy.Heaviside(self.sign * (second - first), 1 - tie)
        raise sympy.ArgumentIndexError(self, argindex)


def restructured(untied: sympy.Expr, first: sympy.Expr, second: sympy.Expr) -> bool:
    """Whether SymPy's Max/Min of two arguments changed the nesting that torch's pairwise maximum/minimum
    follows at a tie: Max(Max(a, b), c) flattened to Max(a, b, c) (whose derivative gives each of three tied
    arguments half the gradient, 3/2 in all, where torch.maximum's nest gives a and b a quarter, c a half), or
    Max(a, Min(a, b)) absorbed into a (torch: a 3/4, b 1/4 at a == b). Only an argument that is itself a Max or
    Min can be restructured so; any other rewrite (Max(x**2, 0) to x**2) proves one argument never below the
    other, so at a tie their derivatives agree and any split of the gradient is the same."""
    if isinstance(untied, (sympy.Max, sympy.Min)) and set(untied.args) == {first, second}:
        return False
    return any(argument.has(sympy.Max, sympy.Min) for argument in (first, second))


class max_tie(Tied):  # noqa: N801
    untied_function = sympy.Max


class min_tie(Tied):  # noqa: N801
    untied_function = sympy.Min
    sign = -1


def fresh_index(index: sympy.Idx, taken: set[str]) -> sympy.Idx:
    """A new index over the same range as `index` whose name is not `taken`: k_1, k_2, ..."""
    for n in itertools.count(1):
        name = f"{index.name}_{n}"
        if name not in taken:
            return sympy.Idx(name, index.upper + 1)


def _index_names(*exprs: sympy.Expr) -> set[str]:
    return {i.name for e in exprs for i in e.atoms(sympy.Idx)}


class _OverIndex(sympy.Function):
    """A function of an expression along one of its indices: f(body, index)."""

    nargs = 2
    is_real = True

    @property
    def body(self):
        return self.args[0]

    @property
    def index(self):
        return self.args[1]


class logsumexp(_OverIndex):  # noqa: N801
    """log(sum(exp(body), index)): `index` is bound."""

    def _eval_derivative(self, symbol):
        share = softmax(self.body, self.index)
        if self.index.name.startswith(BATCH):    # over the batch dims, however many: no softmax kernel takes them
            other = fresh_index(self.index, _index_names(self, symbol))
            share = sympy.exp(self.body - logsumexp(self.body.xreplace({self.index: other}), other))
        return Sum(share * self.body.diff(symbol), (self.index, 0, self.index.upper))


class softmax(_OverIndex):  # noqa: N801
    """exp(body) / sum(exp(body), index), at the position `index` (which stays free)."""

    def _eval_derivative(self, symbol):
        other = fresh_index(self.index, _index_names(self, symbol))
        moved = self.body.xreplace({self.index: other})
        rest = Sum(softmax(moved, other) * moved.diff(symbol), (other, 0, other.upper))
        return self * (self.body.diff(symbol) - rest)


class log_softmax(_OverIndex):  # noqa: N801
    """body - logsumexp(body, index), at the position `index` (which stays free): one fused kernel in
    PyTorch where the difference would be a logsumexp (four kernels) and a subtraction."""

    def _eval_derivative(self, symbol):
        other = fresh_index(self.index, _index_names(self, symbol))
        moved = self.body.xreplace({self.index: other})
        return self.body.diff(symbol) - Sum(softmax(moved, other) * moved.diff(symbol),
                                                  (other, 0, other.upper))


class _Extremum(sympy.Function):
    """The largest (or smallest) value of `body` over the indices after it, which it binds: max(x[n, c], c).

    Its derivative picks, by the tie convention of the class, the share of each position along those
    indices: d max(body, c) / dw = sum over c of share[c] * d body[c] / dw, the limit of softmax (the share
    of logsumexp) at zero temperature. The shares are piecewise constant (their own derivative is zero)."""

    is_real = True
    largest = True      # max (True) or min
    first = False       # the whole gradient to the first extremal position instead of an even split

    @property
    def body(self):
        return self.args[0]

    @property
    def indices(self) -> tuple[sympy.Idx, ...]:
        return self.args[1:]

    def _eval_derivative(self, symbol):
        taken = _index_names(self, symbol)
        fresh = []
        for index in self.indices:
            fresh.append(fresh_index(index, taken))
            taken.add(fresh[-1].name)
        moved = self.body.xreplace(dict(zip(self.indices, fresh)))
        limits = [(i, 0, i.upper) for i in fresh]
        if self.first:
            share = (first_max if self.largest else first_min)(moved, fresh[0])
            return Sum(share * moved.diff(symbol), *limits)
        # the even split: each position where body reaches the extremum gets 1 / (how many do)
        counted = [fresh_index(i, taken | {f.name for f in fresh}) for i in self.indices]
        count = Sum(self._mask(self.body.xreplace(dict(zip(self.indices, counted))), counted),
                    *[(i, 0, i.upper) for i in counted])
        return Sum(self._mask(moved, fresh) * moved.diff(symbol), *limits) / count

    def _mask(self, body, positions) -> sympy.Expr:
        """1 where `body` at `positions` reaches the extremum. An input's own entry is compared with the
        extremum itself, which is one of its entries (and the forward's result, when that is all the
        forward is); an expression is compared with its own extremum, computed from the same values
        there and then: the forward may have rounded it otherwise (another layout, another kernel)."""
        if isinstance(body, sympy.Indexed):
            return reaches(body, self)
        return (is_max if self.largest else is_min)(body, *positions)


class amax(_Extremum):  # noqa: N801
    """max(body, c, ...): ties split the gradient evenly, as torch.amax does."""


class amin(_Extremum):  # noqa: N801
    """min(body, c, ...): ties split the gradient evenly, as torch.amin does."""

    largest = False


class max_first(_Extremum):  # noqa: N801
    """max(body, c, tie="first"): the whole gradient to the first maximal position along c, as torch.max(x, dim)
    and max pooling give it. One index; over several the parser nests them (the last innermost)."""

    nargs = 2
    first = True


class min_first(max_first):  # noqa: N801
    """min(body, c, tie="first"), as torch.min(x, dim)."""

    largest = False


EXTREMA = {(True, False): amax, (False, False): amin, (True, True): max_first, (False, True): min_first}


class reaches(sympy.Function):  # noqa: N801
    """1 where `value` equals `extremum`, else 0 (in value's dtype): the positions where a max or min is reached."""

    nargs = 2
    is_real = True
    precedence = 1000      # printed as one call, (a == m).to(dtype): an atom, never parenthesized

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class is_max(sympy.Function):  # noqa: N801
    """1 where `body` at the positions `indices` (which stay free, as in softmax) reaches its max over them,
    else 0."""

    is_real = True
    precedence = 1000      # printed as one call: an atom
    largest = True

    @property
    def body(self):
        return self.args[0]

    @property
    def indices(self):
        return self.args[1:]

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class is_min(is_max):  # noqa: N801
    """1 where `body` at `indices` reaches its min over them, else 0."""

    largest = False


def replace_index(expr: sympy.Expr, old: sympy.Idx, new: sympy.Idx) -> sympy.Expr:
    """`expr` with the index `old` replaced by `new`, where a function that looks along one of them as
    positions (is_max(body, k), softmax(body, k): k is both a position and the axis compared along) and whose
    body reads the other is first written with the axis bound: is_max(body, t) with body reading t_1 becomes
    reaches(body, amax(body[t -> t_2], t_2)), so that t_1 -> t makes the diagonal of the comparison, not a
    comparison along the diagonal."""
    def captures(node) -> bool:
        positions = set(node.indices) if isinstance(node, is_max) else {node.index}
        reads = node.body.atoms(sympy.Idx)
        return bool(positions & {old, new}) and bool(reads & ({old, new} - positions))

    def bound(node):
        taken = _index_names(node, old, new)
        if isinstance(node, is_max):
            fresh = []
            for index in node.indices:
                fresh.append(fresh_index(index, taken))
                taken.add(fresh[-1].name)
            moved = node.body.xreplace(dict(zip(node.indices, fresh)))
            return reaches(node.body, (amax if node.largest else amin)(moved, *fresh))
        other = fresh_index(node.index, taken)
        lse = logsumexp(node.body.xreplace({node.index: other}), other)
        return sympy.exp(node.body - lse) if isinstance(node, softmax) else node.body - lse

    unfolded = expr.replace(lambda e: isinstance(e, (is_max, softmax, log_softmax)) and captures(e), bound)
    return unfolded.xreplace({old: new})


class _FirstAlong(sympy.Function):
    """A function of where `body` (its first argument) first reaches its extremum along `index` (its second):
    piecewise constant, so its derivative is 0."""

    is_real = True
    largest = True

    @property
    def body(self):
        return self.args[0]

    @property
    def index(self):
        return self.args[1]

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class first_max(_FirstAlong):  # noqa: N801
    """1 at the first position along `index` where `body` is largest, else 0; `index` stays free, as in
    softmax(body, index)."""

    nargs = 2


class first_min(first_max):  # noqa: N801
    """1 at the first position along `index` where `body` is smallest, else 0."""

    largest = False


class first_position(_FirstAlong):  # noqa: N801
    """`start` plus the first position along `index` where `body` is largest (an integer, as torch.argmax gives
    it): where the body's read puts that position in its input (2*t + argmax for x[n, c, 2*t + k]); `index` is
    bound: first_max(body, index) is one_hot(first_position(body, index, start) - start, index). What the forward
    of a max(..., tie="first") hands to its backward (saving.save_first_positions), as autograd saves the input
    positions of max pooling's maxima."""

    nargs = 3

    @property
    def start(self):
        return self.args[2]

    def bound_index_names(self) -> set[str]:
        return {self.index.name}


class first_min_position(first_position):  # noqa: N801
    """The first position along `index` where `body` is smallest (torch.argmin)."""

    largest = False


def rewrite_log_softmax(expr: sympy.Expr, read) -> sympy.Expr:
    """Every `a * (x[..., p] - logsumexp(x[..., c], c))` inside `expr` (two summands of one sum, any
    signs) becomes `a * read(lse, x[..., p])`, where `read` gives a value for that pair (or None: no match)."""
    def fused(add):
        for lse in add.args:
            sign, core = lse.as_coeff_Mul()
            if not (isinstance(core, logsumexp) and sign in (1, -1)) or core.index.name.startswith(BATCH):
                continue
            for other in add.args:
                other_sign, access = other.as_coeff_Mul()
                value = read(core, access) if other_sign == -sign else None
                if value is not None:
                    rest = [a for a in add.args if a is not lse and a is not other]
                    return sympy.Add(other_sign * value, *rest)
        return add

    return expr.replace(lambda e: isinstance(e, sympy.Add), fused)


TIE_SHARES = (reaches, is_max, first_max)    # a max or min reduction's share of the gradient: it jumps at ties


class one_hot(sympy.Function):  # noqa: N801
    """1 where the integer tensor value `target` equals the index `position`, else 0 (a Kronecker delta)."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class in_range(sympy.Function):  # noqa: N801
    """1 where the affine subscript `value` lies in [0, size), else 0: the range of a summed index that a
    Kronecker delta was solved for (k = l - 2*t), when no factor's read carries it. The planner adds a third
    argument, a tensor whose dtype and device the generated mask takes."""

    nargs = (2, 3)
    is_real = True

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class as_float(sympy.Function):  # noqa: N801
    """The integer (or bool) input `value`, read as a number in the dtype of the tensor named `like`: generated
    code casts it (`mask.to(grad_y.dtype)`), so that a bool mask subtracts and a function of an integer
    computes in the inputs' precision. A comparison reads the integer as it is."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class window(sympy.Function):  # noqa: N801
    """A read with affine subscripts, `access`, as generated code takes it: the input padded with `front` and
    `back` entries of `value` at each dim (negative: cropped), then windows cut out of each affine dim
    (`Tensor.unfold`), so that every index of the subscripts is a dim. Reads outside the input are `value`:
    zero unless the spec's `pad_value` says (-inf for a max pool). The planner wraps each affine read in one
    (plan.py): how far a read reaches depends on the input's dims, which the read alone does not tell."""

    nargs = 5       # access, front, back, each subscript's indices in the order they are cut, and the padding value
    is_real = True

    @property
    def access(self) -> sympy.Indexed:
        return self.args[0]

    @property
    def value(self) -> sympy.Expr:
        return self.args[4]


class fold_window(sympy.Function):  # noqa: N801
    """The adjoint of a window read: `value`, a function of the two indices of the affine `subscript`
    (2*t + k), added up at each position `position` = subscript (l) that it reaches; the two indices are
    bound. What the gradient of a window read becomes when a factor cannot take the read's position as an
    affine subscript (the share of a max over the window): generated code cuts the windows back with
    Tensor.unfold's adjoint (aten.unfold_backward), no Python loop and no one-hot."""

    nargs = 4       # value, subscript, position, (outer, inner): the subscript's indices as the windows are cut
    is_real = True

    @property
    def value(self):
        return self.args[0]

    def cut(self) -> tuple[sympy.Idx, sympy.Idx]:
        """(outer, inner) of the subscript: the window's start (t), then the index along it with step 1 (k)."""
        return self.args[3][0], self.args[3][1]

    def bound_index_names(self) -> set[str]:
        return {i.name for i in self.args[1].atoms(sympy.Idx)}

    def fdiff(self, argindex=1):
        raise NotImplementedError("a folded window is the last step of a gradient, never differentiated")


def window_dims(read: window) -> tuple[str, ...]:
    """The dims of a window as generated code cuts it: each subscript's leading index at its place, the
    further ones after all of them, in the order they are cut."""
    order = read.args[3]
    return tuple(cut[0].name for cut in order) + tuple(i.name for cut in order for i in cut[1:])


def is_affine_read(expr) -> bool:
    """Whether `expr` is a read with an affine subscript (x[n, t + k]), as opposed to one by index names."""
    return isinstance(expr, sympy.Indexed) and any(
        not isinstance(i, sympy.Idx) and not i.atoms(sympy.Indexed) for i in expr.indices)


def integers_as_float(expr: sympy.Expr, integers: frozenset[str], like: str) -> sympy.Expr:
    """`expr` with every value read of an integer input (not a gather's or one-hot's index, nor one side of a
    comparison on its own) wrapped in as_float(., like)."""
    if not integers:
        return expr
    if isinstance(expr, sympy.Indexed) and expr.base.label.name in integers or \
            isinstance(expr, sympy.Symbol) and expr.name in integers:
        return as_float(expr, sympy.Symbol(like, real=True))
    if isinstance(expr, sympy.core.relational.Relational):
        # a side that is the integer itself is compared as it is (mask > 0); arithmetic on it is cast
        # (q - mask > p: a bool mask does not subtract)
        sides = [side if _is_read(side, integers) else integers_as_float(side, integers, like) for side in expr.args]
        return expr if all(a is b for a, b in zip(sides, expr.args)) else expr.func(*sides)
    if isinstance(expr, (sympy.Indexed, one_hot, as_float)) or not expr.args:
        return expr
    if isinstance(expr, sympy.Piecewise) and all(not v.atoms(sympy.Indexed) and not v.free_symbols & {
            sympy.Symbol(n, real=True) for n in integers} for v, _ in expr.args):
        # numbers chosen by a condition: a torch.where whose numbers take the dtype of `like`, not a mask's
        named = {a.base.label.name for a in expr.atoms(sympy.Indexed)} | {s.name for s in expr.free_symbols}
        if named & integers and not expr.atoms(sympy.Indexed) - {a for a in expr.atoms(sympy.Indexed)
                                                                   if a.base.label.name in integers}:
            return as_float(expr, sympy.Symbol(like, real=True))
    args = [integers_as_float(a, integers, like) for a in expr.args]
    return expr if all(a is b for a, b in zip(args, expr.args)) else expr.func(*args)


def _is_read(expr: sympy.Expr, integers: frozenset[str]) -> bool:
    """Whether `expr` is an integer input read as it is."""
    return isinstance(expr, sympy.Indexed) and expr.base.label.name in integers or \
        isinstance(expr, sympy.Symbol) and expr.name in integers


STABLE_FUNCTIONS = (sigmoid, softplus, logsumexp, softmax, log_softmax, log1p)


@functools.lru_cache(maxsize=8192)
def atoms_of(expr: sympy.Basic, *types: type) -> frozenset:
    """`expr.atoms(*types)`, computed once per expression: the planner, the lowering and the printers ask
    the same expressions for their accesses and kernel calls many times over."""
    return frozenset(expr.atoms(*types))


def bound_indices(expr) -> set[str]:
    if isinstance(expr, sympy.Sum):
        return {limit[0].name for limit in expr.limits}
    if isinstance(expr, logsumexp):
        return {expr.index.name}
    if isinstance(expr, _Extremum):
        return {i.name for i in expr.indices}
    kernel_bound = getattr(expr, "bound_index_names", None)     # a fused kernel call says what it sums away
    return kernel_bound() if kernel_bound is not None else set()


def free_indices(expr: sympy.Expr) -> set[str]:
    """Index names `expr` depends on, leaving out those a sum, logsumexp or softmax binds."""
    if isinstance(expr, sympy.Idx):
        return {expr.name}
    if isinstance(expr, sympy.Indexed):
        return set().union(*(free_indices(i) for i in expr.indices))
    inner = set().union(*(free_indices(a) for a in expr.args)) if expr.args else set()
    return inner - bound_indices(expr)


@functools.lru_cache(maxsize=4096)
def canonical(expr: sympy.Expr, depth: int = 0) -> sympy.Expr:
    """Rename every bound index by how many binders it encloses (`_h_k`), so that expressions equal up
    to renaming compare equal, and so does a reduction wherever it stands (mean(x) alone or inside a
    variance). An enclosed binder always encloses fewer, so no renaming captures another index.
    `depth` offsets the names, to keep them apart from an outer expression's."""
    return _canonical(expr, depth)[0]


def _canonical(expr: sympy.Expr, offset: int) -> tuple[sympy.Expr, int]:
    """(canonical expr, number of nested binder levels in it)."""
    if isinstance(expr, (sympy.Sum, logsumexp, _Extremum)):
        limits = [(l[0], l[0].upper) for l in expr.limits] if isinstance(expr, sympy.Sum) \
            else [(i, i.upper) for i in expr.indices] if isinstance(expr, _Extremum) \
            else [(expr.index, expr.index.upper)]
        body, height = _canonical(expr.function if isinstance(expr, sympy.Sum) else expr.body, offset)
        renaming = {index: sympy.Idx(f"_{height + offset}_{k}", upper + 1) for k, (index, upper) in enumerate(limits)}
        body = body.xreplace(renaming)
        if isinstance(expr, sympy.Sum):
            return Sum(body, *[(renaming[i], 0, upper) for i, upper in limits]), height + 1
        if isinstance(expr, _Extremum):
            return expr.func(body, *[renaming[i] for i, _ in limits]), height + 1
        return logsumexp(body, renaming[expr.index]), height + 1
    if not expr.args or isinstance(expr, (sympy.Indexed, sympy.Idx)):
        return expr, 0
    parts = [_canonical(a, offset) for a in expr.args]
    return expr.func(*[p for p, _ in parts]), max((h for _, h in parts), default=0)


def renamed_match(pattern: sympy.Expr, indices, candidate: sympy.Expr):
    """The indices of `candidate` that `pattern`'s free `indices` must be renamed to for the two to be
    equal, or None: x[n, k] - m[n] matches x[n, k_1] - m[n] with (n, k_1).

    The renaming is found by walking both trees together and binding each free index where it meets one
    of `candidate` (a unification), not by trying every assignment; the arguments of a commutative node
    (a sum, a product, Max, Min, a delta) are paired only with arguments of the same shape, so the search
    backtracks only between look-alike arguments. The renaming found is then checked as it always was."""
    if candidate.func != pattern.func or _shape(pattern) != _shape(candidate):
        return None
    free = frozenset(indices)
    for binding in _bindings(pattern, candidate, free, {}):
        chosen = tuple(binding.get(i) for i in indices)
        if None not in chosen and pattern.xreplace(dict(zip(indices, chosen))) == candidate:
            return chosen
    return None


def _unordered(expr: sympy.Basic) -> bool:
    """Whether SymPy keeps the arguments of `expr` in an order of its own, which a renaming can change."""
    return isinstance(expr, (sympy.Add, sympy.Mul, sympy.core.operations.LatticeOp, sympy.KroneckerDelta))


@functools.lru_cache(maxsize=4096)
def _shape(expr: sympy.Basic):
    """`expr` with the names of its indices forgotten (their ranges kept): two expressions that a renaming
    of indices makes equal have the same shape."""
    if isinstance(expr, sympy.Idx):
        return ("Idx", expr.upper)
    if not expr.args:
        return "leaf", expr
    children = [_shape(a) for a in expr.args]
    return type(expr), (frozenset(collections.Counter(children).items()) if _unordered(expr) else tuple(children))


def _bindings(pattern: sympy.Basic, candidate: sympy.Basic, free: frozenset, binding: dict):
    """Every extension of `binding` (free index of `pattern` -> index of `candidate`, one-to-one) under which
    `pattern` can be `candidate`."""
    if pattern in free:
        bound = binding.get(pattern)
        if bound is None and isinstance(candidate, sympy.Idx) and candidate.upper == pattern.upper \
                and candidate not in binding.values():
            yield {**binding, pattern: candidate}
        elif bound == candidate:
            yield binding
        return
    if not pattern.has(*free):
        if pattern == candidate:
            yield binding
        return
    if type(pattern) is not type(candidate) or len(pattern.args) != len(candidate.args):
        return
    if _unordered(pattern):
        yield from _paired(list(pattern.args), list(candidate.args), free, binding)
    else:
        yield from _in_order(pattern.args, candidate.args, free, binding)


def _in_order(patterns, candidates, free: frozenset, binding: dict):
    if not patterns:
        yield binding
        return
    for extended in _bindings(patterns[0], candidates[0], free, binding):
        yield from _in_order(patterns[1:], candidates[1:], free, extended)


def _paired(patterns: list, candidates: list, free: frozenset, binding: dict):
    """Bindings that pair each of `patterns` with a different one of `candidates`, of the same shape."""
    if not patterns:
        yield binding
        return
    first, rest = patterns[0], patterns[1:]
    for position, candidate in enumerate(candidates):
        if _shape(candidate) == _shape(first):
            for extended in _bindings(first, candidate, free, binding):
                yield from _paired(rest, candidates[:position] + candidates[position + 1:], free, extended)


def stabilize(expr: sympy.Expr) -> sympy.Expr:
    """Apply the rewrites above until nothing changes."""
    previous = None
    while previous != expr:
        previous = expr
        expr = expr.replace(_is_softplus, lambda e: softplus(_exp_argument(_one_plus_rest(e.args[0]))))
        expr = expr.replace(_is_sigmoid, lambda e: sigmoid(-_exp_argument(_one_plus_rest(e.base))))
        expr = expr.replace(_is_logsumexp, lambda e: logsumexp(e.args[0].function.args[0], e.args[0].limits[0][0]))
        expr = expr.replace(lambda e: isinstance(e, sympy.Mul), _softmax_in_product)
        expr = expr.replace(lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], softmax),
                            lambda e: e.args[0].body - logsumexp(e.args[0].body, e.args[0].index))
        expr = expr.replace(lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], sigmoid),
                            lambda e: -softplus(-e.args[0].args[0]))
        expr = expr.replace(lambda e: isinstance(e, sympy.log) and _one_plus_rest(e.args[0]) is not None,
                            lambda e: log1p(_one_plus_rest(e.args[0])))
    return expr


def _one_plus_rest(expr):
    """`a` when expr is 1 + a, else None."""
    if isinstance(expr, sympy.Add) and sympy.S.One in expr.args:
        return expr - 1
    return None


def _exp_argument(expr):
    return expr.args[0] if isinstance(expr, sympy.exp) else None


def _is_softplus(expr) -> bool:
    return isinstance(expr, sympy.log) and _exp_argument(_one_plus_rest(expr.args[0])) is not None


def _is_sigmoid(expr) -> bool:
    return (isinstance(expr, sympy.Pow) and expr.exp == -1
            and _exp_argument(_one_plus_rest(expr.base)) is not None)


def _is_logsumexp(expr) -> bool:
    return (isinstance(expr, sympy.log) and isinstance(expr.args[0], sympy.Sum)
            and len(expr.args[0].limits) == 1 and isinstance(expr.args[0].function, sympy.exp))


def _softmax_in_product(product: sympy.Mul) -> sympy.Expr:
    """exp(a[c]) * sum(exp(a[c']), c')**-k  ->  softmax(a, c) * sum(...)**-(k-1), pairing each exp with one sum."""
    factors = list(sympy.Mul.make_args(product))
    changed = True
    while changed:
        changed = False
        for position, factor in enumerate(factors):
            base, power = factor.as_base_exp()
            if not (isinstance(base, sympy.Sum) and power.is_negative and len(base.limits) == 1
                    and isinstance(base.function, sympy.exp)):
                continue
            bound = base.limits[0][0]
            if bound.name.startswith(BATCH):     # over the batch dims: no softmax kernel, the sum as it is
                continue
            for other_position, other in enumerate(factors):
                if not isinstance(other, sympy.exp):
                    continue
                match = _index_renaming(base.function.args[0], other.args[0], bound)
                if match is not None:
                    factors[other_position] = softmax(other.args[0], match)
                    factors[position] = base ** (power + 1)
                    changed = True
                    break
            if changed:
                break
    return sympy.Mul(*factors)


def _index_renaming(pattern: sympy.Expr, candidate: sympy.Expr, bound: sympy.Idx):
    """The index `i` with pattern[bound -> i] == candidate, if there is one."""
    for index in candidate.atoms(sympy.Idx):
        if index.upper == bound.upper and pattern.xreplace({bound: index}) == candidate:
            return index
    return None
