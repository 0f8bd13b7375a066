"""Stage 5a, tensor ops -> Python source: print lowered nodes as PyTorch expressions.

Elementwise math goes through `TorchCodePrinter`, a subclass of SymPy's own PyTorch
printer; the only strings built here are the tensor-method calls (`unsqueeze`,
`sum`, `@`, `permute`) that line tensors up, which SymPy has no notion of.
"""

from __future__ import annotations

import functools
import math
import re
import dataclasses
from dataclasses import dataclass, fields, replace

import sympy
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.pycode import PythonCodePrinter
from .torch_printer import TorchPrinter

from .plan import free_indices
from .lower import (Convolution, ConvolutionBackward, Einsum, Leaf, LoweredExpr, MatMul, Node, Picked, Product,
                    Reduce, Scaled, Scatter, expands_batch, walk)
from .model import OpSpec, PositiveFirst, exact_fraction, is_python_number, size_symbol
from .functions import as_float, atoms_of, first_max, fold_window, in_range, one_hot, power_slope, window
from .kernels import Fused, comments, joint_call, joint_key, joint_weights, kernel_of
from . import naming
from .naming import BATCH, grad

ATOM, MUL, ADD = PRECEDENCE["Atom"], PRECEDENCE["Mul"], PRECEDENCE["Add"]
# `@`: Python binds it exactly like `*` and `/` (one level, left to right), but a matrix product
# never regroups with an elementwise one, so it has a level of its own just below theirs
MATMUL = MUL - 1


@dataclass(frozen=True)
class Code:
    """Python source of a tensor expression and the dims of the tensor it evaluates to."""

    text: str
    indices: tuple[str, ...]
    precedence: int = ATOM      # how tightly its top-level operator binds: ATOM, Pow, MUL, MATMUL, ADD
    # when the text only permutes the dims of another Code (`x.T`), that Code: a further permutation
    # starts again from it (`x`, never `x.T.T`)
    unpermuted: Code | None = None

    def atom(self) -> str:
        """The text, parenthesized if a method call or operator would bind into it."""
        return self.operand(".")

    def operand(self, operator: str, side: str = "left") -> str:
        """The text as the `side` ("left" or "right") operand of `operator`, parenthesized unless
        Python's grammar groups it exactly as the tree does."""
        return self.text if groups_as_operand(self.precedence, operator, side) else f"({self.text})"


# the level of each binary operator the printer writes between two Codes ("." is a method call)
OPERATORS = {".": ATOM, "*": MUL, "/": MUL, "@": MATMUL, "+": ADD, "-": ADD}


def groups_as_operand(child: int, operator: str, side: str) -> bool:
    """Whether an operand whose top-level operator binds at level `child` can be written bare
    beside `operator`. Python groups `a op b op c` as `(a op b) op c`, so at one level a bare operand
    is right on the left of its parent, and on the right only when the parent is `*` and both are
    elementwise (which associates); `*` and `@` never meet bare, though Python would group them."""
    parent = OPERATORS[operator]
    python_level = lambda level: MUL if level == MATMUL else level  # noqa: E731
    if python_level(child) != python_level(parent):
        return python_level(child) > python_level(parent)
    if child != parent:
        return False
    return side == "left" or operator == "*"


def align(code: Code, want: tuple[str, ...]) -> Code:
    """Rearrange `code` so that it broadcasts in the index order `want`.

    Its own dims are permuted into `want`'s order, then every dim of `want` it lacks
    gets an `unsqueeze`, except leading ones, which broadcasting adds by itself.
    With batch dims (`...`) the rank is unknown, so dims are counted from the end.
    """
    extra = set(code.indices) - set(want)
    if extra:
        raise ValueError(f"cannot line up dims {code.indices} in {want}")
    present = tuple(i for i in want if i in code.indices)
    text, level, unpermuted = code.text, code.precedence, None
    if present != code.indices:
        unpermuted = code.unpermuted or code       # permutations compose: x.T lined up as x's dims is x
        text, level = unpermuted.text, unpermuted.precedence
        if present != unpermuted.indices:
            text, level = unpermuted.atom() + _permutation(unpermuted.indices, present), ATOM
    if not present:
        return Code(text, present, level)
    first = want.index(present[0])
    missing = [p for p in range(first, len(want)) if want[p] not in code.indices]
    if BATCH in want:
        # right to left, so that each negative position is already final when it is used
        dims = [p - len(want) for p in reversed(missing)]
    else:
        dims = [-1 if p == len(want) - 1 else p - first for p in missing]
    for dim in dims:
        text = (text if level >= ATOM else f"({text})") + f".unsqueeze({dim})"
        level = ATOM
    if unpermuted is None or dims or text == unpermuted.text:
        return Code(text, want[first:], level)
    return Code(text, want[first:], level, unpermuted)


def diagonal(code: Code) -> Code:
    """An access that repeats an index, a[i, i], reads a diagonal: `a.diagonal(0, 0, 1)`, which has the
    other dims, then i."""
    while len(set(code.indices)) < len(code.indices):
        index = next(i for i in code.indices if code.indices.count(i) > 1)
        first = code.indices.index(index)
        second = code.indices.index(index, first + 1)
        dims = [_dim(p, len(code.indices), BATCH in code.indices) for p in (first, second)]
        rest = tuple(i for p, i in enumerate(code.indices) if p not in (first, second))
        code = Code(f"{code.atom()}.diagonal(0, {dims[0]}, {dims[1]})", rest + (index,))
    return code


def _permutation(have: tuple[str, ...], want: tuple[str, ...]) -> str:
    order = [have.index(i) for i in want]
    if len(order) == 2 and BATCH not in have:
        return ".T"
    if order[:-2] == list(range(len(order) - 2)):
        return ".mT"
    if BATCH in have:
        if order[0] != 0:
            raise ValueError(f"batch dims '...' must lead: cannot permute {have} into {want}")
        source = tuple(p - len(order) for p in order[1:])
        target = tuple(p - len(order) for p in range(1, len(order)))
        return f".movedim({source}, {target})"
    return f".permute({', '.join(map(str, order))})"


