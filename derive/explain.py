"""Explain a derivation: every step the pipeline took for an op, as a person would show it.

The explanation is a frozen record built from `build_op` -- the very Derivation, shape
plan and lowered trees that the code generator renders -- and then printed through the
Jinja2 templates: for a terminal (SymPy's pretty printer), as Markdown or LaTeX (SymPy's
LaTeX printer), and as the catalog's DERIVATIONS.md. Nothing here derives anything a
second time; it only reads the pipeline's records and prints them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import cache, cached_property

import jinja2
import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.pretty.pretty import PrettyPrinter
from sympy.printing.pretty.pretty_symbology import pretty_use_unicode
from sympy.printing.pretty.stringpict import prettyForm

from . import naming
from .emit import comment_safe, environment
from .derivation import KINK_VERDICTS, Kink, lower_kinks
from .lower import STYLES, LoweredExpr, LoweredOp, Reduce, Scaled
from .model import OpSpec, SpecError, index_symbol, scalar_symbol, size_symbol, tensor_symbol
from .naming import BATCH
from .pipeline import Built, build_op
from .plan import TermPlan
from .printing import Code, IndexNotationPrinter, align, print_leaf, render
from .signature import Signature
from .spec import index_text, load_catalog

BATCH_DIMS = sympy.Symbol(BATCH)   # stands for the batch dims in a symbolic shape: (..., size_k)
CODE_STYLES = ("broadcast", "contraction")   # the order the emitted lines are shown in: teaching form first
FORMATS = {"text": "explain.txt.jinja", "markdown": "explain.md.jinja", "latex": "explain.tex.jinja",
           "html": "explain.html.jinja"}
MATH_TEMPLATE = "explain.math.jinja"     # the formulas alone, for a notebook's LaTeX display
MATHJAX = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"   # typesets the html format's formulas
DERIVATIONS_TEMPLATE = "derivations.md.jinja"
SECTION_TEMPLATE = "derivation_section.md.jinja"


# --- the record ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Math:
    """One formula, printed for each kind of output when that output first reads it (`derive generate`'s
    DERIVATIONS.md reads only the LaTeX, a terminal only the drawing and the notation)."""

    expr: sympy.Expr

    @cached_property
    def pretty(self) -> str:
        """SymPy's 2-D unicode drawing, for a terminal."""
        return _pretty(self.expr)

    @cached_property
    def latex(self) -> str:
        """LaTeX, for Markdown ($$...$$) and LaTeX output."""
        return _LatexPrinter().doprint(self.expr)

    @cached_property
    def notation(self) -> str:
        """The spec's own one-line index notation, as in the generated docstrings."""
        return _notation(self.expr)


@dataclass(frozen=True)
class Shape:
    """The shape of a tensor: one size per dim, symbolic (size_n) or concrete (1000); 1 where unsqueezed."""

    dims: tuple[sympy.Expr, ...]

    @property
    def text(self) -> str:
        items = [str(d) for d in self.dims]
        if len(items) == 1 and self.dims[0] != BATCH_DIMS:
            return f"({items[0]},)"
        return f"({', '.join(items)})"

    @property
    def values(self) -> tuple[int, ...] | None:
        """The shape as integers, when every size is concrete."""
        if all(d.is_Integer for d in self.dims):
            return tuple(int(d) for d in self.dims)
        return None


@dataclass(frozen=True)
class IndexInfo:
    """One index of the op: the size it ranges over and the dims it names."""

    name: str                 # the index, e.g. n
    size: str                 # its size, symbolic (size_n) or concrete (1000)
    size_latex: str           # the same in LaTeX
    dims: tuple[str, ...]     # where it occurs, e.g. ("x dim 0", "y dim 0")


@dataclass(frozen=True)
class OperandRow:
    """One operand of a term, as the broadcast style lines it up."""

    notation: str             # the operand in index notation, e.g. grad_y[n, m]
    label: str                # short name for the diagram (the tensor's name, or t1, t2, ...)
    indices: tuple[str, ...]  # its own dims
    shape: Shape              # its own shape
    lined_up: tuple[str, ...] # the aligned dims the lined-up tensor spans (leading ones broadcasting adds)
    lined_up_shape: Shape     # its real shape after permute/unsqueeze: 1 where a dim was inserted
    code: str                 # the lined-up operand as the broadcast code writes it