class TorchCodePrinter(PositiveFirst, TorchPrinter):
    """SymPy's PyTorch printer, with each tensor access lined up for one broadcast layout."""

    def __init__(self, layout: tuple[str, ...], tensors: frozenset = frozenset(), inline: dict | None = None):
        super().__init__({"strict": True})
        self.layout = layout
        self.tensors = tensors      # symbols that stand for whole tensors (not scalars)
        self.inline = inline or {}  # name -> Code of a value written where it is read (lower.Leaf.inline)
        # name of such a value -> a tensor it is computed from, for a number to take its dtype and device
        self.stand_in = {name: code.like for name, code in self.inline.items()}
        self.device_of = None       # a tensor whose device an arange of index positions takes

    def _print(self, expr, **kwargs):
        # a constant such as softplus(2) or sqrt(2): torch functions take tensors, so print its value
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Rational:
            return self._print_irrational(expr)
        # a function of params and sizes only, such as exp(a) or Max(lo, 1): they are Python numbers
        if isinstance(expr, sympy.core.function.Application) and is_python_number(expr):
            return ScalarPrinter().doprint(expr)
        if isinstance(expr, Fused):     # (SymPy dispatches a Function subclass on its own name only)
            return kernel_of(expr).print(self, expr)
        return super()._print(expr, **kwargs)

    def _print_Indexed(self, expr):
        if self._inlined(expr) is not None:
            return self._inlined(expr).text
        if all(isinstance(i, sympy.Idx) for i in expr.indices):
            access = diagonal(Code(expr.base.label.name, tuple(i.name for i in expr.indices)))
        else:
            access = self._gather(expr)
        return align(access, self.layout).text

    def _inlined(self, expr) -> Code | None:
        """The code of an access to a value written where it is read, lined up: read by its dims, in the order
        it comes out in."""
        value = self.inline.get(expr.base.label.name) if isinstance(expr, sympy.Indexed) else None
        if value is None:
            return None
        return align(Code(value.text, tuple(i.name for i in expr.indices), value.precedence), self.layout)

    def named(self, name: str) -> str:
        """A tensor's name in the code, for its dtype and device: a value written where it is read has none,
        one it is computed from stands in."""
        return self.stand_in.get(name, name)

    def parenthesize(self, item, level, strict=False):
        inlined = self._inlined(item)     # SymPy takes any access for an atom
        if inlined is not None:
            return inlined.atom()
        return super().parenthesize(item, level, strict)

    def _gather(self, expr) -> Code:
        """An input indexed at one dim by an integer input (the others by plain indices), by the rule of
        `gather_layout`: `w[idx[n], d]` -> `w.index_select(0, idx)`, `x[n, idx[n, j]]` -> `x.gather(1, idx)`,
        `x[n, t[n]]` -> `x.gather(1, t.unsqueeze(1)).squeeze(1)`."""
        name = expr.base.label.name
        positions = [p for p, i in enumerate(expr.indices) if not isinstance(i, sympy.Idx)]
        value = expr.indices[positions[0]] if len(positions) == 1 else None
        if not (isinstance(value, sympy.Indexed) and all(isinstance(i, sympy.Idx) for i in value.indices)):
            raise ValueError(f"unsupported gather pattern {expr}: index one dim by an integer input indexed by "
                             f"plain indices (x[n, idx[n, j]], w[idx[b, t], d])")
        dims = tuple(i.name if isinstance(i, sympy.Idx) else GATHERED for i in expr.indices)
        index = Code(value.base.label.name, tuple(i.name for i in value.indices))
        gather = gather_layout(index, dims, name)
        if gather.select:
            # index_select, as F.embedding reads rows: an index outside [0, size) is an error (a subscript,
            # x[:, idx], would read a negative one from the end, where the gradient adds nothing)
            if len(index.indices) == 1 and BATCH not in index.indices:
                return Code(f"{name}.index_select({gather.dim}, {index.text})", gather.layout)
            return Code(f"{name}.index_select({gather.dim}, {index.text}.flatten()).unflatten({gather.dim}, "
                        f"{index.text}.shape)", gather.layout)
        code = f"{gather.source}.gather({gather.dim}, {gather.index})"
        if gather.unflatten:
            code += f".unflatten({gather.dim}, {gather.unflatten})"
        if GATHERED in gather.layout:
            return Code(f"{code}.squeeze({gather.dim})", tuple(i for i in gather.layout if i != GATHERED))
        return Code(code, gather.layout)

    def _print_window(self, expr):
        access, front, back, order, value = expr.args
        code = self._windows(access.base.label.name, access.indices, front, back, order, value)
        return align(code, self.layout).text

    def _print_fold_window(self, expr):
        """Values over the windows (dims ..., t, k) added back at the positions l = s*t + d*k + e they read: the
        adjoint of `unfold(dim, d*(K - 1) + 1, s)[..., ::d]` then the crop or padding that the read's window took."""
        value, subscript, position, _ = expr.args
        outer, inner = expr.cut()
        step, spacing = int(subscript.coeff(outer)), int(subscript.coeff(inner))
        others = tuple(i for i in self._own_layout(value) if i not in (outer.name, inner.name))
        sizes = {i.name: i.upper + 1 for i in value.atoms(sympy.Idx)}
        scalar = SizePrinter()
        lowest = subscript.subs({outer: 0, inner: 0})
        span = spacing * inner.upper + 1     # what one window reaches, its dilation's gaps included
        reach = step * outer.upper + span
        # the folded dim, last: counted from the end when batch dims '...' (as many as they are) lead
        folded = -1 if BATCH in others else len(others)

        def shaped(last) -> str:
            """The shape of the fold: the dims of `value` but its windows', then `last`; the batch dims '...' those
            of a tensor `value` reads with them (the upstream gradient first)."""
            named = [scalar.doprint(sizes[i]) for i in others if i != BATCH] + [last]
            if BATCH not in others:
                return python_tuple(named)
            reads = sorted((r for r in value.atoms(sympy.Indexed) if r.indices[0] == sympy.Idx(BATCH, r.indices[0].upper + 1)
                            and all(isinstance(i, sympy.Idx) for i in r.indices)),
                           key=lambda r: (not r.base.label.name.startswith(naming.grad("")), r.base.label.name))
            if not reads:
                raise ValueError(f"unsupported fold of windows {subscript} with batch dims '...' read by no tensor")
            read = reads[0]
            return python_tuple([f"*{read.base.label.name}.shape[:{1 - len(read.indices)}]"] + named)

        first, rest = _first_share(expr)
        if first is not None:
            # the whole window's share at one position (tie="first"): g added at each window's argmax
            # (scatter_add), never a K-times larger tensor of mostly zeros; the positions the forward saved
            # (one_hot(saved_argmax, k)), or the windows' argmax
            moved = self._sub(rest, others + (outer.name,))
            if isinstance(first, one_hot):
                # the positions the forward saved, in the input (saving.save_first_positions): no window is cut again
                if spacing == 1:
                    picked = self._sub(sympy.expand(first.args[0] + subscript.subs(inner, 0) - lowest),
                                       others + (outer.name,)).text
                else:
                    # the saved positions count taps along each window (saving._start): d apart, from s*t
                    picked = (f"{self._sub(first.args[0], others + (outer.name,)).atom()} * {spacing} + torch.arange("
                              f"0, {step} * {scalar.doprint(outer.upper + 1)}, {step}, device={moved.atom()}.device)")
                if lowest == 0:
                    # the windows start at 0: zeros as long as the input (or the windows' reach, when a padding
                    # at the end makes it longer), no copy to pad or crop
                    whole = scalar.doprint(position.upper + 1)
                    shape = shaped(f"max({whole}, {scalar.doprint(reach)})")
                    text = (f"{moved.atom()}.new_zeros({shape}).scatter_add{_in_place(moved)}({folded}, "
                            f"{picked}, {moved.text}).narrow({folded}, 0, {whole})")
                    return align(Code(text, others + (position.name,)), self.layout).text
            else:
                windows = self._sub(first.body, others + (outer.name, inner.name))
                dilated = "" if spacing == 1 else f" * {spacing}"
                picked = (f"{windows.atom()}.{'argmax' if first.largest else 'argmin'}(-1){dilated} + torch.arange(0, {step} * "
                          f"{scalar.doprint(outer.upper + 1)}, {step}, device={moved.atom()}.device)")
            text = (f"{moved.atom()}.new_zeros({shaped(scalar.doprint(reach))}).scatter_add{_in_place(moved)}("
                    f"{folded}, {picked}, {moved.text})")
        else:
            inner_code = self._sub(value, others + (outer.name, inner.name))
            shape = shaped(scalar.doprint(reach))
            inner_code = inner_code.text if spacing == 1 else (
                # the taps d apart: d - 1 zeros after each, cut to the window's span
                f"torch.nn.functional.pad({inner_code.atom()}.unsqueeze(-1), (0, {spacing - 1}))"
                f".flatten(-2)[..., :{scalar.doprint(span)}]")
            text = (f"torch.ops.aten.unfold_backward({inner_code}, {shape}, {folded}, "
                    f"{scalar.doprint(span)}, {step})")
        text = _padded(text, [0] * len(others) + [lowest],
                       [0] * len(others) + [sympy.expand(position.upper + 1 - lowest - reach)])
        return align(Code(text, others + (position.name,)), self.layout).text

    def _print_in_range(self, expr):
        """1 where value lies in [0, size): a window of ones, padded with zeros as a read of them would be."""
        value, size, like = expr.args
        lowest = value.subs({i: (i.upper if value.coeff(i) < 0 else 0) for i in value.atoms(sympy.Idx)})
        reach = sum((abs(value.coeff(i)) * i.upper for i in value.atoms(sympy.Idx)), sympy.S.One)
        ones = f"{like.name}.new_ones({SizePrinter().doprint(size)})"
        order = sympy.Tuple(sympy.Tuple(*sorted(value.atoms(sympy.Idx), key=lambda i: (-abs(value.coeff(i)), i.name))))
        code = self._windows(ones, (value,), (-lowest,), (sympy.expand(lowest + reach - size),), order)
        return align(code, self.layout).text

    def _windows(self, tensor: str, subscripts, front, back, order, value=sympy.S.Zero) -> Code:
        """`tensor` read at affine subscripts, as a tensor with one dim per index: padded (F.pad) so that
        each affine dim starts at its lowest reach and holds exactly its reach, then cut into windows
        with `unfold(dim, size, step)` (a view), one more dim per further index, strided by its coefficient;
        an index with a negative coefficient runs backwards (`flip`)."""
        scalar = SizePrinter()
        if any(not isinstance(i, sympy.Idx) and i.atoms(sympy.Indexed) for i in subscripts):
            raise ValueError(f"unsupported read {tensor}{list(subscripts)}: a gather inside an affine subscript")
        text, level = _padded(tensor, front, back, value), ATOM
        dims: list[str] = []
        flips: list[str] = []
        # batch dims '...' lead, as many as they are: the named dims are counted from the end
        batched = any(isinstance(i, sympy.Idx) and i.name == BATCH for i in subscripts)
        for position, subscript in enumerate(subscripts):
            if isinstance(subscript, sympy.Idx):
                dims.append(subscript.name)
                continue
            coefficients = {i: int(subscript.coeff(i)) for i in subscript.atoms(sympy.Idx)}
            flips += [i.name for i, c in coefficients.items() if c < 0]
            # a forward-running index leads, then the one latest in the layout (t before k in t + k)
            nesting = list(order[position])
            # (each unfold so far appended a dim at the end)
            dim = position - len(subscripts) - (len(dims) - position) if batched else position
            for number, index in enumerate(nesting):
                step = abs(coefficients[index])
                rest = nesting[number + 1:]
                if rest:
                    size = sum((abs(coefficients[i]) * i.upper for i in rest), sympy.S.One)
                    text += f".unfold({dim}, {scalar.doprint(size)}, {step})"
                elif step != 1:
                    text += f"[{':, ' * dim}::{step}]" if dim >= 0 else f"[..., ::{step}{', :' * (-dim - 1)}]"
                dims.append(index.name)
                dim = -1
            # the windows' dims were appended in nesting order after the ones so far
        order = self._window_order(subscripts, dims)
        if flips:
            positions = [order.index(f) - (len(order) if batched else 0) for f in flips]
            text += f".flip({python_tuple([str(p) for p in positions])})"
        return Code(text, tuple(order), level)

    @staticmethod
    def _window_order(subscripts, dims: list[str]) -> list[str]:
        """The dims of the unfolded tensor: each subscript's first index at its place, the further ones
        appended after all the tensor's dims, in the order they were cut."""
        leading, appended = [], []
        taken = iter(dims)
        for subscript in subscripts:
            count = 1 if isinstance(subscript, sympy.Idx) else len(subscript.atoms(sympy.Idx))
            names = [next(taken) for _ in range(count)]
            leading.append(names[0])
            appended += names[1:]
        return leading + appended

    def _sub(self, expr, layout: tuple[str, ...]) -> Code:
        """`expr` printed in its own layout, for a reduction or softmax to work on (a value written where it is
        read binds as its code does: `(a @ b).amax(0)`)."""
        value = self.inline.get(expr.base.label.name) if isinstance(expr, sympy.Indexed) else None
        level = precedence(expr) if value is None else min(precedence(expr), value.precedence)
        return Code(TorchCodePrinter(layout, inline=self.inline)._print(expr), layout, level)

    def _own_layout(self, expr, last: tuple[str, ...] = ()) -> tuple[str, ...]:
        free = free_indices(expr)
        return tuple(i for i in self.layout if i in free and i not in last) + last

    def _batch_reduced(self, body, bound: tuple[str, ...], batch: str) -> tuple[Code, str, tuple[str, ...], list[str]]:
        """`body` laid out to be reduced over `bound`, which holds `batch`, the batch `...` under some name: (its
        code, the same with the batch dims, however many, none included, flattened into one leading dim, that
        layout, the dims of `bound` there)."""
        others = tuple(i for i in bound if i != batch)
        layout = (batch,) + tuple(i for i in self._own_layout(body, others) if i != batch)
        inner = self._sub(body, layout)
        flat = f"{inner.atom()}.unsqueeze(0).flatten(0, {-len(layout)})"
        return inner, flat, layout, [_dim(layout.index(i), len(layout), True) for i in bound]

    def _reduced(self, body, bound: tuple[str, ...], method: str, keep: tuple[str, ...]) -> str:
        batch = _batch_of(body, bound)
        if batch:
            inner, flat, layout, dims = self._batch_reduced(body, bound, batch)
            if method == "torch.logsumexp":
                text = f"torch.logsumexp({flat}, dim={_dims_argument(dims)})"
            else:
                text = f"{inner.atom()}.{method}()" if len(bound) == len(layout) else \
                    f"{flat}.{method}({_dims_argument(dims)})"
            return align(Code(text, keep), self.layout).text
        layout = self._own_layout(body, bound)
        inner = self._sub(body, layout)
        text = f"{inner.atom()}.{method}" if method != "torch.logsumexp" else ""
        if len(bound) == len(layout) and method != "torch.logsumexp":
            return align(Code(f"{text}()", ()), self.layout).text
        batched = BATCH in layout
        dims = [_dim(layout.index(i), len(layout), batched) for i in bound]
        dim = dims[0] if len(dims) == 1 else f"({', '.join(dims)})"
        result = f"torch.logsumexp({inner.text}, dim={dim})" if method == "torch.logsumexp" else f"{text}({dim})"
        return align(Code(result, keep), self.layout).text

    def _print_Sum(self, expr):
        # a sum over an index its body does not depend on is the body times that index's size
        # (a bare `1.sum()` would not even compile)
        absent = [limit for limit in expr.limits if not expr.function.has(limit[0])]
        if absent:
            kept = [limit for limit in expr.limits if limit not in absent]
            count = sympy.Mul(*[upper - lower + 1 for _, lower, upper in absent])
            return self._print(count * (sympy.Sum(expr.function, *kept) if kept else expr.function))
        bound = tuple(limit[0].name for limit in expr.limits)
        keep = tuple(i for i in self._own_layout(expr.function) if i not in bound)
        return self._reduced(expr.function, bound, "sum", keep)

    def _print_logsumexp(self, expr):
        bound = (expr.index.name,)
        keep = tuple(i for i in self._own_layout(expr.body) if i not in bound)
        return self._reduced(expr.body, bound, "torch.logsumexp", keep)

    def _print_softmax(self, expr, function: str = "torch.softmax"):
        layout = self._own_layout(expr.body)
        inner = self._sub(expr.body, layout)
        dim = _dim(layout.index(expr.index.name), len(layout), BATCH in layout)
        return align(Code(f"{function}({inner.text}, dim={dim})", layout), self.layout).text

    def _print_log_softmax(self, expr):
        return self._print_softmax(expr, "torch.log_softmax")

    def _print_amax(self, expr):
        """max(body, c, ...) -> body.amax(dim) (min: amin): autograd through it splits a tie evenly, as the
        derivative does; with tie="first", body.max(dim).values, whose autograd picks the first maximum."""
        bound = tuple(i.name for i in expr.indices)
        batch = _batch_of(expr.body, bound)
        if batch:     # over `...`: the batch dims flattened into one (over every dim: all of them at once)
            inner, reduced, layout, dims = self._batch_reduced(expr.body, bound, batch)
            if len(bound) == len(layout) and not expr.first:
                reduced, dims = inner.atom(), []
        else:
            layout = self._own_layout(expr.body, bound)
            inner = self._sub(expr.body, layout)
            reduced = inner.atom()
            dims = [_dim(layout.index(i), len(layout), BATCH in layout) for i in bound]
        if expr.first:
            text = f"{reduced}.{'max' if expr.largest else 'min'}({dims[0]}).values"
        else:
            text = f"{reduced}.{'amax' if expr.largest else 'amin'}({_dims_argument(dims) if dims else ''})"
        return align(Code(text, tuple(i for i in layout if i not in bound)), self.layout).text

    _print_amin = _print_max_first = _print_min_first = _print_amax

    def _print_reaches(self, expr):
        """1 where a value reaches its max or min, in the value's dtype (a bool mask would divide as an
        integer count into torch's default dtype)."""
        value, extremum = expr.args
        return f"({self._print(value)} == {self._print(extremum)}).to({self._like(expr)}.dtype)"

    def _print_is_max(self, expr):
        """1 where an expression reaches its max (min) along the indices: compared with its own max, both
        from the one printed expression, so that the values compared are the same floats."""
        method = "amax" if expr.largest else "amin"
        bound = tuple(i.name for i in expr.indices)
        batch = _batch_of(expr.body, bound)
        if batch:
            # the extremum over the flattened batch dims, lined up with the body (the batch leads: broadcast)
            inner, flat, layout, dims = self._batch_reduced(expr.body, bound, batch)
            extremum = align(Code(f"{flat}.{method}({_dims_argument(dims)})", tuple(i for i in layout if i not in bound)),
                             layout)
            text = f"({inner.text} == {extremum.text}).to({self._like(expr)}.dtype)"
            return align(Code(text, layout), self.layout).text
        layout = self._own_layout(expr.body)
        inner = self._sub(expr.body, layout)
        dims = [_dim(layout.index(i), len(layout), BATCH in layout) for i in bound]
        text = (f"({inner.text} == {inner.atom()}.{method}({_dims_argument(dims)}, "
                f"keepdim=True)).to({self._like(expr)}.dtype)")
        return align(Code(text, layout), self.layout).text

    _print_is_min = _print_is_max

    def _print_first_max(self, expr):
        """1 at the first max (min) along the index, else 0: torch.argmax picks the first, as torch.max(x, dim)."""
        pick = "argmax" if expr.largest else "argmin"
        if _batch_of(expr.body, (expr.index.name,)):     # in the batch dims flattened into one, then back
            inner, flat, layout, (dim,) = self._batch_reduced(expr.body, (expr.index.name,), expr.index.name)
            text = (f"torch.zeros_like({flat}).scatter({dim}, {flat}.{pick}({dim}, keepdim=True), 1)"
                    f".view_as({inner.atom()})")
            return align(Code(text, layout), self.layout).text
        layout = self._own_layout(expr.body)
        inner = self._sub(expr.body, layout)
        dim = _dim(layout.index(expr.index.name), len(layout), BATCH in layout)
        text = f"torch.zeros_like({inner.text}).scatter({dim}, {inner.atom()}.{pick}({dim}, keepdim=True), 1)"
        return align(Code(text, layout), self.layout).text

    _print_first_min = _print_first_max

    def _print_first_position(self, expr):
        """The first max (min) position along the index: torch.argmax, which picks the first, as torch.max(x, dim)."""
        layout = self._own_layout(expr.body, (expr.index.name,))
        kept = layout[:-1]
        inner = self._sub(expr.body, layout)
        pick = "argmax" if expr.largest else "argmin"
        text = f"{inner.atom()}.{pick}(-1)"
        if expr.start != 0:
            # counted in the input: each window's start s*t + e added (in place, into the fresh positions)
            (outer,) = expr.start.atoms(sympy.Idx)
            step, lowest = int(expr.start.coeff(outer)), expr.start.subs(outer, 0)
            scalar = SizePrinter()
            device = self.named(next(iter(expr.body.atoms(sympy.Indexed))).base.label.name)
            starts = Code(f"torch.arange({scalar.doprint(lowest)}, {scalar.doprint(lowest + step * (outer.upper + 1))}, "
                          f"{step}, device={device}.device)", (outer.name,))
            text += f".add_({align(starts, kept).text})"
        return align(Code(text, kept), self.layout).text

    _print_first_min_position = _print_first_position

    # what a kernel record (kernels.KERNELS) prints its call with
    def text(self, expr, layout: tuple[str, ...] | None = None) -> str:
        """`expr` printed for this printer's layout, or for another one."""
        return self._print(expr) if layout is None else \
            TorchCodePrinter(layout, self.tensors, self.inline)._print(expr)

    @staticmethod
    def dim(index: str, layout: tuple[str, ...]) -> str:
        """The dim argument for `index` in a tensor laid out as `layout`."""
        return _dim(layout.index(index), len(layout), BATCH in layout)

    def placed(self, text: str, dims: tuple[str, ...]) -> str:
        """A call whose result has `dims`, lined up for this printer's layout."""
        return align(Code(text, tuple(dims)), self.layout).text

    def _print_as_float(self, expr):
        value, like = expr.args
        if isinstance(value, sympy.Piecewise):   # numbers chosen by a condition on integers: in like's dtype
            return self._print_Piecewise(value, like.name)
        return f"{self._print(value)}.to({like.name}.dtype)"

    def _print_one_hot(self, expr):
        value, position = expr.args
        size = self._print(position.upper + 1)
        dims = tuple(i.name for i in value.indices) + (position.name,)
        code = Code(f"torch.nn.functional.one_hot({value.base.label.name}, {size})", dims)
        return align(code, self.layout).text

    def _print_power_slope(self, expr):
        return self._print(expr.rewrite(sympy.Piecewise))

    _print_power_log = _print_power_slope
    _print_atan2_scale = _print_power_slope

    def _print_atan2(self, expr):
        """torch.atan2 takes two tensors: a number argument is a 0-d tensor of the other's dtype and device."""
        texts = [f"{self._like(expr)}.new_tensor({self._print(a)})" if is_python_number(a) else self._print(a)
                 for a in expr.args]
        return f"torch.atan2({', '.join(texts)})"

    def _print_sign(self, expr):
        return f"torch.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_softplus(self, expr):
        return f"torch.nn.functional.softplus({self._print(expr.args[0])})"

    def _print_log1p(self, expr):
        return f"torch.log1p({self._print(expr.args[0])})"

    def _print_Idx(self, expr):
        """An index's positions as values, for a where() condition between indices: an arange along its dim."""
        if self.device_of is None:
            raise ValueError(f"the positions of index {expr} are compared with no tensor to take a device from")
        text = f"torch.arange({self._print(expr.upper + 1)}, device={self.device_of}.device)"
        return align(Code(text, (expr.name,)), self.layout).text

    def _print_Piecewise(self, expr, like: str | None = None):
        (first, condition), rest = expr.args[0], expr.args[1:]
        if self.device_of is None and positions_compared(expr):
            self.device_of = self._like(expr)
        if rest and is_python_number(condition):
            # torch.where takes a tensor condition: one on params (a power's a == 0) is a Python bool
            otherwise = rest[0].expr if len(rest) == 1 and rest[0].cond == sympy.true else sympy.Piecewise(*rest)
            return f"({self._print(first)} if {self._print(condition)} else {self._print(otherwise)})"
        if all(is_python_number(value) for value, _ in expr.args):
            # torch.where of two Python numbers is in torch's default dtype: one branch takes the dtype
            # (and device) of a tensor the condition reads
            tensors = [self.named(a.base.label.name) for a in condition.atoms(sympy.Indexed)] or \
                [s.name for s in condition.free_symbols if not is_python_number(s)]   # a 0-d tensor
            like = like or sorted(tensors)[0]
            rest = sympy.Piecewise(*expr.args[1:]) if len(expr.args) > 2 else expr.args[1].expr
            return f"torch.where({self._print(condition)}, {like}.new_tensor({self._print(first)}), {self._print(rest)})"
        return super()._print_Piecewise(expr)

    def _print_And(self, expr, operator: str = "&"):
        """torch.logical_and takes tensors; a Python bool (a condition on params) meets a tensor as `&`."""
        if not any(is_python_number(a) for a in expr.args):
            return super()._print_And(expr) if operator == "&" else super()._print_Or(expr)
        return f" {operator} ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return self._print_And(expr, "|")

    def _print_Relational(self, expr):
        left = self.parenthesize(expr.lhs, PRECEDENCE["Relational"] + 1)
        right = self.parenthesize(expr.rhs, PRECEDENCE["Relational"] + 1)
        return f"{left} {expr.rel_op} {right}"

    def _print_Pow(self, expr):
        if expr.is_number:
            return self._print_irrational(expr)
        base, exponent = expr.args
        if exponent in (sympy.S.Half, -sympy.S.Half) and not self._is_tensor(base):
            # a size or a hyperparameter is a Python number, which torch.sqrt does not take
            return f"{self.parenthesize(base, PRECEDENCE['Pow'] + 1)}**{'0.5' if exponent > 0 else '-0.5'}"
        if exponent == sympy.S.Half:
            return f"torch.sqrt({self._print(base)})"
        if exponent == -sympy.S.Half:
            return f"torch.rsqrt({self._print(base)})"
        if exponent == -1:
            return f"1 / {self.parenthesize(base, MUL + 1)}"
        return f"{self.parenthesize(base, PRECEDENCE['Pow'] + 1)}**{self.parenthesize(exponent, PRECEDENCE['Pow'] + 1)}"

    def _print_Mul(self, expr):
        """Scalars first, so that Python's left-to-right evaluation scales a tensor only once:
        `2 * grad_loss / size_n * (pred - target)`, not `2 * grad_loss * (pred - target) / size_n`."""
        slope = masking_slope(expr)
        if slope is not None:
            return self._masked_product(expr, slope)
        number, groups = self._factor_groups(expr)
        sign, number = ("-" if number < 0 else ""), abs(number)
        if number.is_Rational and not groups[(False, False)] + groups[(False, True)] \
                and sympy.fraction(number)[0] == 1 and sympy.fraction(number)[1] != 1 and groups[(True, False)]:
            # only a number to apply: `x / 2` scales once too, and reads better than `1 / 2 * x`
            groups[(True, True)] = [sympy.fraction(number)[1]] + groups[(True, True)]
            number = sympy.S.One
        text = self._scalar_part(number, groups)
        for factor, below in self._tensor_part(groups):
            if below:
                text = (text or "1") + " / " + self.parenthesize(factor, MUL + 1)
            else:
                text = (text + " * " if text else "") + self.parenthesize(factor, MUL)
        return sign + text

    def _masked_product(self, expr, slope: power_slope) -> str:
        """A product with the slope of a tensor power, as torch's pow backward masks it: the whole product is
        0 where the exponent is 0 (`torch.where(p == 0, 0, grad_y * p * x**(p - 1))`), so that a non-finite
        factor beside the slope (an upstream gradient) gives 0 there, not inf * 0 = NaN."""
        base, exponent = slope.args
        unmasked = expr.xreplace({slope: exponent * base ** (exponent - 1)})
        return f"torch.where({self._print(sympy.Eq(exponent, 0))}, 0, {self._print(unmasked)})"

    def _factor_groups(self, expr) -> tuple[sympy.Expr, dict[tuple[bool, bool], list[sympy.Expr]]]:
        """A product's number, and its other factors by (whether a tensor, whether a divisor): a divisor is
        the base of a negative power."""
        factors = expr.as_ordered_factors()
        number = sympy.Mul(*[f for f in factors if f.is_number])
        groups = {(tensor, below): [] for tensor in (False, True) for below in (False, True)}
        for factor in factors:
            if factor.is_number:
                continue
            # (x**-0.5 prints as rsqrt; a size's, as `/ size_d**0.5`: a size may be 0, and 0.0**-0.5 raises)
            below = factor.is_Pow and factor.exp.is_number and factor.exp < 0 \
                and (factor.exp != -sympy.S.Half or bool(factor.base.is_integer))
            base = factor.base ** -factor.exp if below else factor
            # a size may be 0 (an empty batch): divide a tensor by it, never a Python number
            size = bool(base.is_integer) or bool(base.is_Pow and base.base.is_integer)    # size_d, size_d**0.5
            groups[(self._is_tensor(base) or (below and size), below)].append(base)
        if any(naming.is_zero_dim_tensor(f) for f in groups[(False, False)]):
            # the scalars already make a 0-d tensor (grad_loss): divide it by the sizes, before the
            # full-size tensor is touched, so that the tensor is scaled once
            groups[(False, True)] += [f for f in groups[(True, True)] if f.is_integer and not self._is_tensor(f)]
            groups[(True, True)] = [f for f in groups[(True, True)] if f not in groups[(False, True)]]
        return number, groups

    def _scalar_part(self, number: sympy.Expr, groups: dict) -> str:
        """The number and the scalar factors, then every scalar divisor: `2 * grad_loss / size_n`
        ("" when there is nothing to write; a bare 1 is left out before a tensor factor)."""
        if number.is_Rational and exact_fraction(number):
            top, bottom = sympy.fraction(number)
            top_text = self._print(top)
        else:   # sqrt(2) / 2 and the like: one float
            top, bottom, top_text = number, 1, self._print_irrational(number)
        above = groups[(False, False)] + groups[(True, False)]
        text = " * ".join(([top_text] if top != 1 or not above else [])
                          + [self.parenthesize(f, MUL) for f in groups[(False, False)]])
        for divisor in ([bottom] if bottom != 1 else []) + groups[(False, True)]:
            text = (text or "1") + " / " + self.parenthesize(divisor, MUL + 1)
        return text

    def _tensor_part(self, groups: dict) -> list[tuple[sympy.Expr, bool]]:
        """The tensor factors, then the tensor divisors, each with whether it divides."""
        tensors = [(factor, False) for factor in groups[(True, False)]] \
            + [(divisor, True) for divisor in groups[(True, True)]]
        ranks = [len(free_indices(f)) if self._is_tensor(f) else None for f, _ in tensors]
        largest = max((r for r in ranks if r is not None), default=0)
        if sum(r is not None and r < largest for r in ranks) >= 2:
            # per-row factors meet each other before the full-size tensor, so it is scaled once
            # (plain numbers and sizes stay last: a size may be 0, so it divides a tensor)
            order = sorted(range(len(tensors)), key=lambda k: (ranks[k] is None, ranks[k] or 0, tensors[k][1]))
            tensors = [tensors[k] for k in order]
        return tensors

    def _is_tensor(self, expr) -> bool:
        return bool(atoms_of(expr, sympy.Indexed)) or bool(expr.free_symbols & self.tensors)

    def _print_Rational(self, expr):
        return super()._print_Rational(expr) if exact_fraction(expr) else self._print_irrational(expr)

    def _print_irrational(self, expr):
        """An exact number such as sqrt(2) or pi, as a Python float literal."""
        value = float(sympy.N(expr, 20))
        if not math.isfinite(value):
            raise ValueError(f"the constant {sympy.N(expr, 3)} overflows float64")
        return repr(value)

    _print_NumberSymbol = _print_irrational

    def _print_Infinity(self, expr):
        return "torch.inf"

    def _print_max_tie(self, expr):
        """Max(a, b, tie=t): the same value as Max(a, b), written so that autograd through it (a double
        backward differentiates the generated backward) gives a the share t at a tie, as its derivative does."""
        first, second, tie = expr.args
        return self._extremum((first, second), expr.untied_function, tie)

    _print_min_tie = _print_max_tie

    def _print_Max(self, expr):
        return self._extremum(expr.args, sympy.Max, sympy.S.Half)

    def _print_Min(self, expr):
        return self._extremum(expr.args, sympy.Min, sympy.S.Half)

    def _print_KroneckerDelta(self, expr):
        # SymPy's own rule prints `(1 if i == j else 0)`: an index is no variable in generated code
        raise ValueError(f"the Kronecker delta {expr} was not summed away")

    def _extremum(self, args, same, tie) -> str:
        """Max or Min of `args` whose autograd derivative is the spec's at a tie of two arguments (`tie` is
        the first one's share, 1/2 without tie=): tensors pairwise, then every Python number as one bound.

            share 1/2      torch.maximum(a, b)      (a number bound as a 0-d tensor: torch.maximum takes no number)
            share 1        torch.clamp_min(a, b)    (the gradient passes to a at the bound, none to b)
            share 0        torch.clamp_min(b, a); a tensor against a number bound lo: F.threshold(a, lo, lo)
            other shares   t * passing + (1 - t) * blocking: the same value, the gradient split as the share
                           says (not torch.lerp, whose end - start is inf - inf = NaN where both are ±inf)
        """
        numbers = [a for a in args if is_python_number(a)]
        tensors = [a for a in args if not is_python_number(a)]
        if numbers:
            tensors.append(same(*numbers))
            tie = tie if is_python_number(args[1]) else 1 - tie    # the share of the tensor, now first
        text = self._print(tensors[0])
        for other in tensors[1:-1]:
            text = self._tied(same, text, tensors[0], other, sympy.S.Half)
        if len(tensors) > 1:
            text = self._tied(same, text, tensors[0], tensors[-1], tie)
        return text

    def _tied(self, same, text: str, first, second, share) -> str:
        """`text` (the printed Max/Min so far, of `first`) against `second`, with `share` of the gradient to it."""
        pairwise, clamp = ("torch.maximum", "torch.clamp_min") if same is sympy.Max else ("torch.minimum", "torch.clamp_max")
        bound = self._print(second)
        if share == sympy.S.Half:
            if is_python_number(second):
                bound = f"{self._like(first)}.new_tensor({bound})"
            return f"{pairwise}({text}, {bound})"
        passing = f"{clamp}({text}, {bound})"
        if share == 1:
            return passing
        if is_python_number(second):
            # the number takes the whole gradient at the tie: a threshold, whose backward passes none there
            sign = 1 if same is sympy.Max else -1        # Min(a, lo) is -Max(-a, -lo)
            value, threshold = self._print(sign * first), self._print(sign * second)
            blocking = f"torch.relu({value})" if second == 0 else \
                f"torch.nn.functional.threshold({value}, {threshold}, {threshold})"
            blocking = blocking if sign == 1 else f"(-{blocking})"
        else:
            blocking = f"{clamp}({bound}, {text})"
        if share == 0:
            return blocking
        return f"({self._print(share)} * {passing} + {self._print(1 - share)} * {blocking})"

    def _like(self, expr) -> str:
        """A tensor that `expr` reads, for a number to take its dtype and device (a value, not an index)."""
        # an integer read as a float takes the dtype of the tensor it is cast like
        expr = expr.replace(lambda e: isinstance(e, as_float), lambda e: e.args[1])
        accesses = expr.atoms(sympy.Indexed)
        indices = {i for a in accesses for i in a.indices}
        names = sorted(self.named(a.base.label.name) for a in accesses - indices)
        scalars = sorted(s.name for s in expr.free_symbols if not is_python_number(s) and not isinstance(s, sympy.Idx))
        if not names and not scalars:
            raise ValueError(f"{expr} reads no tensor to take a dtype and device from")
        return names[0] if names else scalars[0]