@dataclass(frozen=True)
class TableRow:
    """One row of a shape table."""

    cells: tuple[str, ...]    # tensor or step, its shape, its shape lined up, code
    tensor: bool              # whether the row is a tensor (an operand or the result) rather than a step


@dataclass(frozen=True)
class TermExplanation:
    """One term of a gradient: the shape plan in the seed's unsqueeze, multiply, sum form."""

    aligned: tuple[str, ...]          # the aligned index order every operand is lined up in
    operands: tuple[OperandRow, ...]
    product: Shape | None             # shape of the broadcast product (None: a single operand)
    product_indices: tuple[str, ...]  # its dims
    product_code: str                 # the broadcast product as the code writes it
    summed: tuple[str, ...]           # indices summed away
    reduction: str                    # the reduction as the code calls it, e.g. sum(-1); "" for none
    reduced: Shape                    # shape after the reduction
    reduced_indices: tuple[str, ...]  # its dims
    scale: Math | None                # index-free coefficient the term is multiplied by
    to_target: str                    # what shapes the term like the input (".T", ".expand_as(x)"); "" for nothing
    result: Shape                     # the term's contribution: exactly the input's shape
    diagram: tuple[str, ...]          # ASCII picture of the operands along the aligned axes
    legend: tuple[str, ...]           # what the diagram's t1, t2 ... stand for
    target: str                       # the gradient it contributes to, e.g. grad_x[n, k]

    @property
    def header(self) -> tuple[str, ...]:
        return ("tensor", "shape", f"lined up in ({', '.join(self.aligned)})", "code")

    @property
    def table(self) -> tuple[TableRow, ...]:
        """The shape plan, a row per tensor or step: its shape, its shape lined up in the aligned order, code."""
        rows = [TableRow((o.notation, o.shape.text, o.lined_up_shape.text, o.code), True) for o in self.operands]
        if self.product is not None:
            rows.append(TableRow(("product", "", self.product.text, self.product_code), False))
        if self.reduction:
            rows.append(TableRow((f"sum over {', '.join(self.summed)}", "", self.reduced.text, self.reduction), False))
        if self.scale is not None:
            rows.append(TableRow(("scale", "", self.reduced.text, f"* {self.scale.notation}"), False))
        if self.to_target:
            rows.append(TableRow(("shape like the input", "", self.result.text, self.to_target), False))
        rows.append(TableRow((self.target, self.result.text, "", ""), True))
        return tuple(rows)

    @property
    def text_table(self) -> tuple[tuple[str, ...], ...]:
        return (self.header,) + tuple(row.cells for row in self.table)

    @property
    def has_steps(self) -> bool:
        """Whether anything happens to the operands (a product, a reduction, a scale or a reshape)."""
        return bool(self.product or self.reduction or self.scale or self.to_target)


@dataclass(frozen=True)
class CodeLine:
    """The emitted line of one gradient in one style, and the module's lines it needs, as they stand there."""

    style: str
    setup: tuple[tuple[str, str], ...]   # sizes and shared values computed before it: (name, code)
    line: str                            # e.g. grad_x = grad_y @ w.T
    reads: tuple[str, ...]               # tensors of the forward (inputs, output, saved values) it reads


# (style, names) per style, or a single (None, names) where every style has the same names
ByStyle = tuple[tuple[str | None, tuple[str, ...]], ...]


def by_style(pairs: list[tuple[str, tuple[str, ...]]]) -> ByStyle:
    if len({names for _, names in pairs}) == 1:
        return ((None, pairs[0][1]),)
    return tuple(pairs)


@dataclass(frozen=True)
class KinkExplanation:
    """One kink of a gradient: where it lies and what the gradient is on each side and on it."""

    where: Math                  # the kink, s = 0 written as two sides: x[i] = 0, a[i] = b[i]
    verdict: str                 # what derive concluded (derivation.KINK_VERDICTS)
    sides: tuple[tuple[str | None, str], ...]   # (region, grad_X there) in index notation: above, below, on
                                                 # the kink; one row (None: everywhere) where the kinks cancel


@dataclass(frozen=True)
class GradientExplanation:
    """Every step for one differentiable input."""

    input: str                   # the input X
    target: str                  # its gradient's name, grad_X
    access: str                  # grad_X[d...] as written in the formulas
    shape: Shape                 # X's shape, which grad_X must have
    partial: Math                # d y[o...] / d X[d'...] = ..., deltas included, as SymPy gives it
    vjp_raw: Math                # grad_X[d'...] = sum over o of grad_y[o...] * partial
    vjp: Math                    # grad_X[d...] after delta elimination
    kinked: Math | None          # the same with the kink convention made explicit (None: no kink)
    kinks: tuple[KinkExplanation, ...]   # each kink of this gradient and its value there
    terms: tuple[TermExplanation, ...]
    code: tuple[CodeLine, ...]   # one per style
    saved: ByStyle               # tensors of the forward the gradient reads, per style


@dataclass(frozen=True)
class Explanation:
    """One op, from its equation to the emitted code."""

    op: str
    doc: str
    equation: str                          # as written in the spec
    forward: Math                          # the parsed equation, y[o...] = rhs
    output: str
    grad_output: str                       # grad_y, the upstream gradient
    indices: tuple[IndexInfo, ...]
    kinked: bool                           # whether some gradient has a kink (a step, a sign, a where())
    gradients: tuple[GradientExplanation, ...]
    saved: ByStyle                         # what the autograd.Function saves for the backward, per style
    sizes: tuple[tuple[str, str], ...]     # the concrete sizes given (size name, value such as 1000 or 4x3)
    values: tuple[tuple[str, Math], ...] = ()   # values the forward computes for the backward (contraction style)
    shaped: ByStyle = ()                   # inputs the Function keeps only the shape of, per style

    def __str__(self) -> str:
        return render_explanation(self, "text")

    def __repr__(self) -> str:     # a terminal or a REPL shows the text
        return str(self)

    def _repr_markdown_(self) -> str:     # Jupyter: the Markdown document, formulas typeset
        return render_explanation(self, "markdown")

    def _repr_latex_(self) -> str:        # Jupyter, where LaTeX is preferred: the formulas alone
        return _environment().get_template(MATH_TEMPLATE).render(x=self)

    @property
    def index_table(self) -> tuple[tuple[str, ...], ...]:
        """Rows of (index, size, dims it names); header first."""
        return (("index", "size", "dims"),) + tuple((i.name, i.size, ", ".join(i.dims)) for i in self.indices)


# --- building it -----------------------------------------------------------------------------

def parse_shapes(text: str | None, op: OpSpec) -> dict[str, tuple[int, ...]]:
    """`n=1000,k=784` -> {"n": (1000,), "k": (784,)}, checked against the op's indices.

    Batch dims take any number of sizes joined by x: `...=4x3` (or `...=` for none)."""
    if not text:
        return {}
    sizes: dict[str, tuple[int, ...]] = {}
    by_size: dict[str, tuple[int, ...]] = {}
    known = dict(op.index_sizes)
    example = ",".join(f"{i}={n}" for i, n in zip(op.index_order, (1000, 784, 50, 10, 20, 30)))
    for item in text.split(","):
        name, equals, value = (part.strip() for part in item.partition("="))
        pattern = r"([0-9]+(x[0-9]+)*)?" if name == BATCH else r"[0-9]+"
        if not equals or not name or not re.fullmatch(pattern, value) or \
                any(int(v) < 1 for v in value.split("x") if v):
            raise SpecError(f"bad --shapes item {item.strip()!r}: expected index=size with a positive integer "
                            f"size, such as {example}", path=op.source, op=op.name)
        if name not in known:
            raise SpecError(f"--shapes names '{name}', which is not an index of {op.name} "
                            f"(indices: {', '.join(op.index_order)})", path=op.source, op=op.name)
        dims = tuple(int(v) for v in value.split("x") if v)
        size = naming.size(known[name])
        if by_size.setdefault(size, dims) != dims:
            raise SpecError(f"--shapes gives {size} two values, {'x'.join(map(str, by_size[size]))} and {value}",
                            path=op.source, op=op.name)
        sizes[name] = dims
    return sizes


def explain_op(op: OpSpec, inputs: tuple[str, ...] | None = None,
               sizes: dict[str, tuple[int, ...]] | None = None) -> Explanation:
    return explain(build_op(op), inputs, sizes)