def masking_slope(expr: sympy.Expr) -> power_slope | None:
    """The slope of a power with a tensor exponent among the factors of the product `expr`, if any."""
    for factor in sympy.Mul.make_args(expr):
        if isinstance(factor, power_slope) and not is_python_number(factor.args[1]):
            return factor
    return None


def positions_compared(expr: sympy.Expr) -> set[sympy.Idx]:
    """The indices whose positions the conditions in `expr` compare (where(k <= t, ...)), outside any access."""
    def positions(node) -> set[sympy.Idx]:
        if isinstance(node, sympy.Idx):
            return {node}
        if isinstance(node, sympy.Indexed):
            return set()
        return set().union(*(positions(arg) for arg in node.args)) if node.args else set()
    return {i for relation in expr.atoms(sympy.core.relational.Relational) for i in positions(relation)}


class ScalarPrinter(PythonCodePrinter):
    """Math on Python numbers (params and sizes) through Python's `math`: torch functions take tensors,
    and a 0-d tensor made of a number would carry torch's default dtype into the result."""

    def __init__(self):
        super().__init__({"strict": True, "standard": "python3"})

    def _print_sigmoid(self, expr):
        # 1 / (1 + exp(-a)) overflows for a large negative a; this form never does
        return f"(0.5 + 0.5 * math.tanh({self.parenthesize(expr.args[0], MUL)} / 2))"

    def _print_softplus(self, expr):
        argument = expr.args[0]
        return f"(max({self._print(argument)}, 0) + math.log1p(math.exp(-abs({self._print(argument)}))))"


class SizePrinter(PositiveFirst, ScalarPrinter):
    """Sizes and their arithmetic as Python ints: size_l - size_k + 1, (size_l - size_k) // 2 + 1."""

    def _print_floor(self, expr):
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if denominator.is_Integer and denominator > 0:
            return f"{self.parenthesize(numerator, MUL)} // {denominator}"
        return super()._print_floor(expr)

    def _print_Min(self, expr):
        return f"min({', '.join(self._print(a) for a in expr.args)})"


def uses_math(code: str) -> bool:
    """Whether printed code calls Python's math module (for a function of params and sizes)."""
    return re.search(r"(?<![\w.])math\.", code) is not None


def print_leaf(expr: sympy.Expr, layout: tuple[str, ...], inline: dict | None = None) -> Code:
    indices = tuple(i.name for i in getattr(expr, "indices", ()))
    if isinstance(expr, sympy.Indexed) and all(isinstance(i, sympy.Idx) for i in expr.indices) \
            and len(set(indices)) == len(indices) and expr.base.label.name not in (inline or {}):
        return align(Code(expr.base.label.name, indices), layout)    # a plain access: lined up so that it can be again
    text = TorchCodePrinter(layout, inline=inline).doprint(expr)
    level = ATOM if isinstance(expr, (sympy.Indexed, sympy.Symbol, sympy.Function, sympy.Piecewise)) \
        or masking_slope(expr) is not None else min(precedence(expr), MUL)     # (a masked product: a where)
    if isinstance(expr, sympy.Pow) and expr.exp not in (sympy.S.Half, -sympy.S.Half):
        level = MUL
    return Code(text, layout, level)


def _render_in(node: Node, order: tuple[str, ...]) -> Code:
    """`node` rendered for a broadcast in `order`: an elementwise leaf is printed in that order of its dims
    (`x.T * y`'s factor, never `(f(x.T) * y.T).T`), anything else as it is."""
    if isinstance(node, Leaf) and set(node.indices) <= set(order):
        return print_leaf(node.expr, tuple(i for i in order if i in node.indices), inline_codes(node))
    return render(node)


@dataclass(frozen=True)
class InlineCode(Code):
    """The code of a value written where it is read, and a tensor it is computed from (its dtype and device)."""

    like: str = ""


def inline_codes(leaf: Leaf) -> dict[str, InlineCode]:
    """The code of each value a leaf reads where it stands."""
    codes = {}
    for name, value in leaf.inline:
        code = render(value)
        codes[name] = InlineCode(code.text, code.indices, code.precedence, like=_like_of(value))
    return codes


def _like_of(value: Node) -> str:
    """A tensor a value is computed from (read by its first leaf that reads one), for its dtype and device."""
    inner = next((n for n in walk(value) if isinstance(n, Leaf) and n.expr.atoms(sympy.Indexed)), None)
    if inner is None:   # a convolution reads its kernel by name (`tanh(conv1d(x, w))` inlined): that tensor
        return access_name(next(n for n in walk(value) if isinstance(n, Convolution)).kernel)
    printer = TorchCodePrinter(inner.indices)
    printer.stand_in = {name: _like_of(nested) for name, nested in inner.inline}
    return printer._like(inner.expr)


def render(node: Node) -> Code:
    """Python source for one lowered node."""
    if isinstance(node, Leaf):
        return print_leaf(node.expr, node.indices, inline_codes(node))
    if isinstance(node, Product):
        masked = next((f for f in node.factors if isinstance(f, Leaf) and masking_slope(f.expr) is not None), None)
        if masked is not None:
            # as TorchCodePrinter._masked_product: the whole product is 0 where the power's exponent is 0
            slope = masking_slope(masked.expr)
            base, exponent = slope.args
            unmasked = Leaf(masked.expr.xreplace({slope: exponent * base ** (exponent - 1)}), masked.indices)
            inner = render(replace(node, factors=tuple(unmasked if f is masked else f for f in node.factors)))
            condition = TorchCodePrinter(node.indices).doprint(sympy.Eq(exponent, 0))
            return Code(f"torch.where({condition}, 0, {inner.text})", node.indices)
        factors = [align(_render_in(f, node.indices), node.indices).operand("*", "right" if position else "left")
                   for position, f in enumerate(node.factors)]
        return Code(" * ".join(factors), node.indices, MUL)
    if isinstance(node, Reduce):
        source = render(node.source)
        method = "mean" if node.mean else "sum"
        text = source.atom()
        if node.expand_batch:
            shape = broadcast_batch_shape(node.expand_batch)
            rest = [i for i in source.indices if i != BATCH]
            text += f".expand({'*' + shape + ', ' + ', '.join(['-1'] * len(rest)) if rest else shape})"
        if set(node.summed) == set(source.indices):
            return Code(f"{text}.{method}()", node.indices)
        # (a copy of the batch dims under another name, ..._1, which a max over `...` binds, leading its source,
        # is summed as the batch is)
        named = [i for i in node.summed if not (i == BATCH or i.startswith(BATCH) and source.indices[0] == i)]
        if named:
            batched = BATCH in source.indices
            dims = [_dim(source.indices.index(i), len(source.indices), batched) for i in named]
            dim = dims[0] if len(dims) == 1 else f"({', '.join(dims)})"
            argument = dim if isinstance(node.source, Leaf) else f"dim={dim}"
            text += f".{method}({argument})"
        if len(named) < len(node.summed):
            if node.mean:
                kept = [i for i in source.indices if i not in named]
                if not kept[0].startswith(BATCH) or len(named) + 1 < len(node.summed):
                    raise ValueError("a mean over the batch dims '...' of a value whose layout does not lead with "
                                     "them is not supported")
                # the batch dims, however many (none included), flattened into one leading dim and averaged
                return Code(f"{text}.unsqueeze(0).flatten(0, {-len(kept)}).mean(0)", node.indices)
            # sum_to_size reduces however many leading dims the batch has, none included
            text += f".sum_to_size({python_tuple([ScalarPrinter().doprint(size) for size in node.sizes])})"
        return Code(text, node.indices)
    if isinstance(node, MatMul):
        left = _arranged(_render_in(node.left, node.left_layout), node.left_layout)
        right = _arranged(_render_in(node.right, node.right_layout), node.right_layout)
        return Code(f"{left.operand('@')} @ {right.operand('@', 'right')}", node.indices, MATMUL)
    if isinstance(node, Einsum):
        operands = [render(o) for o in node.operands]
        letters = _letters([i for o in operands for i in o.indices] + list(node.indices))
        spec = ",".join("".join(letters[i] for i in o.indices) for o in operands)
        spec += "->" + "".join(letters[i] for i in node.indices)
        return Code(f"torch.einsum(\"{spec}\", {', '.join(o.text for o in operands)})", node.indices)
    if isinstance(node, Scatter):
        dims = tuple(GATHERED if i == (node.position or node.indices[0]) else i for i in node.indices)
        gather = gather_layout(Code(node.index, node.rows), dims, node.like)
        layout = tuple(i for i in gather.layout if i != GATHERED)
        source = render(node.source)
        if set(source.indices) != set(layout):   # constant along some dims: expanded, each position still adds
            position = dims.index(GATHERED)
            if gather.select:
                shape = f"{node.index}.shape"
                # x's dims before and after the gathered one (counted from the end after batch dims '...')
                before = position - len(dims) if BATCH in dims and position else position
                if position:
                    shape = f"{node.like}.shape[:{before}] + {shape}"
                if position < len(dims) - 1:
                    shape += f" + {node.like}.shape[{before + 1}:]"
            elif gather.shape:
                shape = gather.shape
            else:
                shape = python_tuple([f"{node.like}.shape[{node.indices.index(i)}]" if i in node.indices else
                                      f"{node.index}.shape[{node.rows.index(i)}]" for i in layout])
            ones = isinstance(node.source, Leaf) and node.source.expr == 1
            text = f"{node.like}.new_ones({shape})" if ones else f"{align(source, layout).atom()}.expand({shape})"
            source = Code(text, layout)
        source = _arranged(source, layout)
        # with batch dims '...', the gradient of x is added up at the batch shape the source has (the shape x, the
        # index and the other inputs broadcast to; x's may be fewer: the plan sums them back to it)
        batch = _batch_shape(node.source) or (
            f"{source.atom()}.shape[:{-len(layout) + 1}]" if len(layout) > 1 else f"{source.atom()}.shape")
        zeros = f"{source.atom() if source.text.isidentifier() else node.like}.new_zeros({batch} + " \
                f"{node.like}.shape[{-len(dims) + 1}:])"
        if not gather.select and BATCH in dims:
            gather = gather_layout(Code(node.index, node.rows), dims, node.like, batch=batch)
        if not gather.select:
            if GATHERED in gather.layout:
                source = Code(f"{source.atom()}.unsqueeze({gather.dim})", gather.layout)
            if gather.own:
                first, last = gather.own
                flattened = f".flatten({first})" if last == -1 else f".flatten({first}, {last})"
                source = Code(f"{source.atom()}{flattened}", source.indices)
            if BATCH in dims:
                return Code(f"{zeros}.scatter_add_({gather.dim}, {gather.index}, {source.text})", node.indices)
            return Code(f"{_zeros(node, source)}.scatter_add{_in_place(source)}({gather.dim}, {gather.index}, "
                        f"{source.text})", node.indices)
        position = dims.index(GATHERED)
        if BATCH in layout:     # counted from the end: `...` stands for any number of dims
            position -= len(layout)
        if _embedding_rows(node):
            return Code(f"torch.ops.aten.embedding_dense_backward({source.text}, {node.index}, "
                        f"{node.like}.shape[0], -1, False)", node.indices)
        flat = len(node.rows) == 1
        # flatten, not reshape(-1, size): -1 is ambiguous when a size is 0
        rows = source.text if flat else f"{source.atom()}.flatten({position}, {position + len(node.rows) - 1})"
        index = node.index if flat else f"{node.index}.reshape(-1)"
        if BATCH in dims and dims.index(GATHERED):
            return Code(f"{zeros}.index_add_({gather.dim}, {index}, {rows})", node.indices)
        return Code(f"{_zeros(node, source)}.index_add{_in_place(source)}({gather.dim}, {index}, {rows})",
                    node.indices)
    if isinstance(node, Scaled):
        source = render(node.source)
        return Code(_scale(node.coefficient, source), source.indices, MUL)
    if isinstance(node, Convolution):
        return _convolution(node)
    if isinstance(node, ConvolutionBackward):
        return _convolution_backward(node)
    if isinstance(node, Picked):
        dims = [str(d) for d in node.squeezed]
        squeezed = "" if not dims else f".squeeze({dims[0] if len(dims) == 1 else python_tuple(dims)})"
        return Code(f"{node.name}[{node.part}]{squeezed}", node.indices)
    raise TypeError(f"unknown node {node!r}")