def explain(built: Built, inputs: tuple[str, ...] | None = None,
            sizes: dict[str, tuple[int, ...]] | None = None) -> Explanation:
    """The explanation of one built op, for `inputs` (default: every differentiable one).

    `sizes` maps indices to concrete sizes, as `parse_shapes` returns them; sizes left out stay symbolic."""
    op = built.op
    differentiable = [g.input for g in built.derivation.gradients]
    for name in inputs or ():
        if name not in differentiable:
            raise SpecError(f"'{name}' is not a differentiable input of {op.name} "
                            f"(differentiable: {', '.join(differentiable)})", path=op.source, op=op.name)
    missing = [s for s in STYLES if s not in built.lowered]
    if missing:
        raise ValueError(f"explain needs every style lowered; missing {missing}")
    known = _Sizes(op, sizes or {})
    out_indices = [index_symbol(o, op.size_of(o)) for o in op.output_indices]
    output_access = tensor_symbol(op.output)[tuple(out_indices)] if out_indices else scalar_symbol(op.output)
    gradients = tuple(_explain_gradient(built, g, output_access, known)
                      for g in built.derivation.gradients if not inputs or g.input in inputs)
    kinked = any(g.kinks for g in built.derivation.gradients)
    return Explanation(
        op=op.name, doc=op.doc, equation=op.equation,
        forward=Math(sympy.Eq(output_access, op.rhs, evaluate=False)),
        output=op.output, grad_output=built.derivation.grad_output,
        indices=_indices(op, known),
        kinked=kinked,
        gradients=gradients,
        saved=by_style([(style, built.signatures[style].saved) for style in CODE_STYLES]),
        sizes=known.listed,
        values=tuple((v.name, Math(v.expr)) for v in built.lowered["contraction"].plan.saved),
        shaped=by_style([(style, built.signatures[style].shaped) for style in CODE_STYLES]),
    )


class _Sizes:
    """The size of each index, symbolic (size_n; `...` for the batch dims) or as given with --shapes."""

    def __init__(self, op: OpSpec, given: dict[str, tuple[int, ...]], renamed: dict[str, sympy.Expr] | None = None):
        self.op = op
        self.renamed = renamed or {}      # sizes of indices the derivation introduced (k_1), from a TermPlan
        self.concrete = {size_symbol(op.size_of(i)): tuple(sympy.Integer(v) for v in dims) for i, dims in given.items()}
        self.given = given
        order = list(op.index_order)
        self.listed = tuple((naming.size(op.size_of(i)), "x".join(map(str, dims)) if dims else "()")
                            for i, dims in sorted(given.items(), key=lambda item: order.index(item[0])
                                                  if item[0] in order else len(order)))   # for display

    def with_renamed(self, sizes: dict[str, sympy.Expr]) -> "_Sizes":
        return _Sizes(self.op, self.given, sizes)

    def dims(self, index: str) -> tuple[sympy.Expr, ...]:
        """The dims an index stands for: one, or for `...` as many as there are batch dims."""
        known = dict(self.op.index_sizes)
        size = size_symbol(known[index]) if index in known else self.renamed[index]
        if size in self.concrete:
            return self.concrete[size]
        return (BATCH_DIMS,) if size == size_symbol(BATCH) else (size.xreplace(
            {s: d[0] for s, d in self.concrete.items() if len(d) == 1}),)

    def text(self, index: str) -> str:
        dims = self.dims(index)
        return "x".join(str(d) for d in dims) if dims else "()"

    def latex(self, index: str) -> str:
        dims = self.dims(index)
        return r" \times ".join(_LatexPrinter().doprint(d) for d in dims) if dims else "()"

    def shape(self, indices, present=None) -> Shape:
        """The shape over `indices`, with 1 for those not in `present` (an inserted dim)."""
        dims = []
        for index in indices:
            dims += self.dims(index) if present is None or index in present else (sympy.Integer(1),)
        return Shape(tuple(dims))


def _indices(op: OpSpec, known: _Sizes) -> tuple[IndexInfo, ...]:
    places: dict[str, list[str]] = {i: [] for i, _ in op.index_sizes}
    for name, indices in [(t.name, t.indices) for t in op.inputs] + [(op.output, op.output_indices)]:
        for dim, index in enumerate(indices):
            if index == BATCH:
                places[index].append(f"{name} leading dims")
            else:
                places[index].append(f"{name} dim {dim - len(indices) if BATCH in indices else dim}")
    # range inference: the sizes no input's shape gives
    for index, size in op.fixed_sizes:
        places[index].append(f"its size set by sizes = {{ {index} = {size} }}")
    for index, size in op.inferred_sizes:
        reads = [index_text(r.access) for r in op.affine_reads if index in {i.name for i in r.access.atoms(sympy.Idx)}]
        places[index].append(f"its size inferred from {' and '.join(reads)}: the largest for which every read "
                             f"stays in range, {IndexNotationPrinter().doprint(size)}")
    order = list(op.index_order) + sorted(set(places) - set(op.index_order))
    return tuple(IndexInfo(index, known.text(index), known.latex(index), tuple(places[index]) or ("summed only",))
                 for index in order)