def _window_layout(access: sympy.Indexed, spatial) -> tuple[str, ...]:
    """The dims of a window read's input, an affine subscript named by the index it moves along (its t)."""
    return tuple(i.name if isinstance(i, sympy.Idx) else
                 next(t for t, *_ in spatial if t in {a.name for a in i.atoms(sympy.Idx)}) for i in access.indices)


def _unsqueezed(code: Code, leading: tuple[tuple[str, ...], ...]) -> Code:
    """`code` with a dim of 1 where each leading dim (N and C of an input, say) is missing."""
    text = code.atom() if not all(leading) else code.text
    for position, dims in enumerate(leading):
        if not dims:
            text += f".unsqueeze({position})"
    return Code(text, code.indices)


def _steps(values: list) -> str:
    """A convolution's stride, padding or dilation: one number per spatial dim, a list (aten takes lists)."""
    return f"[{', '.join(str(v) for v in values)}]"


def _convolution_backward(node: ConvolutionBackward) -> Code:
    """torch.ops.aten.convolution_backward(grad, x, w, bias_sizes, stride, padding, dilation, False, output_padding,
    groups, output_mask): the (grad_x, grad_w, grad_b) of x's convolution by w, each where its input's
    needs_input_grad flag asks (None where not), x and grad laid out (N, C, L...), w (O, C, K...)."""
    conv = node.forward
    access = conv.source.args[0]
    spatial = tuple(t for t, *_ in conv.spatial)
    x = _arranged(Code(access_name(access), _window_layout(access, conv.spatial)), conv.batch + conv.channels + spatial)
    w = _arranged(Code(access_name(conv.kernel), tuple(i.name for i in conv.kernel.indices)),
                  conv.out + conv.channels + tuple(k for _, k, _, _ in conv.spatial))
    name, dims = node.gradient
    gradient = _arranged(Code(name, dims), conv.batch + conv.out + spatial)
    # a missing batch, channel or out-channel index is a dim of 1
    x, w, gradient = (_unsqueezed(code, leading) for code, leading in (
        (x, (conv.batch, conv.channels)), (w, (conv.out, conv.channels)), (gradient, (conv.batch, conv.out))))
    bias = "None" if conv.bias is None else \
        f"[{SizePrinter().doprint(next(i for i in conv.kernel.indices if i.name in conv.out).upper + 1)}]"
    mask = _steps(["False" if p is None else f"needs_input_grad[{p}]" for p in node.wanted])
    return Code(f"torch.ops.aten.convolution_backward({gradient.text}, {x.text}, {w.text}, {bias}, "
                f"{_steps([s for _, _, s, _ in conv.spatial])}, {_steps(node.padding)}, "
                f"{_steps([d for _, _, _, d in conv.spatial])}, False, {_steps([0] * len(spatial))}, 1, {mask})", ())


def _convolution(node: Convolution) -> Code:
    """F.conv{1,2,3}d(input, weight, stride=, dilation=): the source padded and laid out (N, C, t...), the
    kernel (out, C, k...), flipped along a k with a negative step; a missing N, C or out is a dim of 1."""
    if node.kind == "transposed":
        return _transposed_convolution(node)
    if node.kind == "weight":
        return _weight_gradient(node)
    if node.kind == "input":
        return _input_gradient(node)
    if node.kind == "folded":
        return _folded_input(node)
    access, front, back, _, value = node.source.args
    taps = {t: (k, stride, dilation) for t, k, stride, dilation in node.spatial}
    # zeros as many on both sides of a dim are the conv's padding, not a padded copy of the input
    padding = [f if value == 0 and f == b and f.is_Integer and f > 0 else sympy.S.Zero for f, b in zip(front, back)]
    padded = Code(_padded(access.base.label.name, [f - p for f, p in zip(front, padding)],
                          [b - p for b, p in zip(back, padding)], value), _window_layout(access, node.spatial))
    source = _arranged(padded, node.batch + node.channels + tuple(taps))
    text = source.text
    if not node.batch:
        text = f"{source.atom()}.unsqueeze(0)"
    if not node.channels:
        text = f"{text}.unsqueeze(1)"
    kernel = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                       node.out + node.channels + tuple(k for k, _, _ in taps.values()))
    weight = kernel.text
    # counted from the end: the kernel's taps are its last dims, before and after a missing out or C is added
    flipped = [str(position - len(taps)) for position, (k, _, dilation) in enumerate(taps.values()) if dilation < 0]
    if flipped:
        weight = f"{kernel.atom()}.flip({python_tuple(flipped)})"
    if not node.out:
        weight = f"{weight}.unsqueeze(0)"
    if not node.channels:
        weight = f"{weight}.unsqueeze(1)"
    options = f", {access_name(node.bias)}" if node.bias is not None else ""
    pads = [p for p, i in zip(padding, access.indices) if not isinstance(i, sympy.Idx)]
    for keyword, values, default in (("stride", [s for _, s, _ in taps.values()], 1),
                                     ("padding", pads, 0),
                                     ("dilation", [abs(d) for _, _, d in taps.values()], 1)):
        if any(v != default for v in values):
            options += f", {keyword}={values[0] if len(values) == 1 else python_tuple([str(v) for v in values])}"
    text = f"torch.nn.functional.conv{len(taps)}d({text}, {weight}{options})"
    if not node.out:
        text += ".squeeze(1)"
    if not node.batch:
        text += ".squeeze(0)"
    # a stride or dilation other than 1 may leave room for one more step than the index's size
    loose = [i for i, (_, stride, dilation) in enumerate(taps.values()) if stride != 1 or abs(dilation) != 1]
    if loose:
        leading = len(node.batch) + len(node.out)
        cuts = [":"] * leading + [f":{SizePrinter().doprint(size)}" if i in loose else ":"
                                  for i, size in enumerate(node.sizes)]
        while cuts and cuts[-1] == ":":
            cuts.pop()
        text += f"[{', '.join(cuts)}]"
    return Code(text, node.indices)


def _input_gradient(node: Convolution) -> Code:
    """torch.nn.grad.conv{1,2,3}d_input(shape, w, grad, padding=e, dilation=d): a convolution's grad_x, the
    term summing grad[b, o, t - d*k + e] * w[o, c, k] over o and k (the kernel PyTorch's own backward runs)."""
    access = node.source.args[0]
    taps = {t: (k, -dilation) for t, k, _, dilation in node.spatial}
    gradient = _arranged(Code(access_name(access), tuple(
        i.name if isinstance(i, sympy.Idx) else next(t for t in taps if t in {a.name for a in i.atoms(sympy.Idx)})
        for i in access.indices)), node.batch + node.channels + tuple(taps))
    weight = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                       node.channels + node.out + tuple(k for k, _ in taps.values()))
    sizes = {i.name: i.upper + 1 for a in (access, node.kernel) for i in a.atoms(sympy.Idx)}
    shape = python_tuple([SizePrinter().doprint(sizes[i]) for i in node.batch + node.out + tuple(taps)])
    offsets = [i.subs({a: 0 for a in i.atoms(sympy.Idx)}) for i in access.indices if not isinstance(i, sympy.Idx)]
    options = ""
    for keyword, values in (("padding", offsets), ("dilation", [d for _, d in taps.values()])):
        if any(v != (0 if keyword == "padding" else 1) for v in values):
            options += f", {keyword}={values[0] if len(values) == 1 else python_tuple([str(v) for v in values])}"
    return Code(f"torch.nn.grad.conv{len(taps)}d_input({shape}, {weight.text}, {gradient.text}{options})",
                node.indices)


def _folded_input(node: Convolution) -> Code:
    """torch.nn.grad.conv{1,2,3}d_input(shape, w, grad, stride=s, dilation=d): a convolution's grad_x where no step
    is 1, the fold of grad[b, o, t...] * w[o, c, k...] at l = s*t + d*k + e in each spatial dim summed over o,
    computed as long as the windows reach, then cropped or padded to l's size as the read took."""
    folds, value = {}, node.source
    while isinstance(value, fold_window):
        folds[value.args[2].name] = value
        value = value.value
    gradient = next(r for r in sympy.Mul.make_args(value) if r != node.kernel)
    scalar = SizePrinter()
    starts, reaches, front, back = [], [], [], []
    for position, k_name, stride, dilation in node.spatial:
        subscript, at = folds[position].args[1], folds[position].args[2]
        (t,) = [i for i in subscript.atoms(sympy.Idx) if i.name != k_name]
        (k,) = [i for i in subscript.atoms(sympy.Idx) if i.name == k_name]
        lowest = subscript.subs({t: 0, k: 0})
        reach = stride * t.upper + dilation * k.upper + 1
        starts.append(t.name)
        reaches.append(scalar.doprint(reach))
        front.append(lowest)
        back.append(sympy.expand(at.upper + 1 - lowest - reach))
    arranged = _arranged(Code(access_name(gradient), tuple(i.name for i in gradient.indices)),
                         node.batch + node.channels + tuple(starts))
    weight = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                       node.channels + node.out + tuple(k for _, k, _, _ in node.spatial))
    sizes = {i.name: i.upper + 1 for a in (gradient, node.kernel) for i in a.atoms(sympy.Idx)}
    shape = python_tuple([scalar.doprint(sizes[i]) for i in node.batch + node.out] + reaches)
    steps = {keyword: values[0] if len(values) == 1 else python_tuple([str(v) for v in values]) for keyword, values in
             (("stride", [s for _, _, s, _ in node.spatial]), ("dilation", [d for _, _, _, d in node.spatial]))}
    text = (f"torch.nn.grad.conv{len(node.spatial)}d_input({shape}, {weight.text}, {arranged.text}, "
            f"stride={steps['stride']}, dilation={steps['dilation']})")
    text = _padded(text, [0, 0] + front, [0, 0] + back)
    return Code(text, node.indices)


def _weight_gradient(node: Convolution) -> Code:
    """torch.nn.grad.conv{1,2,3}d_weight(x, shape, grad): a convolution's grad_w, the term summing
    x[b, c, d*t + s*k + e] * grad[b, o, k] over b and k (the kernel PyTorch's own backward runs)."""
    access, front, back, _, value = node.source.args
    taps = {t: (k, stride, dilation) for t, k, stride, dilation in node.spatial}
    padded = Code(_padded(access.base.label.name, front, back, value),
                  tuple(i.name if isinstance(i, sympy.Idx) else next(t for t in taps if t in {a.name for a in i.atoms(sympy.Idx)})
                        for i in access.indices))
    source = _arranged(padded, node.channels + node.batch + tuple(taps))
    gradient = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                         node.channels + node.out + tuple(k for k, _, _ in taps.values()))
    sizes = {i.name: i.upper + 1 for a in (access, node.kernel) for i in a.atoms(sympy.Idx)}
    shape = python_tuple([SizePrinter().doprint(sizes[i]) for i in node.out + node.batch + tuple(taps)])
    options = ""
    for keyword, values in (("stride", [d for _, _, d in taps.values()]), ("dilation", [s for _, s, _ in taps.values()])):
        if any(v != 1 for v in values):
            options += f", {keyword}={values[0] if len(values) == 1 else python_tuple([str(v) for v in values])}"
    return Code(f"torch.nn.grad.conv{len(taps)}d_weight({source.text}, {shape}, {gradient.text}{options})",
                node.indices)


def _transposed_convolution(node: Convolution) -> Code:
    """F.conv_transpose{1,2,3}d(grad, x, stride=): the term sums grad[b, c, k] * x[c, a, t - s*k + e] over c
    and k, so each grad entry spreads x's taps from s*k; the result, s*(size_k - 1) + x's length long, is
    cut (or padded) to t = 0 .. size_t - 1 (reads of x outside its range are zero)."""
    if isinstance(node.source, in_range):
        return _spread(node)
    access, front, back, *_ = node.source.args
    taps = {t: (k, -dilation) for t, k, _, dilation in node.spatial}
    gradient = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                         node.out + node.channels + tuple(k for k, _ in taps.values()))
    weight = _arranged(Code(access_name(access), tuple(
        i.name if isinstance(i, sympy.Idx) else next(t for t in taps if t in {a.name for a in i.atoms(sympy.Idx)})
        for i in access.indices)), node.channels + node.batch + tuple(taps))
    text, kernel = gradient.text, weight.text
    if not node.out:
        text = f"{gradient.atom()}.unsqueeze(0)"
    if not node.channels:
        text, kernel = f"{text}.unsqueeze(1)", f"{weight.atom()}.unsqueeze(0)"
    if not node.batch:
        kernel = f"{kernel}.unsqueeze(1)"
    strides = [stride for _, stride in taps.values()]
    options = "" if all(s == 1 for s in strides) else \
        f", stride={strides[0] if len(strides) == 1 else python_tuple([str(s) for s in strides])}"
    text = f"torch.nn.functional.conv_transpose{len(taps)}d({text}, {kernel}{options})"
    # the full result starts at t = -e: pad (or crop) it to t = 0 .. size_t - 1
    affine = [p for p, i in enumerate(access.indices) if not isinstance(i, sympy.Idx)]
    k_sizes = [next(i for i in access.indices[p].atoms(sympy.Idx) if i.name == k).upper
               for p, (k, _) in zip(affine, taps.values())]
    amounts = [(front[p] - stride * reach, back[p] - stride * reach)
               for p, stride, reach in zip(affine, strides, k_sizes)]
    text = _padded(text, [sympy.S.Zero] * 2 + [f for f, _ in amounts], [sympy.S.Zero] * 2 + [b for _, b in amounts])
    if not node.batch:
        text += ".squeeze(1)"
    if not node.out:
        text += ".squeeze(0)"
    return Code(text, node.indices)


def _spread(node: Convolution) -> Code:
    """aten.unfold_backward of g read through a stride-0 view along the window, (..., t, size_k): each g[..., t]
    added at the size_k positions from s*t, the adjoint of x.unfold(dim, size_k, s), with nothing size_k times
    larger built (a transposed convolution by ones would build its columns); a mean's 1 / size_k scales the fresh
    result in place; then cut (or padded) to l = 0 .. size_l - 1."""
    value, size, like = node.source.args
    ((position, tap, _, step),) = node.spatial
    gradient = _arranged(Code(access_name(node.kernel), tuple(i.name for i in node.kernel.indices)),
                         node.out + (tap,))
    scalar = SizePrinter()
    sizes = [scalar.doprint(i.upper + 1) for i in node.kernel.indices if i.name in node.out]
    index = next(i for i in value.atoms(sympy.Idx) if i.name == tap)
    lowest = value.subs({i: (i.upper if value.coeff(i) < 0 else 0) for i in value.atoms(sympy.Idx)})
    reach = sum((abs(value.coeff(i)) * i.upper for i in value.atoms(sympy.Idx)), sympy.S.One)
    spread = -step * index.upper
    front, back = -lowest - spread, sympy.expand(lowest + reach - size - spread)
    # the windows reach R = s * (size_t - 1) + size_k from where they start. Where the input ends less than a
    # stride after them (its length gives the number of windows), the rest is zeros the kernel leaves, no copy;
    # else (windows into a `pad` after the input, or as many as another input sets) R long, cropped or padded
    length = spread + size
    fits = front == 0 and _less_than_a_stride(back.subs(dict(node.known)), -step)
    windows = f"{gradient.atom()}.unsqueeze(-1).expand({', '.join(['-1'] * (len(node.out) + 1))}, {scalar.doprint(size)})"
    text = (f"torch.ops.aten.unfold_backward({windows}, {python_tuple(sizes + [scalar.doprint(length + (back if fits else 0))])}, "
            f"{len(node.out)}, {scalar.doprint(size)}, {-step})")
    if node.scale != 1:
        numerator, denominator = node.scale.as_numer_denom()
        text += f".div_({scalar.doprint(denominator)})" if numerator == 1 else f".mul_({scalar.doprint(node.scale)})"
    if not fits:
        text = _padded(text, [sympy.S.Zero] * len(node.out) + [front], [sympy.S.Zero] * len(node.out) + [back])
    return Code(text, node.out + (position,))


def _less_than_a_stride(rest: sympy.Expr, stride: int) -> bool:
    """Whether 0 <= rest < stride for every size, where `rest` is linear in sizes and in their floors (an
    inferred number of windows, size_l // 2): floor(u) lies in (u - 1, u], so `rest` in its two bounds."""
    floors = sorted(rest.atoms(sympy.floor), key=sympy.default_sort_key)
    low = rest.subs({f: f.args[0] if rest.coeff(f) < 0 else f.args[0] - 1 for f in floors})
    high = rest.subs({f: f.args[0] - 1 if rest.coeff(f) < 0 else f.args[0] for f in floors})
    low, high = sympy.expand(low), sympy.expand(high)
    return bool(low.is_number and high.is_number and low >= 0 and (high <= stride if floors else high < stride))


def access_name(access: sympy.Indexed) -> str:
    return access.base.label.name


def _padded(tensor: str, front, back, value=sympy.S.Zero) -> str:
    """F.pad(tensor, ...) with `front` and `back` entries of `value` (zeros by default) at each dim (negative:
    cropped), or the tensor."""
    amounts = list(zip(front, back))
    first = min((p for p, (f, b) in enumerate(amounts) if f != 0 or b != 0), default=None)
    if first is None:
        return tensor
    pads = [SizePrinter().doprint(a) for f, b in reversed(amounts[first:]) for a in (f, b)]     # last dim first
    filled = "" if value == 0 else f", value={_float_literal(value)}"
    return f"torch.nn.functional.pad({tensor}, {python_tuple(pads)}{filled})"


def _float_literal(value: sympy.Expr) -> str:
    """A number as Python reads it back exactly: -math.inf, 1.5."""
    if value.is_infinite:
        return "-math.inf" if value.is_extended_negative else "math.inf"
    return repr(float(value))


GATHERED = "<gathered>"   # the dim an integer input indexes, in gather_layout's dims


@dataclass(frozen=True)
class GatherLayout:
    """How a tensor indexed at one dim by an integer input is read (gather) or its gradient added (scatter)."""

    select: bool                # the index shares no dim with the others: advanced indexing / index_add
    dim: str                    # the gathered dim, as a dim argument
    layout: tuple[str, ...]     # dims of the result: the index's own dims take the gathered dim's place
    index: str = ""             # gather / scatter_add: the index lined up in `layout` at full rank, its own
                                # dims flattened into one
    source: str = ""            # gather: the tensor read, expanded to the batch shape it and the index span
    own: tuple[int, int] | None = None  # gather: the first and last dim of the index's own dims in `layout`
                                # (a dim argument each), when there are several: flattened into one
    unflatten: str = ""         # gather: the sizes of those own dims, `idx.shape[1:]`
    shape: str = ""             # gather with batch dims: the shape of the result, the batch broadcast


def gather_layout(index: Code, dims: tuple[str, ...], tensor: str, batch: str = "") -> GatherLayout:
    """The one rule for `x[..., idx[...], ...]`, the input `tensor` with `dims` (GATHERED where `index` reads it).

    An index whose dims none of x's other dims has selects: its dims stand where the gathered dim was
    (`x.index_select(1, idx)`), and the gradient adds rows with `index_add`. An index that shares some dims with x's
    others is torch.gather's: lined up as x is (its own dims, flattened into one, or size 1, at the gathered
    place; expanded along x's dims it lacks, and to the batch shape x and the index broadcast to), the result
    unflattened back into the own dims, and the gradient is `scatter_add`. `batch`, when given, is the batch
    shape to expand the index to (a gradient's, which may be wider than x's)."""
    position = dims.index(GATHERED)
    plain = tuple(i for i in dims if i != GATHERED)
    batched = BATCH in dims
    dim = str(position - len(dims) if batched else position)
    shared = [i for i in index.indices if i in plain]
    own = [i for i in index.indices if i not in plain]
    if not shared:
        if BATCH in own and position:
            raise ValueError(f"cannot gather with batch dims '...' at dim {position}: the batch dims must lead")
        return GatherLayout(True, dim, dims[:position] + index.indices + dims[position + 1:])
    if BATCH in own:
        raise ValueError(f"cannot gather {tensor} by {index.text}: the index has batch dims '...' and {tensor} "
                         f"has none")
    layout = dims[:position] + (tuple(own) or (GATHERED,)) + dims[position + 1:]
    without = tuple(i for i in layout if i != GATHERED)
    lined = align(index, without)
    # missing leading dims as 1s (batch dims '...' it lacks are added by the expand below)
    text = lined.atom() + ".unsqueeze(0)" * len([i for i in without if i != BATCH and i not in lined.indices])
    if not own:
        text += f".unsqueeze({dim})"
    # several own dims: flattened into the gathered dim, as torch.gather reads one (counted from the end: a
    # missing leading dim is added after)
    first = without.index(own[0]) - len(without) if own else 0
    spans = (first, first + len(own) - 1) if len(own) > 1 else None
    if spans:
        text += f".flatten({spans[0]})" if spans[1] == -1 else f".flatten({spans[0]}, {spans[1]})"
    held = [p - (len(index.indices) if BATCH in index.indices else 0) for p, i in enumerate(index.indices)
            if i in own]
    unflatten = ""
    if spans:
        consecutive = held == list(range(held[0], held[0] + len(held)))
        last = held[-1] in (-1, len(index.indices) - 1)
        unflatten = (f"{index.text}.shape[{held[0]}:{'' if last else held[-1] + 1}]" if consecutive else
                     python_tuple([f"{index.text}.shape[{p}]" for p in held]))
    flat = [i for i in layout if i not in own[1:]]     # x's rank: one dim for the own dims
    lacking = [p for p, i in enumerate(flat) if i not in index.indices and i != GATHERED and i not in own]
    named = len(dims) - 1 if batched else len(dims)
    given, shape = batch, ""
    source = tensor
    if batched:
        batch = given or (f"{tensor}.shape[:{-named}]" if named else f"{tensor}.shape")
        if BATCH in index.indices and not given:
            # the batch dims of x and of the index broadcast together: both are expanded to that shape
            rest = len(index.indices) - 1
            batch = f"torch.broadcast_shapes({batch}, {index.text}.shape[:{-rest}])" if rest else \
                f"torch.broadcast_shapes({batch}, {index.text}.shape)"
            source = f"{tensor}.expand({', '.join(['*' + batch] + ['-1'] * named)})"
        sizes = ["*" + batch] + ["-1" if p not in lacking else f"{tensor}.shape[{p - len(flat)}]"
                                 for p, i in enumerate(flat) if i != BATCH]
        text += f".expand({', '.join(sizes)})"
        shape = python_tuple(["*" + batch] + [
            f"{tensor}.shape[{dims.index(i) - len(dims)}]" if i in dims else
            f"{index.text}.shape[{index.indices.index(i) - (len(index.indices) if BATCH in index.indices else 0)}]"
            for i in layout if i not in (BATCH, GATHERED)])
    elif lacking:
        sizes = ["-1" if p not in lacking else f"{tensor}.shape[{p}]" for p in range(len(flat))]
        text += f".expand({', '.join(sizes)})"
    return GatherLayout(False, dim, layout, index=text, source=source, own=spans, unflatten=unflatten, shape=shape)


def _batch_shape(node: Node) -> str:
    """Source for the batch shape of a value a lowered node computes, read off the upstream gradient it reads
    with batch dims '...' (the shape every input's batch dims broadcast to); "" when it reads none."""
    reads = []
    for child in [node] if isinstance(node, Leaf) else [getattr(node, f.name) for f in fields(node)]:
        if isinstance(child, Leaf):
            reads += [r for r in sympy.sympify(child.expr).atoms(sympy.Indexed)
                      if r.base.label.name.startswith(naming.grad("")) and isinstance(r.indices[0], sympy.Idx)
                      and r.indices[0].name == BATCH and all(isinstance(i, sympy.Idx) for i in r.indices)]
        elif isinstance(child, (tuple, list)) or dataclasses.is_dataclass(child):
            for item in child if isinstance(child, (tuple, list)) else [child]:
                shape = _batch_shape(item) if dataclasses.is_dataclass(item) else ""
                if shape:
                    return shape
    if not reads:
        return ""
    read = min(reads, key=lambda r: r.base.label.name)
    name = read.base.label.name
    return f"{name}.shape[:{1 - len(read.indices)}]" if len(read.indices) > 1 else f"{name}.shape"