def _explain_gradient(built: Built, g, output_access, known: _Sizes) -> GradientExplanation:
    op = built.op
    target = naming.grad(g.input)
    grad_symbol = tensor_symbol(target)
    primed = tuple(g.wrt.indices) if isinstance(g.wrt, sympy.Indexed) else ()
    own = tuple(index_symbol(d, op.size_of(d)) for d in g.indices)
    raw_lhs = grad_symbol[primed] if primed else scalar_symbol(target)
    lhs = grad_symbol[own] if own else scalar_symbol(target)
    lowered_vjp = sympy.Add(*[t.to_expr() for t in g.terms])
    broadcast = _lowered_gradient(built.lowered["broadcast"], g.input)
    code = tuple(_code_line(built.signatures[style], g.input) for style in CODE_STYLES)
    return GradientExplanation(
        input=g.input, target=target, access=_notation(lhs), shape=known.shape(g.indices),
        partial=Math(sympy.Eq(sympy.Derivative(output_access, g.wrt), g.partial, evaluate=False)),
        vjp_raw=Math(sympy.Eq(raw_lhs, g.vjp_raw, evaluate=False)),
        vjp=Math(sympy.Eq(lhs, g.vjp, evaluate=False)),
        kinked=Math(sympy.Eq(lhs, lowered_vjp, evaluate=False)) if g.vjp.has(sympy.Heaviside) else None,
        kinks=tuple(_explain_kink(kink, lhs) for kink in g.kinks),
        terms=tuple(_explain_term(op, term, node, broadcast.plan, known)
                    for term, node in zip(broadcast.plan.terms, broadcast.terms)),
        code=code,
        saved=by_style([(c.style, c.reads) for c in code]),
    )


def _explain_kink(kink: Kink, lhs: sympy.Expr) -> KinkExplanation:
    left, right = kink.equation.args
    regions = [(sympy.Gt(left, right), kink.above), (sympy.Lt(left, right), kink.below), (kink.equation, kink.at)]
    if kink.verdict == "smooth":
        regions = [(None, kink.above)]
    return KinkExplanation(
        where=Math(kink.equation), verdict=KINK_VERDICTS[kink.verdict],
        sides=tuple((region if region is None else _notation(region),
                     _notation(sympy.Eq(lhs, value, evaluate=False)))
                    for region, value in regions))


def _lowered_gradient(lowered: LoweredOp, name: str) -> LoweredExpr:
    return next(expr for expr in lowered.gradients if expr.plan.like == name)


def _explain_term(op: OpSpec, term: TermPlan, node, plan, known: _Sizes) -> TermExplanation:
    """The broadcast style's reasoning for one term: line up, multiply, reduce, scale, shape like the input.

    The operands and index orders come from the TermPlan; the reduction and the scale are read off the
    lowered broadcast tree (Scaled over Reduce over the product) and printed by derive.printing."""
    target, like = plan.indices, plan.like
    known = known.with_renamed(dict(term.sizes))
    product_indices = tuple(i for i in term.aligned if any(i in o.indices for o in term.operands))
    rows, codes = [], []
    for position, operand in enumerate(term.operands):
        code = align(print_leaf(operand.expr, operand.indices), product_indices)
        codes.append(code.operand("*", "right" if position else "left"))
        rows.append(OperandRow(
            notation=_notation(operand.expr), label=_label(operand.expr, position),
            indices=operand.indices, shape=known.shape(operand.indices),
            lined_up=code.indices, lined_up_shape=known.shape(code.indices, operand.indices), code=code.text))
    scale = plan.scale    # the factor every term of the gradient shares, applied once to their sum
    if isinstance(node, Scaled):
        scale, node = scale * node.coefficient, node.source
    reduction = ""
    if isinstance(node, Reduce):
        full, source = render(node).text, render(node.source).atom()
        reduction = full[len(source):].lstrip(".") if full.startswith(source) else full
    reduced_indices = tuple(i for i in product_indices if i not in term.summed)
    to_target = align(Code("r", reduced_indices), target).text[1:]
    if set(reduced_indices) != set(target):
        to_target += f".expand_as({like})"
    if getattr(plan, "unbroadcast", False):
        to_target += f".sum_to_size({like}.shape)"
    grad = naming.grad(like)
    return TermExplanation(
        aligned=term.aligned, operands=tuple(rows),
        product=known.shape(product_indices) if len(rows) > 1 else None, product_indices=product_indices,
        product_code=" * ".join(codes),
        summed=term.summed, reduction=reduction,
        reduced=known.shape(reduced_indices), reduced_indices=reduced_indices,
        scale=None if scale == 1 else Math(scale),
        to_target=to_target, result=known.shape(target),
        diagram=_diagram(term.aligned, rows, product_indices, reduction, term.summed, reduced_indices, grad, known),
        legend=tuple(f"{r.label} = {r.notation}" for r in rows if r.label != _name_of(r.notation)),
        target=_notation(tensor_symbol(grad)[tuple(index_symbol(i, op.size_of(i)) for i in target)])
        if target else grad,
    )


def _label(expr: sympy.Expr, position: int) -> str:
    if isinstance(expr, sympy.Indexed):
        return expr.base.label.name
    if isinstance(expr, sympy.Symbol):
        return expr.name
    return f"t{position + 1}"


def _name_of(notation: str) -> str:
    return notation.split("[", 1)[0]


def _diagram(aligned, rows, product_indices, reduction, summed, reduced_indices, target, known) -> tuple[str, ...]:
    """Each tensor of a term drawn along the aligned axes: [size] where it has the dim, [1] where an
    unsqueeze inserted it, (1) where broadcasting adds a leading 1 by itself, --sum-- where a dim goes."""
    texts = {i: known.text(i) for i in aligned}
    width = max(len(t) for t in [*texts.values(), *aligned, "sum"]) + 4

    def cell(what: str | None) -> str:
        if what is None:
            return " " * width
        if what == "sum":
            return " " + "sum".center(width - 2, "-") + " "
        if what == "(1)":
            return what.center(width)
        return "[" + what.center(width - 2) + "]"

    def line(label: str, kind) -> str:
        return (label.ljust(left) + "".join(cell(kind(a)) for a in aligned)).rstrip()

    left = max(len(n) for n in [r.label for r in rows] + ["product", reduction, target]) + 2
    lines = [(" " * left + "".join(a.center(width) for a in aligned)).rstrip()]
    for row in rows:
        lines.append(line(row.label, lambda a, r=row: texts[a] if a in r.indices else "1" if a in r.lined_up
                          else "(1)" if a in product_indices else None))
    if len(rows) > 1:
        lines.append(line("product", lambda a: texts[a] if a in product_indices else None))
    if summed:
        lines.append(line(reduction, lambda a: "sum" if a in summed else texts[a] if a in reduced_indices else None))
    lines.append(line(target, lambda a: texts[a] if a in reduced_indices else None))
    return tuple(lines)


def _code_line(signature: Signature, name: str) -> CodeLine:
    """A gradient's line as the module of one style writes it, with the sizes and shared values it uses."""
    line = next(g for g in signature.gradients if g.input == name)
    return CodeLine(signature.style, line.sizes + line.shared, line.line, line.reads)


# --- printing math ---------------------------------------------------------------------------

class _NotationPrinter(IndexNotationPrinter):
    """The spec's notation, with the spec's where() for a Piecewise."""

    def _print_Equality(self, expr):
        return f"{self._print(expr.lhs)} = {self._print(expr.rhs)}"

    def _print_Heaviside(self, expr):
        """The unit step as the code computes it: where(a < b, 0, where(a = b, h, 1))."""
        return self._print(lower_kinks(expr))

    def _print_Piecewise(self, expr):
        *pieces, (otherwise, condition) = expr.args
        text = self._print(otherwise) if condition == sympy.true else f"where({self._print(condition)}, " \
            f"{self._print(otherwise)}, nan)"
        for value, condition in reversed(pieces):
            text = f"where({self._print(condition)}, {self._print(value)}, {text})"
        return text


def _notation(expr: sympy.Expr) -> str:
    return _NotationPrinter().doprint(expr)