def _embedding_rows(node: Scatter) -> bool:
    """Whether a scatter adds rows of a 2-D table picked by an index of any dims (an embedding's lookup): torch's
    own embedding backward adds them up, sorted by row, without flattening the index."""
    dims = tuple(GATHERED if i == (node.position or node.indices[0]) else i for i in node.indices)
    return len(dims) == 2 and dims[0] == GATHERED and BATCH not in node.indices + node.rows and \
        gather_layout(Code(node.index, node.rows), dims, node.like).select


def _zeros(node: Scatter, source: Code) -> str:
    """The zeros a scatter adds into: made from the source when it is a plain tensor (then added in place, one
    allocation; under vmap they are batched as the source is, as autograd's own gather backward makes them)."""
    return f"{source.text}.new_zeros({node.like}.shape)" if source.text.isidentifier() \
        else f"torch.zeros_like({node.like})"


def _in_place(source: Code) -> str:
    return "_" if source.text.isidentifier() else ""


def _arranged(code: Code, layout: tuple[str, ...]) -> Code:
    if code.indices == layout:
        return code
    unpermuted = code.unpermuted or code       # permutations compose, as in `align`
    if unpermuted.indices == layout:
        return unpermuted
    return Code(unpermuted.atom() + _permutation(unpermuted.indices, layout), layout, ATOM, unpermuted)


def _dim(position: int, ndim: int, batched: bool = False) -> str:
    if batched:
        return str(position - ndim)
    return "-1" if position == ndim - 1 and ndim > 1 else str(position)


def _batch_of(body: sympy.Expr, bound: tuple[str, ...]) -> str | None:
    """The name under which a reduction over `bound` reduces the batch dims `...` of `body` (a sum or max binds
    it as a fresh index of the batch's size), or None."""
    return next((i.name for i in body.atoms(sympy.Idx) if i.name in bound
                 and (i.name == BATCH or i.upper + 1 == size_symbol(BATCH))), None)


def _dims_argument(dims: list[str]) -> str:
    """The dim argument of a reduction over `dims`: one dim, or a tuple of them."""
    return dims[0] if len(dims) == 1 else python_tuple(dims)