class _PrettyPrinter(PrettyPrinter):
    """SymPy's 2-D printer with names as the code writes them and sums labelled by their index only."""

    def __init__(self):
        super().__init__({"use_unicode": True, "wrap_line": False})

    def _print_Symbol(self, e, bold_name=False):
        return prettyForm(e.name)

    def _print_max_tie(self, expr):
        first, second, tie = expr.args
        shown_tie = () if tie == sympy.S.Half else (sympy.Symbol(f"tie={tie}"),)    # a nest of the default split
        shown = sympy.Function(expr.untied_function.__name__)(first, second, *shown_tie)
        return self._print_Function(shown)

    _print_min_tie = _print_max_tie

    def _print_amax(self, expr):
        """max(x[n, c], c) as the spec writes it (with tie="first" for that convention)."""
        tie = (sympy.Symbol('tie="first"'),) if expr.first else ()
        return self._print_Function(sympy.Function("max" if expr.largest else "min")(*expr.args, *tie))

    _print_amin = _print_max_first = _print_min_first = _print_amax

    def _print_Derivative(self, deriv):
        (variable, _), = deriv.variable_count
        top = prettyForm(*self._print(deriv.expr).left("∂"))
        return top / prettyForm(*self._print(variable).left("∂"))

    # SymPy draws `k = 0` under a sum and `size_k - 1` over it; the index table gives the range.
    def _PrettyPrinter__print_SumProduct_Limits(self, limit):
        return self._print(limit[0]), prettyForm("")