def python_tuple(items: list[str] | tuple[str, ...]) -> str:
    """Python tuple syntax: (a, b), (a,) or ()."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _letters(indices: list[str]) -> dict[str, str]:
    """einsum subscripts: an index keeps its name when that is one free letter."""
    letters: dict[str, str] = {BATCH: "..."}
    for index in dict.fromkeys(indices):
        if len(index) == 1 and index.isalpha() and index not in letters.values():
            letters[index] = index
    spare = (c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in letters.values())
    for index in dict.fromkeys(indices):
        letters.setdefault(index, next(spare))
    return letters


def _scale(coefficient: sympy.Expr, code: Code) -> str:
    """`coefficient * code`, written with the number in front and divisors behind."""
    # The tensor expression stands in as a symbol, so SymPy's printer lays out the product.
    # it may print on either side of a scalar `*` or on the left of `/`
    placeholder = sympy.Symbol(code.operand("*", "right"))
    return TorchCodePrinter((), frozenset({placeholder})).doprint(coefficient * placeholder)


def _without_minus(node: Node) -> Node | None:
    """The term without its minus sign, when its coefficient has one; else None."""
    if isinstance(node, Scaled) and node.coefficient.could_extract_minus_sign():
        return node.source if node.coefficient == -1 else Scaled(-node.coefficient, node.source)
    if isinstance(node, Leaf) and node.expr.could_extract_minus_sign():
        return Leaf(-node.expr, node.indices)
    return None


def _fused_term(node: Node) -> tuple[sympy.Expr, Leaf] | None:
    """(coefficient, leaf) when `node` is one fused kernel call, maybe scaled."""
    coefficient, leaf = (node.coefficient, node.source) if isinstance(node, Scaled) else (sympy.S.One, node)
    if isinstance(leaf, Leaf) and isinstance(leaf.expr, Fused):
        return coefficient, leaf
    return None


def _kernel_factor(lowered: LoweredExpr) -> tuple[sympy.Expr, Leaf] | None:
    """(factor, leaf) when the whole expression is one fused call that takes its scale into its g."""
    fused = _fused_term(lowered.terms[0]) if len(lowered.terms) == 1 else None
    if fused is not None and (lowered.plan.scale != 1 or fused[0] != 1):
        return lowered.plan.scale * fused[0], fused[1]
    return None


@dataclass(frozen=True)
class JointCall:
    """Gradients that are each one output of the same kernel call, computed by one call of it."""

    gradients: tuple[int, ...]     # the gradients' places in the list given, in the order of ...
    outputs: tuple[int, ...]       # ... the kernel output each is
    call: str                      # the call, with a mask of the outputs wanted from the needs_input_grad flags
    views: tuple[str, ...]         # what views each output as its gradient ("": none)
    comments: tuple[str, ...]      # what each of those outputs is, from the record


def joint_calls(exprs: list[LoweredExpr], flags: list[int]) -> list[JointCall]:
    """The groups of two or more of `exprs` that are each exactly one output of one call of a kernel with a
    `joint` printer (native_batch_norm_backward's d/dx, d/dw and d/db): one call computes them, asking for the
    outputs needed (an output mask, as autograd's own call does); `flags` are the gradients' needs_input_grad
    positions."""
    groups: dict[tuple, list[tuple[int, Fused, sympy.Expr, Leaf]]] = {}
    for position, expr in enumerate(exprs):
        whole = _kernel_factor(expr) or (_fused_term(expr.terms[0]) if len(expr.terms) == 1 else None)
        if whole is None:
            continue
        factor, leaf = whole
        key = joint_key(leaf.expr, factor)
        if key is None or kernel_of(leaf.expr).joint is None:
            continue
        printer = TorchCodePrinter(leaf.indices, inline=inline_codes(leaf))
        part, weight, bias = joint_weights(leaf.expr, factor)
        mask = "[" + ", ".join(str(k == part) for k in range(3)) + "]"
        alone = joint_call(printer, leaf.expr, factor, weight, bias, mask)
        if render_expr(expr) != f"{alone}[{part}]{kernel_of(leaf.expr).output_view(part, leaf.expr.args[3], tuple(leaf.expr.args[6]))}":
            continue        # the output is placed or reshaped on its way to the gradient
        groups.setdefault(key, []).append((position, leaf.expr, factor, leaf))
    joint = []
    for members in groups.values():
        parts = {joint_weights(node, factor)[0]: (position, node, factor, leaf) for position, node, factor, leaf in members}
        weights = {joint_weights(node, factor)[1] for _, node, factor, _ in members} - {None}
        if len(members) < 2 or len(parts) != len(members) or len(weights) > 1:
            continue
        bias = next((joint_weights(n, f)[2] for _, n, f, _ in members if joint_weights(n, f)[0] == 2), None)
        position, node, factor, leaf = members[0]
        printer = TorchCodePrinter(leaf.indices, inline=inline_codes(leaf))
        mask = "[" + ", ".join(f"needs_input_grad[{flags[parts[k][0]]}]" if k in parts else "False" for k in range(3)) + "]"
        joint.append(JointCall(tuple(parts[k][0] for k in sorted(parts)), tuple(sorted(parts)),
                               joint_call(printer, node, factor, next(iter(weights), None), bias, mask),
                               tuple(kernel_of(node).output_view(k, node.args[3], tuple(node.args[6]))
                                     for k in sorted(parts)),
                               comments([(parts[k][1], parts[k][2]) for k in sorted(parts)])))
    return joint


def fused_calls(exprs: list[LoweredExpr], shared: tuple[Node, ...] = ()) -> list[tuple[Fused, sympy.Expr]]:
    """Each fused kernel call the code of `exprs` and of the shared values makes, with the factor it
    takes into its g."""
    calls = []
    for expr in exprs:
        scaled = _kernel_factor(expr)
        for root in expr.terms:
            for node in walk(root):
                if isinstance(node, Leaf):
                    calls += [(call, scaled[0] if scaled is not None and call == scaled[1].expr else sympy.S.One)
                              for call in sorted(atoms_of(node.expr, Fused), key=sympy.default_sort_key)]
    for root in shared:
        for node in walk(root):
            if isinstance(node, Leaf):
                calls += [(call, sympy.S.One)
                          for call in sorted(atoms_of(node.expr, Fused), key=sympy.default_sort_key)]
    return calls


# what a folded window (functions.fold_window) prints its call with computes
FOLD_COMMENT = ("unfold_backward(g, shape, dim, K, s): each window's entries of g added back at the positions "
                "they read, the adjoint of x.unfold(dim, K, s)")
SCATTER_COMMENT = "scatter_add: each window's g added at its first max (min), s * t + argmax"
SAVED_SCATTER_COMMENT = "scatter_add_: each window's g added at its first max (min), the input position the forward saved"
# what the calls that lower.py's nodes print compute, beside the kernel records' and the folds'
SPREAD_COMMENT = ("unfold_backward(g.unsqueeze(-1).expand(..., K), shape, dim, K, s): each g[..., t] added at the K "
                  "positions from s * t")
EMBEDDING_COMMENT = ("embedding_dense_backward(g, idx, V, -1, False): row r of the result is the sum of g's rows "
                     "where idx == r")
CONVOLUTION_BACKWARD_COMMENT = ("convolution_backward(g, x, w, ...): (grad_x, grad_w, grad_b) of y = conv(x, w) + b "
                                "in one call, as autograd's, each where its needs_input_grad flag asks")


def _first_share(fold: fold_window):
    """(first_max along the fold's inner index, the rest of its value without that index), or (None, None):
    the whole share of each window at one position, which a scatter_add at the argmax folds back."""
    outer, inner = fold.cut()
    factors = sympy.Mul.make_args(fold.value)
    first = [f for f in factors if isinstance(f, first_max) and f.index == inner
             or isinstance(f, one_hot) and f.args[1] == inner and inner.name not in free_indices(f.args[0])]
    rest = sympy.Mul(*[f for f in factors if f not in first])
    if len(first) == 1 and inner.name not in free_indices(rest) and outer.name in free_indices(rest):
        return first[0], rest
    return None, None


def kernel_comments(exprs: list[LoweredExpr], shared: tuple[Node, ...] = ()) -> tuple[str, ...]:
    """What each fused kernel call in the code computes, from the record that printed it."""
    leaves = [node.expr for root in [t for e in exprs for t in e.terms] + list(shared) for node in walk(root)
              if isinstance(node, Leaf)]
    folds = [f for leaf in leaves for f in leaf.atoms(fold_window)]
    folds = tuple(dict.fromkeys(FOLD_COMMENT if _first_share(f)[0] is None else SAVED_SCATTER_COMMENT
                                if isinstance(_first_share(f)[0], one_hot) else SCATTER_COMMENT for f in folds))
    nodes = [node for root in [t for e in exprs for t in e.terms] + list(shared) for node in walk(root)]
    calls = tuple(dict.fromkeys(
        [SPREAD_COMMENT for n in nodes if isinstance(n, Convolution) and isinstance(n.source, in_range)] +
        [EMBEDDING_COMMENT for n in nodes if isinstance(n, Scatter) and _embedding_rows(n)] +
        [CONVOLUTION_BACKWARD_COMMENT for n in nodes if isinstance(n, ConvolutionBackward)]))
    return comments(fused_calls(exprs, shared)) + folds + calls


def render_expr(lowered: LoweredExpr) -> str:
    """The right-hand side that assigns one whole expression, shaped exactly like its target."""
    plan = lowered.plan
    if not lowered.terms:
        return f"torch.zeros_like({plan.like})"
    # lead with a term that is not negated, and subtract the negated ones: `b - a`, not `-a + b`
    terms = sorted(lowered.terms, key=lambda term: _without_minus(term) is not None)
    parts = [align(render(term), plan.indices) for term in terms]
    text = parts[0].operand("+")
    for term in terms[1:]:
        positive = _without_minus(term)
        operator = "-" if positive is not None else "+"
        text += f" {operator} " + align(render(positive if positive is not None else term),
                                        plan.indices).operand(operator, "right")
    atomic = len(parts) == 1 and parts[0].precedence >= ATOM
    # the numbers scaling a gradient expanded to the batch shape go after the expansion, before the sum back
    # to the input's shape: a mean's 1 / size is inf over a size-0 batch and must meet only the empty
    # expanded tensor (torch's mean backward divides the expanded gradient), never a tensor that broadcasts
    # into it or the empty sum's 0 (NaN)
    deferred = sympy.S.One
    scaled = _kernel_factor(lowered)
    if scaled is not None:
        # a fused kernel is linear in its gradient: the scale goes into it
        factor, leaf = scaled
        text = kernel_of(leaf.expr).print(TorchCodePrinter(leaf.indices, inline=inline_codes(leaf)), leaf.expr, factor)
        text = align(Code(text, leaf.indices), plan.indices).text
        atomic = True
    elif len(terms) == 1 and isinstance(terms[0], Scaled) and plan.scale != 1:
        # one scaled term: its coefficient joins the common scale, so the tensor is scaled once
        source = render(terms[0].source)
        deferred = plan.scale * terms[0].coefficient
        text, parts, atomic = source.text, [source], source.precedence >= ATOM
    elif plan.scale != 1:
        deferred = plan.scale
    if deferred != 1:
        factors = sympy.Mul.make_args(deferred)
        now = sympy.Mul(*(f for f in factors if not (expands_batch(lowered) and is_python_number(f))))
        deferred = deferred / now
        if now != 1:
            text = _scale(now, Code(text, plan.indices, ATOM if atomic else ADD if len(parts) > 1
                                    else parts[0].precedence))
            atomic = False
    if lowered.indexed is not None:
        # the scaled sum is a fresh tensor: add the one-hot term at one class per row, in place
        indexed = lowered.indexed
        rows = f"torch.arange({size_symbol(indexed.row).name}, device={indexed.index}.device)"
        value = TorchCodePrinter(()).doprint(indexed.coefficient)
        text = (text if atomic else f"({text})") + f".index_put_(({rows}, {indexed.index}), {value}, accumulate=True)"
        atomic = True
    # the dims the terms have (align's unsqueezes add dims of size 1, which do not count)
    covered = set().union(*(term.indices for term in terms))
    if expands_batch(lowered):
        # `...` of the input broadcasts against the others': expand to the batch shape they span, sum back
        text = (text if atomic else f"({text})") + f".expand({broadcast_shape_like(plan)})"
        atomic = True
    elif covered != set(plan.indices) and plan.like is not None:   # (forward mode expands the sum of its shares)
        text = (text if atomic else f"({text})") + f".expand_as({plan.like})"
        atomic = True
    if deferred != 1:
        text, atomic = _scale(deferred, Code(text, plan.indices, ATOM if atomic else ADD)), False
    if plan.unbroadcast:
        text = (text if atomic else f"({text})") + f".sum_to_size({plan.like}.shape)"
    return text


def broadcast_batch_shape(inputs: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """Source for the shape the batch dims of `inputs` (name, dims) broadcast to."""
    shapes = [f"{name}.shape[:-{len(dims) - 1}]" if len(dims) > 1 else f"{name}.shape" for name, dims in inputs]
    return f"torch.broadcast_shapes({', '.join(shapes)})"


def broadcast_shape_like(plan) -> str:
    """Source for the shape of a gradient before it is summed back to its input's: the broadcast batch
    shape, then the input's own other dims."""
    named = len(plan.indices) - 1
    shape = broadcast_batch_shape(plan.batch_inputs)
    return f"{shape} + {plan.like}.shape[-{named}:]" if named else shape


def size_bindings(op: OpSpec, exprs: list[LoweredExpr],
                  sources: list[tuple[str, tuple[str, ...]]] | None = None,
                  shared: tuple[Leaf, ...] = (), also: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """`size_n = x.shape[0]` for every size the code uses, and those of the indices `also`, read off
    the first of `sources` with that dim.

    `sources` are (tensor name, dims) pairs; by default the op's inputs.
    """
    if sources is None:
        sources = [(t.name, t.indices) for t in op.inputs]
    used = set(sizes_used(op, exprs, shared)) | {op.size_of(i) for i in also if i != BATCH}
    # a size no source has is set by the spec (`sizes`) or inferred from the affine reads, in other sizes
    computed = {index: op.size_value(index) for index in used
                if index != BATCH and not any(index in dims for _, dims in sources)}
    used |= {s.name.removeprefix(naming.size("")) for value in computed.values() for s in value.free_symbols}
    read = [(size_symbol(index).name, _batch_size(sources, grad(op.output)) if index == BATCH else
             _shape_of(*size_source(index, sources), index))
            for index, representative in sorted(dict(op.index_sizes).items())
            if index == representative and index in used and index not in computed]
    return read + [(size_symbol(index).name, SizePrinter().doprint(value)) for index, value in sorted(computed.items())]


def output_shape(op: OpSpec, sources: list[tuple[str, tuple[str, ...]]]) -> str:
    """Source for the shape of the op's result, `(size_n, size_m)` (those sizes bound), its batch dims
    `...` read off the sources that have them, broadcast together when several do."""
    dims = []
    for index in op.output_indices:
        if index != BATCH:
            dims.append(size_symbol(op.size_of(index)).name)
            continue
        shapes = [f"{name}.shape[:-{len(indices) - 1}]" if len(indices) > 1 else f"{name}.shape"
                  for name, indices in sources if BATCH in indices]
        dims.append("*" + (shapes[0] if len(shapes) == 1 else f"torch.broadcast_shapes({', '.join(shapes)})"))
    if len(dims) == 1 and dims[0].startswith("*"):
        return dims[0][1:]      # the batch dims alone: x.shape
    return python_tuple(dims) if dims else "()"


def size_readers(index: str, sources: list[tuple[str, tuple[str, ...]]], op: OpSpec) -> tuple[str, ...]:
    """The tensors whose shapes the binding of `index`'s size reads, as `size_bindings` writes it: a size
    no source has is set by the spec (it reads nothing) or inferred from the sizes it is computed of."""
    if index == BATCH:
        return tuple(name for name, _ in _batch_sources(sources, grad(op.output)))
    if any(index in dims for _, dims in sources):
        return (size_source(index, sources)[0],)
    return tuple(name for s in sorted(op.size_value(index).free_symbols, key=str)
                 for name in size_readers(s.name.removeprefix(naming.size("")), sources, op))


def _batch_sources(sources: list[tuple[str, tuple[str, ...]]], grad_output: str) -> list[tuple[str, tuple[str, ...]]]:
    """The tensors the number of batch positions is read off: the first batched one when it alone has batch
    dims or it is the upstream gradient (which has the result's), else every batched one, which may broadcast."""
    batched = [(name, dims) for name, dims in sources if BATCH in dims]
    return batched[:1] if len(batched) == 1 or batched[0][0] == grad_output else batched


def _batch_size(sources: list[tuple[str, tuple[str, ...]]], grad_output: str) -> str:
    """The number of batch positions: one tensor's, or that of the batch shape several broadcast to
    (read off the first when the shapes agree: torch.broadcast_shapes costs microseconds of Python)."""
    batched = _batch_sources(sources, grad_output)
    if len(batched) == 1:
        return _shape_of(*batched[0], BATCH)
    shapes = []
    for name, dims in batched:
        named = len(dims) - 1
        shapes.append(f"{name}.shape[:-{named}]" if named else f"{name}.shape")
    one = _shape_of(*batched[0], BATCH)
    return f"{one} if {' == '.join(shapes)} else torch.broadcast_shapes({', '.join(shapes)}).numel()"


def size_source(index: str, sources: list[tuple[str, tuple[str, ...]]]) -> tuple[str, tuple[str, ...]]:
    """The first (tensor, dims) among `sources` that has the dim `index`."""
    return next((name, dims) for name, dims in sources if index in dims)


@functools.lru_cache(maxsize=4096)    # a leaf recurs in each gradient, style and emit that prints it
def _leaf_sizes(expr: sympy.Expr) -> frozenset[sympy.Expr]:
    """The sizes the printed code of one leaf mentions."""
    outside = expr.xreplace({call: sympy.S.Zero for call in expr.atoms(Fused)})
    used = expr.free_symbols | {h.args[1].upper + 1 for h in outside.atoms(one_hot)}
    # windows are cut to the sizes of the indices of their subscripts
    used |= {s for w in outside.atoms(window, in_range) for i in w.args[0].atoms(sympy.Idx)
             for s in (i.upper + 1).free_symbols}
    used |= {i.upper + 1 for i in positions_compared(outside)}    # an arange of each
    # a fold of windows prints the sizes of the windows' dims and of the position they fold onto
    used |= {s for f in outside.atoms(fold_window) for i in f.atoms(sympy.Idx) for s in i.upper.free_symbols}
    return frozenset(used)


def sizes_used(op: OpSpec, exprs: list[LoweredExpr], shared: tuple[Leaf, ...] = ()) -> list[str]:
    """The declared indices whose sizes the code of `exprs` (and of shared values) mentions."""
    used = set().union(*(expr.plan.scale.free_symbols for expr in exprs))
    used |= {size_symbol(expr.indexed.row) for expr in exprs if expr.indexed is not None}
    roots = [term for expr in exprs for term in expr.terms] + list(shared)
    # a fused call reads the sizes its record prints (nll_loss_backward builds a one-hot without one)
    used |= {size for call, factor in fused_calls(exprs, shared) for size in kernel_of(call).sizes_read(call, factor)}
    for root in roots:
        for node in walk(root):
            if isinstance(node, Leaf):
                used |= _leaf_sizes(node.expr)
            elif isinstance(node, Scaled):
                used |= node.coefficient.free_symbols
            elif isinstance(node, Reduce):
                used |= set().union(*(size.free_symbols for size in node.sizes))
            elif isinstance(node, Convolution) and isinstance(node.source, in_range):
                used |= node.source.free_symbols | {s for i in node.source.atoms(sympy.Idx) for s in i.upper.free_symbols}
                used |= {s for i in node.kernel.indices if i.name in node.out for s in i.upper.free_symbols}
            elif isinstance(node, ConvolutionBackward) and node.forward.bias is not None:
                used |= {s for i in node.forward.kernel.indices if i.name in node.forward.out
                         for s in i.upper.free_symbols}
            elif isinstance(node, Convolution) and node.kind == "folded":
                used |= {s for i in node.source.atoms(sympy.Idx) for s in i.upper.free_symbols}
            elif isinstance(node, Convolution) and node.kind == "input":
                used |= {s for a in (node.source.args[0], node.kernel) for i in a.atoms(sympy.Idx)
                         if i.name in node.batch + node.out + tuple(t for t, _, _, _ in node.spatial)
                         for s in i.upper.free_symbols}
            elif isinstance(node, Convolution) and node.kind == "weight":
                used |= node.source.args[1].free_symbols | node.source.args[2].free_symbols
                used |= {s for a in (node.source.args[0], node.kernel) for i in a.atoms(sympy.Idx)
                         if i.name in node.out + node.batch + tuple(t for t, _, _, _ in node.spatial)
                         for s in i.upper.free_symbols}
            elif isinstance(node, Convolution):
                used |= node.source.args[1].free_symbols | node.source.args[2].free_symbols
                used |= {s for (_, _, stride, dilation), size in zip(node.spatial, node.sizes)
                         if stride != 1 or abs(dilation) != 1 for s in size.free_symbols}
    declared = [index for index, representative in sorted(dict(op.index_sizes).items()) if index == representative]
    # every size the code reads is bound from an input's shape: a renamed index (n_1) reads its original's
    unbound = sorted(s.name for s in used - {size_symbol(i) for i in declared}
                     if s == size_symbol(naming.index_of_size(s.name)))
    if unbound:
        raise ValueError(f"the code reads {', '.join(unbound)}, which no input's shape binds")
    return [index for index in declared if size_symbol(index) in used]


def _shape_of(name: str, indices: tuple[str, ...], index: str) -> str:
    """Source for the length of `index` in a tensor with dims `indices`."""
    named = len(indices) - 1 if BATCH in indices else len(indices)
    if index == BATCH:
        return f"{name}.shape[:-{named}].numel()" if named else f"{name}.numel()"
    position = indices.index(index)
    return f"{name}.shape[{position - len(indices) if BATCH in indices else position}]"


class IndexNotationPrinter(PositiveFirst, sympy.printing.str.StrPrinter):
    """Math in the spec's own index notation: Sum(f, (k, 0, size_k - 1)) prints as sum(f, k)."""

    def _print_Sum(self, expr):
        indices = ", ".join(self._print(limit[0]) for limit in expr.limits)
        return f"sum({self._print(expr.function)}, {indices})"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_max_tie(self, expr):
        first, second, tie = (self._print(a) for a in expr.args)
        shown_tie = "" if expr.args[2] == sympy.S.Half else f", tie={tie}"     # a nest of the default split
        return f"{expr.untied_function.__name__}({first}, {second}{shown_tie})"

    _print_min_tie = _print_max_tie

    def _print_amax(self, expr):
        indices = ", ".join(self._print(i) for i in expr.indices)
        return f"{'max' if expr.largest else 'min'}({self._print(expr.body)}, {indices})"

    _print_amin = _print_amax

    def _print_max_first(self, expr):
        return f"{self._print_amax(expr)[:-1]}, tie=\"first\")"

    _print_min_first = _print_max_first

    def _print_as_float(self, expr):
        return f"float({self._print(expr.args[0])})"


@functools.lru_cache(maxsize=4096)    # docstrings and the derivations document print the same math
def index_notation(expr: sympy.Expr) -> str:
    return IndexNotationPrinter().doprint(as_float_literals(expr))


def as_float_literals(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with each rational that generated code prints as a float (see `exact_fraction`) a Float, which
    the math notation prints as that same literal."""
    if not isinstance(expr, sympy.Basic):
        return expr
    floats = {r: sympy.Float(r, 30) for r in expr.atoms(sympy.Rational) if not exact_fraction(r)}
    return expr.xreplace(floats) if floats else expr