def _pretty(expr: sympy.Expr) -> str:
    # SymPy draws its big symbols (sum signs, brackets) from a module-wide flag that it sets from the
    # terminal's encoding; the drawing is always unicode, whatever sys.stdout is.
    previous = pretty_use_unicode(True)
    try:
        drawing = _PrettyPrinter().doprint(expr)
    finally:
        pretty_use_unicode(previous)
    lines = [line.rstrip() for line in drawing.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _latex_name(name: str) -> str:
    """grad_y -> \\mathrm{grad}_{y}, size_n -> \\mathrm{size}_{n}, pred -> \\mathit{pred}, k' -> k'."""
    primes = len(name) - len(name.rstrip("'"))
    name = name.rstrip("'")
    if name == BATCH:
        return r"\ldots" + "'" * primes
    head, _, tail = name.partition("_")

    def word(text, upright):
        if len(text) <= 1:
            return text
        return rf"\mathrm{{{text}}}" if upright else rf"\mathit{{{text}}}"

    text = word(head, head in ("grad", "size", naming.SHARED_PREFIX.rstrip("_")))
    if tail:
        text += "_{" + word(tail.replace("_", r"\_"), False) + "}"
    return text + "'" * primes


class _LatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer in the spec's notation: x[n, k], sums over named indices."""

    def __init__(self):
        super().__init__({"mul_symbol": "dot"})

    def _print_Symbol(self, expr, style="plain"):
        return _latex_name(expr.name)

    def _print_Infinity(self, expr, style="plain"):
        return r"\infty"

    def _hprint_Function(self, func: str) -> str:
        """A function SymPy has no LaTeX name for, e.g. one_hot, upright and whole."""
        return func if len(func) == 1 else r"\operatorname{" + func.replace("_", r"\_") + "}"

    def _print_max_tie(self, expr, exp=None):
        """`exp`: LaTeXPrinter asks a function raised to a power to print the power itself."""
        first, second, tie = (self._print(a) for a in expr.args)
        name = expr.untied_function.__name__.lower()
        shown_tie = "" if expr.args[2] == sympy.S.Half else rf"; \mathrm{{tie}} = {tie}"
        call = rf"\{name}\left({first}, {second}{shown_tie}\right)"
        return call if exp is None else rf"{call}^{{{exp}}}"

    _print_min_tie = _print_max_tie

    def _print_amax(self, expr, exp=None):
        """\\max_{c} x[n, c]; with tie="first", the first maximal position takes the gradient."""
        indices = ", ".join(self._print(i) for i in expr.indices)
        name = "max" if expr.largest else "min"
        tie = r"; \mathrm{tie} = \mathrm{first}" if expr.first else ""
        call = rf"\{name}_{{{indices}}}\left({self._print(expr.body)}{tie}\right)"
        return call if exp is None else rf"{call}^{{{exp}}}"

    _print_amin = _print_max_first = _print_min_first = _print_amax

    def _print_reaches(self, expr, exp=None):
        """The Iverson bracket [a = m]: 1 where a reaches the max m."""
        call = rf"\left[{self._print(expr.args[0])} = {self._print(expr.args[1])}\right]"
        return call if exp is None else rf"{call}^{{{exp}}}"

    def _print_KroneckerDelta(self, expr, exp=None):
        return rf"\delta_{{{self._print(expr.args[0])} {self._print(expr.args[1])}}}"

    def _print_Idx(self, expr):
        return _latex_name(expr.label.name)

    def _print_IndexedBase(self, expr):
        return _latex_name(expr.label.name)

    def _print_Indexed(self, expr):
        return f"{_latex_name(expr.base.label.name)}[{', '.join(self._print(i) for i in expr.indices)}]"

    def _print_Sum(self, expr):
        indices = ", ".join(self._print(limit[0]) for limit in expr.limits)
        body = self._print(expr.function)
        if isinstance(expr.function, sympy.Add):
            body = rf"\left({body}\right)"
        return rf"\sum_{{{indices}}} {body}"

    def _print_Derivative(self, expr):
        (variable, _), = expr.variable_count
        return rf"\frac{{\partial {self._print(expr.expr)}}}{{\partial {self._print(variable)}}}"


# --- rendering -------------------------------------------------------------------------------

def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|")


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "^": r"\^{}", "#": r"\#",
                "$": r"\$", "%": r"\%", "&": r"\&", "~": r"\~{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex(text: str) -> str:
    """Plain text (code, names) made safe for LaTeX."""
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _columns(rows: list[tuple[str, ...]], gap: int = 3) -> list[str]:
    """Rows of cells as lines of left-aligned columns."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [(" " * gap).join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@cache
def _environment() -> jinja2.Environment:
    env = environment().overlay()
    env.filters = dict(env.filters, md=_markdown_cell, tex=_tex, columns=_columns)
    return env


def render_explanation(explanation: Explanation, format: str = "text") -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {tuple(FORMATS)}")
    return _environment().get_template(FORMATS[format]).render(x=explanation, mathjax=MATHJAX)


@dataclass(frozen=True)
class Section:
    """One op's section of DERIVATIONS.md, rendered (text alone: the sections of a catalog may be rendered
    in other processes, build.py)."""

    op: str
    equation: str
    text: str


def derivation_section(explanation: Explanation) -> Section:
    """An op's section of the catalog's DERIVATIONS.md, with symbolic sizes."""
    text = _environment().get_template(SECTION_TEMPLATE).render(x=explanation,
                                                                module=naming.module_file(explanation.op))
    return Section(explanation.op, explanation.equation, text)


def render_derivations(sections: list[Section], source: str, command: str) -> str:
    """The catalog's DERIVATIONS.md: every op's section, in catalog order."""
    return _environment().get_template(DERIVATIONS_TEMPLATE).render(
        explanations=sections, source=_html_comment_safe(source), command=_html_comment_safe(command))


def _html_comment_safe(text: str) -> str:
    """Text made safe inside the document's first-line HTML comment."""
    return comment_safe(text).replace("--", "- -")


# --- command line ----------------------------------------------------------------------------

def add_arguments(command) -> None:
    """The `derive explain` subcommand's arguments and handler, on its parser (the CLI names it and its help)."""
    command.add_argument("op", help="the op to explain")
    command.add_argument("--spec", metavar="FILE", help="TOML catalog (default: the built-in one)")
    command.add_argument("--input", metavar="NAME", action="append",
                         help="explain only this input's gradient (repeatable; default: every differentiable input)")
    command.add_argument("--format", choices=tuple(FORMATS), default="text",
                         help="text for a terminal (default), markdown, latex, or html (a page for a browser, "
                                  "formulas typeset by MathJax)")
    command.add_argument("--shapes", metavar="SIZES",
                         help="concrete sizes for the shape plan, e.g. n=1000,k=784,m=50 (batch dims: ...=4x3)")
    command.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    command.set_defaults(handler=_command, debug=False)


def _command(args) -> int:
    op = load_catalog(args.spec).op(args.op)
    explanation = explain_op(op, tuple(args.input) if args.input else None, parse_shapes(args.shapes, op))
    sys.stdout.write(render_explanation(explanation, args.format))
    return 0
