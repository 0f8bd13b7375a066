"""Stage 4, shape plan -> tensor ops: each term becomes a small tree of PyTorch operations.

Two styles:

* ``broadcast`` is the seed's teaching form: line every operand up in the aligned
  order with ``unsqueeze``, multiply, and ``sum`` the contracted dims away.
* ``contraction`` (the default) never builds the full broadcast product. Operands
  whose dims nest are multiplied elementwise, dims only one operand has are summed
  first, and a product of two tensors summed over a shared dim becomes ``@`` (batched
  where both carry the same leading dims) or, when it is no matrix product,
  ``torch.einsum``; three or more operands go to ``torch.einsum`` as one contraction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Union

import sympy

from . import naming
from .derivation import depends_on_tensor, expand_terms, tensor_symbols
from .functions import atoms_of, fold_window, in_range, one_hot, renamed_match, window
from .kernels import Fused, one_hot_by_rows
from .naming import BATCH, STYLES
from .plan import ExprPlan, OpPlan, TermPlan, as_windows, contraction_plan, free_indices, ordered
from .model import exact_fraction, is_python_number, size_symbol, tensor_symbol


@dataclass(frozen=True)
class Leaf:
    """An elementwise SymPy expression, evaluated with dims `indices`."""

    expr: sympy.Expr
    indices: tuple[str, ...]
    # values it reads that are written where it reads them: a contraction read once (name, its lowered term),
    # so that it is freed as soon as the leaf is computed
    inline: tuple[tuple[str, "Node"], ...] = ()


@dataclass(frozen=True)
class Product:
    """Broadcast product of `factors`, each lined up in `indices` first."""

    factors: tuple["Node", ...]
    indices: tuple[str, ...]


@dataclass(frozen=True)
class Reduce:
    """`source` summed (or averaged) over `summed`."""

    source: "Node"
    summed: tuple[str, ...]
    mean: bool
    sizes: tuple[sympy.Expr, ...] = ()   # size of each dim it keeps, when it sums the batch dims (sum_to_size)
    # a sum over `...` of a source that may span fewer batch positions than the inputs' broadcast batch
    # shape: those inputs (name, dims); the source is expanded to their shape before it is summed
    expand_batch: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def indices(self) -> tuple[str, ...]:
        return tuple(i for i in self.source.indices if i not in self.summed)


@dataclass(frozen=True)
class MatMul:
    """`left @ right` after arranging them as (batch..., free?, contracted) and (batch..., contracted, free?)."""

    left: "Node"
    right: "Node"
    left_layout: tuple[str, ...]
    right_layout: tuple[str, ...]
    indices: tuple[str, ...]


@dataclass(frozen=True)
class Einsum:
    """`torch.einsum` of `operands` (each in its own dims) into `indices`."""

    operands: tuple["Node", ...]
    indices: tuple[str, ...]


@dataclass(frozen=True)
class Scatter:
    """The gradient of a gather: `source` (lined up as the gather's result, or some of its dims: it is expanded)
    added into a zero tensor shaped like `like` at the positions `index` names along the dim `position`
    (`index_add` or `scatter_add`, by printing.gather_layout's rule)."""

    source: "Node"
    index: str                     # integer input holding the positions, with dims `rows`
    rows: tuple[str, ...]
    like: str                      # input whose shape (and dtype, device) the result has
    indices: tuple[str, ...]       # the result's dims: like's
    position: str = ""             # the dim of `indices` the index selects along (default: the first)


@dataclass(frozen=True)
class Scaled:
    """An index-free coefficient times `source`."""

    coefficient: sympy.Expr
    source: "Node"

    @property
    def indices(self) -> tuple[str, ...]:
        return self.source.indices


@dataclass(frozen=True)
class Convolution:
    """`torch.nn.functional.conv{1,2,3}d` of the padded input a window reads by the kernel another operand
    reads: sum over channel c and kernel indices k of x[n, c, s*t + d*k + e] * w[o, c, k], for whichever
    tensors stand in those roles (the forward's x and w, grad_w's x and grad_y, grad_x's grad_y and w,
    flipped where d < 0). At most one batch, channel and out-channel index each."""

    source: sympy.Expr                  # the window the convolution slides over: its padded input
    kernel: sympy.Indexed               # the kernel's read, by index names
    batch: tuple[str, ...]              # the source's dim that is the result's (conv's N), or none
    channels: tuple[str, ...]           # the dim both read and the term sums (conv's C), or none
    out: tuple[str, ...]                # the kernel's dim that is the result's (conv's out-channels), or none
    spatial: tuple[tuple[str, str, int, int], ...]  # (t, k, s, d) of each affine subscript s*t + d*k + e
    sizes: tuple[sympy.Expr, ...]       # the size of each t, to cut the result to where a stride may leave more
    # how it is computed, when the kernel read is the upstream gradient (its taps would run over the
    # output's length): "transposed", x[..., t - s*k + e], is conv_transpose of the gradient by x;
    # "weight", x[..., d*t + s*k + e], is torch.nn.grad.conv_weight (a convolution's grad_w) of x and it;
    # "input", g[..., t - d*k + e] by an input's kernel, is torch.nn.grad.conv_input (grad_x, padding e);
    # "folded", g[..., t] * w[..., k] folded back at l = s*t + d*k + e (source: the fold_window, spatial
    # (l, k, s, d)), is torch.nn.grad.conv1d_input with stride s and dilation d
    kind: str = "conv"
    scale: sympy.Expr = sympy.S.One     # a pooling's 1 / size_k, taken into its kernel of ones
    known: tuple[tuple[sympy.Symbol, sympy.Expr], ...] = ()    # the term's fixed and inferred sizes (TermPlan.known)
    bias: sympy.Indexed | None = None   # a term b[o] added along the out-channel, taken into the call (kind "conv")

    @property
    def indices(self) -> tuple[str, ...]:
        spatial = tuple(t for t, _, _, _ in self.spatial)
        return self.batch + self.out + spatial if self.kind in ("conv", "input", "folded") else self.out + self.batch + spatial


@dataclass(frozen=True)
class ConvolutionBackward:
    """torch.ops.aten.convolution_backward: the gradients of one convolution of the forward, of its input, its
    kernel and its bias, from one native call as autograd's, whose output mask asks for those needed. What the
    backward computes for a forward term that is a Convolution (kind "conv") of one input's window by another
    input, with zero padding torch's conv takes (the same on both sides), plus the bias that convolution took
    in; each of those inputs read nowhere else in the forward (see _joint_convolution)."""

    forward: Convolution                # the forward's term, its bias included
    gradient: tuple[str, tuple[str, ...]]   # the upstream gradient and its dims (the output's)
    padding: tuple[int, ...]            # the zeros each spatial dim's reads reach on both sides
    # the position among the op's inputs of the tensor each output (input, kernel, bias) is the gradient of,
    # or None where it is not wanted (no bias; an input without a gradient): the output mask's flags
    wanted: tuple[int | None, int | None, int | None]
    dims: tuple[tuple[str, ...], ...]   # each output's dims, by its tensor's declared names (_picked_dims)
    indices: tuple[str, ...] = ()       # a tuple of tensors, no dims


@dataclass(frozen=True)
class Picked:
    """Output `part` of a shared tuple value `name` (a ConvolutionBackward), with dims `indices`, its dims
    `squeezed` dropped (those the call was given as dims of 1)."""

    name: str
    part: int
    indices: tuple[str, ...]
    squeezed: tuple[int, ...] = ()


Node = Union[Leaf, Product, Reduce, MatMul, Einsum, Scatter, Scaled, Convolution, ConvolutionBackward, Picked]


@dataclass(frozen=True)
class IndexedAdd:
    """`coefficient * one_hot(index[row], c)`, added in place at one class per row of the rest of the
    gradient (`index_put_` with accumulate), instead of building the one-hot tensor: an int64 tensor as
    large as the gradient, and a full-size subtraction."""

    coefficient: sympy.Expr    # index-free, the gradient's scale included: a 0-d tensor such as -grad_loss / size_n
    index: str                 # the integer input holding one class per row
    row: str                   # its one dim


@dataclass(frozen=True)
class LoweredExpr:
    """One ExprPlan in one style: a node per term, summed, scaled, plus `indexed` when one term is a
    one-hot added in place; then shaped like the target."""

    plan: ExprPlan
    terms: tuple[Node, ...]
    indexed: IndexedAdd | None = None


@dataclass(frozen=True)
class Shared:
    """A subexpression the backward computes once and reuses (found by `sympy.cse`)."""

    name: str                  # variable holding it
    value: Node                # what it computes, in terms of inputs and earlier shared values (a Leaf, or
                               # the lowered term of a contraction bound by _bind_contractions)
    users: tuple[int, ...]     # positions (in the op's inputs) of the gradients that need it


@dataclass(frozen=True)
class LoweredOp:
    plan: OpPlan
    style: str
    forward: LoweredExpr
    gradients: tuple[LoweredExpr, ...]
    shared: tuple[Shared, ...]         # computed before the gradients that use them, in dependency order
    forward_shared: tuple[Shared, ...] = ()   # the same for the forward (users left empty)
    tangents: tuple[LoweredExpr, ...] = ()    # forward mode: each differentiable input's share of tangent_y
    tangent_shared: tuple[Shared, ...] = ()   # the same for the tangents (users: positions of the inputs)
    saved: tuple[Node, ...] = ()       # each value the forward saves (plan.saved), its contractions lowered
    # the gradients where a graph is recorded (a double backward), when these call a kernel without a derivative
    fallback: "LoweredOp | None" = None


def lower(op_plan: OpPlan, style: str = "contraction") -> LoweredOp:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    term = _broadcast_term if style == "broadcast" else _contraction_term

    def lower_expr(expr_plan: ExprPlan) -> LoweredExpr:
        terms = [term(t, expr_plan.indices, expr_plan.like) for t in expr_plan.terms]
        if style == "broadcast":
            return LoweredExpr(expr_plan, tuple(terms))
        expr_plan, terms = _with_bias(expr_plan, terms)
        return _indexed_add(expr_plan, _merge_elementwise(terms))

    def lower_group(plans: tuple[ExprPlan, ...], owners: list[str] | None = None, multiples: bool = False):
        """Lower some expressions with the contractions inside their functions bound to named values
        first, then (`multiples`) a gradient that is a multiple of another computed from it, then the
        subexpressions they repeat shared."""
        exprs, contracted = _bind_contractions(op_plan, [lower_expr(p) for p in plans], term)
        if multiples:
            exprs = _from_multiples(exprs)
        exprs, shared, contracted = _share_common(op_plan, exprs, owners, contracted)
        return _inline_once(*_numbered(exprs, _in_use_order(op_plan, contracted + list(shared), exprs, owners)))

    (forward,), forward_shared = lower_group((op_plan.forward,))
    joint = _joint_convolution(op_plan, forward) if style == "contraction" else None
    if joint is None:
        gradients, shared = lower_group(op_plan.gradients, multiples=style == "contraction")
    else:    # the convolution's gradients from one call, the other inputs' as any
        parts = {op_plan.op.inputs[position].name: part for part, position in enumerate(joint.wanted)
                 if position is not None}
        rest, shared = lower_group(tuple(g for g in op_plan.gradients if g.like not in parts), multiples=True)
        rest = iter(rest)
        gradients = tuple(LoweredExpr(replace(g, terms=(), scale=sympy.S.One), (Picked(
            naming.CONVOLUTION_BACKWARD, parts[g.like], joint.dims[parts[g.like]],
            _squeezed(joint.forward, parts[g.like])),)) if g.like in parts else next(rest) for g in op_plan.gradients)
        shared = (Shared(naming.CONVOLUTION_BACKWARD, joint, tuple(sorted(p for p in joint.wanted if p is not None))),
                  *shared)
    tangents, tangent_shared = lower_group(op_plan.tangents, owners=[g.input for g in op_plan.derivation.tangents])
    return LoweredOp(op_plan, style, forward, gradients, shared, forward_shared, tangents, tangent_shared,
                     _saved_values(op_plan, term))


def _saved_values(op_plan: OpPlan, term) -> tuple[Node, ...]:
    """Each saved value as one leaf, a contraction inside its function (attention's softmax of q @ k.mT) lowered
    by `term` and written where the leaf reads it; a value that would read a contraction twice stays a leaf."""
    values = []
    for value in op_plan.saved:     # a value read through affine subscripts reads its input's windows as the forward does
        leaf = Leaf(as_windows(op_plan.derivation.op, value.expr, value.indices), value.indices)
        (expr,), contracted = _bind_contractions(op_plan, [LoweredExpr(op_plan.forward, (leaf,))], term)
        (expr,), left = _inline_once((expr,), tuple(contracted))
        values.append(leaf if left else expr.terms[0])
    return tuple(values)


def _from_multiples(gradients: list[LoweredExpr]) -> list[LoweredExpr]:
    """A gradient that is a number k times an earlier one of the same shape is computed from it: both become
    one elementwise value (common-subexpression elimination then computes it once), the later one scaled by k.
    A Huber loss's grad_target is -grad_pred: one torch.where, not two."""
    totals = [_elementwise_total(g) for g in gradients]
    for later, total in enumerate(totals):
        for earlier in range(later):
            base = totals[earlier]
            plans = gradients[earlier].plan, gradients[later].plan
            if total is None or base is None or len({(p.indices, p.unbroadcast, p.batch_inputs, p.short_of_batch)
                                                      for p in plans}) > 1:
                continue      # (summed back to each input's batch shape alike, the multiple holds)
            k = multiple(base, total)
            if k is None:
                continue
            indices = gradients[earlier].plan.indices
            gradients[earlier] = _as_one_leaf(gradients[earlier], Leaf(base, indices))
            gradients[later] = _as_one_leaf(gradients[later], Leaf(base, indices) if k == 1 else
                                            Scaled(k, Leaf(base, indices)))
            totals[later] = None       # (a third multiple is taken from the earlier one)
            break
    return gradients


def _as_one_leaf(expr: LoweredExpr, node: Node) -> LoweredExpr:
    return replace(expr, plan=replace(expr.plan, scale=sympy.S.One), terms=(node,))


def _elementwise_total(expr: LoweredExpr) -> sympy.Expr | None:
    """The whole value of a gradient made of elementwise terms over all of its dims (scale included), else None."""
    plan = expr.plan
    if expr.indexed is not None or not expr.terms:
        return None
    total = []
    for term in expr.terms:
        coefficient, leaf = (term.coefficient, term.source) if isinstance(term, Scaled) else (sympy.S.One, term)
        if not isinstance(leaf, Leaf) or set(leaf.indices) != set(plan.indices):
            return None
        total.append(coefficient * leaf.expr)
    return plan.scale * sympy.Add(*total)


def multiple(base: sympy.Expr, other: sympy.Expr) -> sympy.Expr | None:
    """The nonzero number k with other == k * base, branch by branch for a where(), or None."""
    ratio = sympy.piecewise_fold(other / base)
    candidates = [value for value, _ in ratio.args] if isinstance(ratio, sympy.Piecewise) else [ratio]
    for candidate in candidates:
        k = sympy.cancel(candidate)
        if k.is_number and k.is_finite and k != 0 and not k.has(sympy.nan):
            difference = sympy.piecewise_fold(other - k * base)
            values = [v for v, _ in difference.args] if isinstance(difference, sympy.Piecewise) else [difference]
            return k if all(sympy.expand(v) == 0 for v in values) else None
    return None


def is_contraction(expr: sympy.Expr, scalars) -> bool:
    """Whether `expr` is a sum of a product of two or more tensors over an index (not over `...`), with
    dims left: a contraction, which inside a function the printer would spell as the broadcast product
    of all its operands."""
    if not isinstance(expr, sympy.Sum) or not free_indices(expr) or \
            any(limit[0].name == BATCH for limit in expr.limits):
        return False
    terms = expand_terms(expr, scalars)
    return len(terms) == 1 and sum(bool(free_indices(f)) for f in terms[0].factors) >= 2


def _bind_contractions(op_plan: OpPlan, exprs: list[LoweredExpr], term) -> tuple[list[LoweredExpr], list[Shared]]:
    """Each contraction that stands inside an elementwise leaf (the argument of softmax, logsumexp, exp,
    tanh, a fused kernel's g, ...) bound to a named value, `contracted_0 = q @ k.mT`, lowered as a term of
    its own (by `term`: @ and einsum, or the broadcast style's product and sum); the leaf reads it. One
    value per contraction, under any index names; contractions nested in a contraction's factors first."""
    op = op_plan.op
    scalars = tensor_symbols(op)
    bound: list[tuple[sympy.Expr, tuple[sympy.Idx, ...], str]] = []    # (the sum, its dims, name)
    values: list[Shared] = []

    def bind(contraction: sympy.Sum) -> sympy.Expr:
        for pattern, dims, name in bound:
            chosen = renamed_match(pattern, dims, contraction)
            if chosen is not None:
                return tensor_symbol(name)[chosen]
        free = free_indices(contraction)
        found = {i.name: i for i in contraction.atoms(sympy.Idx) if i.name in free}
        names = tuple(sorted(ordered(free, op.index_order), key=lambda i: i != BATCH))
        name = f"{naming.CONTRACTED_PREFIX}{len(values)}"
        (inner,) = expand_terms(contraction, scalars)
        node = term(contraction_plan(inner, names, op.index_order), names, None)
        # read in the dims the value comes out in (an operand the others nest in keeps its own order)
        dims = tuple(found[i] for i in node.indices)
        bound.append((contraction, dims, name))
        values.append(Shared(name, node, ()))
        return tensor_symbol(name)[dims]

    def rewrite(expr: sympy.Expr) -> sympy.Expr:
        if not expr.args or isinstance(expr, (sympy.Indexed, sympy.Idx)):
            return expr
        args = [rewrite(a) for a in expr.args]
        if any(a is not b for a, b in zip(args, expr.args)):
            expr = expr.func(*args)
        return bind(expr) if is_contraction(expr, scalars) else expr

    def rewrite_node(node: Node) -> Node:
        if isinstance(node, Leaf):
            expr = rewrite(node.expr) if node.expr.has(sympy.Sum) else node.expr
            return node if expr is node.expr else Leaf(expr, node.indices)
        if isinstance(node, Product):
            return replace(node, factors=tuple(rewrite_node(f) for f in node.factors))
        if isinstance(node, Einsum):
            return replace(node, operands=tuple(rewrite_node(o) for o in node.operands))
        if isinstance(node, MatMul):
            return replace(node, left=rewrite_node(node.left), right=rewrite_node(node.right))
        if isinstance(node, (Reduce, Scaled, Scatter)):
            return replace(node, source=rewrite_node(node.source))
        return node

    # (rewritten inside out: a contraction in another's factors is bound first, so each value comes after
    # those it reads)
    return [replace(e, terms=tuple(rewrite_node(t) for t in e.terms)) for e in exprs], values


def _numbered(exprs, values: tuple[Shared, ...]):
    """The contracted values numbered in the order the code computes them: those several gradients use first
    (a value can read only values with at least its users), then each gradient's own."""
    values = tuple(sorted(values, key=lambda v: len(v.users) < 2))
    contracted = [v.name for v in values if v.name.startswith(naming.CONTRACTED_PREFIX)]
    names = {old: f"{naming.CONTRACTED_PREFIX}{position}" for position, old in enumerate(contracted)}
    if all(old == new for old, new in names.items()):
        return exprs, values
    renaming = {tensor_symbol(old): tensor_symbol(new) for old, new in names.items()}
    rewritten = {id(leaf): Leaf(leaf.expr.xreplace(renaming), leaf.indices)
                 for root in [t for e in exprs for t in e.terms] + [v.value for v in values]
                 for leaf in walk(root) if isinstance(leaf, Leaf)}
    exprs = tuple(replace(e, terms=tuple(_replace_leaves(t, rewritten) for t in e.terms)) for e in exprs)
    return exprs, tuple(replace(v, name=names.get(v.name, v.name), value=_replace_leaves(v.value, rewritten))
                        for v in values)


def _inline_once(exprs, values: tuple[Shared, ...]):
    """A contracted value that one access of one leaf reads is written there (`torch.softmax(c * (q @ k.mT),
    dim=-1)`): computed once all the same, and freed as soon as that leaf is, not kept to the function's end."""
    leaves = [leaf for root in [t for e in exprs for t in e.terms] + [v.value for v in values]
              for leaf in walk(root) if isinstance(leaf, Leaf)]
    readers = {}
    for leaf in leaves:
        for node in sympy.preorder_traversal(leaf.expr):
            if isinstance(node, sympy.Indexed):
                readers.setdefault(node.base.label.name, []).append(leaf)
    once = {v.name: v.value for v in values if v.name.startswith(naming.CONTRACTED_PREFIX)
            and len(readers.get(v.name, ())) == 1}
    if not once:
        return exprs, values
    rewritten = {}
    for leaf in leaves:
        inline = tuple((name, value) for name, value in once.items() if readers[name][0] is leaf)
        if inline:
            rewritten[id(leaf)] = replace(leaf, inline=leaf.inline + inline)
    # (a value inlined into a value it inlines: the inner one is in the outer's term, rewritten with it)
    while True:
        values = tuple(replace(v, value=_replace_leaves(v.value, rewritten)) for v in values)
        moved = {name: next(v.value for v in values if v.name == name) for name in once}
        updated = {key: replace(leaf, inline=tuple((n, moved.get(n, value)) for n, value in leaf.inline))
                   for key, leaf in rewritten.items()}
        if updated == rewritten:
            break
        rewritten = updated
    exprs = tuple(replace(e, terms=tuple(_replace_leaves(t, rewritten) for t in e.terms)) for e in exprs)
    return exprs, tuple(v for v in values if v.name not in once)


def _in_use_order(op_plan: OpPlan, values: list[Shared], exprs, owners: list[str] | None) -> tuple[Shared, ...]:
    """Contracted and shared values each after the values it reads, with its users: the inputs whose
    expressions read it, directly or through another value."""
    positions = [t.name for t in op_plan.op.inputs]
    users = {v.name: set(v.users) for v in values}
    reads = {v.name: reads_of((), (v,)) & users.keys() - {v.name} for v in values}
    for g, expr in enumerate(exprs):
        owner = expr.plan.like if owners is None else owners[g]
        for name in (reads_of((expr,), ()) & users.keys()) if owner is not None else ():
            users[name].add(positions.index(owner))
    changed = True
    while changed:
        changed = False
        for value in values:
            for name in reads[value.name]:
                if not users[value.name] <= users[name]:
                    users[name] |= users[value.name]
                    changed = True
    pending, done = list(values), []
    while pending:
        ready = next(v for v in pending if reads[v.name] <= {d.name for d in done})
        pending.remove(ready)
        done.append(replace(ready, users=tuple(sorted(users[ready.name]))))
    return tuple(done)


def _share_common(op_plan: OpPlan, gradients: list[LoweredExpr], owners: list[str] | None = None,
                  contracted: list[Shared] = ()):
    """Hoist subexpressions that occur more than once across the elementwise leaves of `gradients`
    (the backward's, the forward alone, or the tangents' shares) and of the `contracted` values they read.
    A value's users are the inputs whose expressions need it: by default the input each gradient is shaped
    like, else `owners`. Returns the gradients, the shared values and the contracted values, rewritten."""
    leaves = [(g, node) for g, expr in enumerate(gradients) for term in expr.terms
              for node in walk(term) if isinstance(node, Leaf)]
    leaves += [(None, node) for value in contracted for node in walk(value.value) if isinstance(node, Leaf)]
    scalars = tensor_symbols(op_plan.op)
    order = op_plan.op.index_order
    # values that recur under other index names are read from a name of their own before cse runs, so that cse
    # shares their parts with the rest alike (exp(x) in the mask of max(exp(x[n, c]), c) and beside it)
    seeds = [(f"{naming.SHARED_PREFIX}{position}", repeated) for position, repeated
             in enumerate(_renamed_repeats([leaf.expr for _, leaf in leaves], scalars, order))]
    seeded = {name for name, _ in seeds}
    exprs = [_read_seeds(leaf.expr, seeds) for _, leaf in leaves]
    exprs += [_read_seeds(seed.expr, seeds, own=name) for name, seed in seeds]
    symbols = sympy.numbered_symbols("cse_", real=True)
    replacements, reduced = sympy.cse(exprs, symbols=symbols, order="none")
    reduced, seed_exprs = reduced[:len(leaves)], reduced[len(leaves):]
    accesses, values = {}, list(seeds)
    for symbol, expr in replacements:
        expr = expr.xreplace(accesses)
        if isinstance(expr, sympy.logic.boolalg.Boolean) or \
                not depends_on_tensor(expr, scalars | {sympy.Symbol(n, real=True) for n, _ in values}):
            accesses[symbol] = expr      # a condition, a plain number or a size: stays inline
            continue
        idx = [next(j for j in expr.atoms(sympy.Idx) if j.name == i) for i in ordered(free_indices(expr), order)]
        # a copy of the batch dims under another name (..._1, or a sum's bound _0_0) leads as `...` does:
        # where the value is read under `...`, its batch dims then lead as they must
        idx.sort(key=lambda j: j.upper + 1 != size_symbol(BATCH))
        indices = tuple(j.name for j in idx)
        # the same tensor under other index names, in any order (x[n, c, l] and x[n_1, c, l_1] over
        # (c, l_1, n_1)), is computed once: two names for one value would each read the other
        found = next(((name, chosen) for name, value in values
                      if (chosen := _renamed_as(value, expr)) is not None), None)
        if found is None:
            found = f"{naming.SHARED_PREFIX}{len(values)}", tuple(idx)
            values.append((found[0], Leaf(expr, indices)))
        name, chosen = found
        accesses[symbol] = tensor_symbol(name)[chosen] if chosen else sympy.Symbol(name, real=True)
    if not values:
        return tuple(gradients), (), list(contracted)
    # a seed that cse found whole elsewhere (sqrt(x) inside x**(-1/2)) reduces to a read of itself: it keeps
    # its expression as it was read before cse
    values = [(name, Leaf(_unless_itself(name, expr.xreplace(accesses), before), seed.indices))
              for (name, seed), expr, before in zip(seeds, seed_exprs, exprs[len(leaves):])] + values[len(seeds):]

    patterns = {name: [next(j for j in value.expr.atoms(sympy.Idx) if j.name == i) for i in value.indices]
                for name, value in values}

    def use_shared(expr, own=None):
        """expr with every occurrence of a shared value (but `own`), under any index names, read from it."""
        for name, value in values:
            pattern = patterns[name]
            if not pattern or name == own:
                continue
            found = lambda e: e != value.expr and renamed_match(value.expr, pattern, e) is not None  # noqa: E731
            expr = expr.replace(found, lambda e: tensor_symbol(name)[renamed_match(value.expr, pattern, e)])
        return expr

    values = [(name, Leaf(use_shared(value.expr, own=name), value.indices)) if position else (name, value)
              for position, (name, value) in enumerate(values)]
    rewritten = {id(leaf): Leaf(use_shared(expr.xreplace(accesses)), leaf.indices)
                 for (_, leaf), expr in zip(leaves, reduced)}
    if seeded:      # a seeded value that cse's own values took apart is read nowhere: it goes
        definitions = dict(values)
        used, pending = set(), [leaf.expr for leaf in rewritten.values()]
        while pending:
            for name in _shared_names(pending.pop(), definitions):
                if name not in used:
                    used.add(name)
                    pending.append(definitions[name].expr)
        values = [(name, value) for name, value in values if name in used]
        if not values:
            return tuple(gradients), (), list(contracted)
    values, renaming = _in_dependency_order(values)
    rewritten = {key: Leaf(leaf.expr.xreplace(renaming), leaf.indices) for key, leaf in rewritten.items()}
    # Who needs each shared value: the gradients using it directly or through a later shared value.
    positions = [t.name for t in op_plan.op.inputs]
    users = {name: set() for name, _ in values}
    for g, leaf in leaves:
        if g is None:     # a contracted value's leaf: _in_use_order gives its readers' users
            continue
        owner = gradients[g].plan.like if owners is None else owners[g]
        for name in _shared_names(rewritten[id(leaf)].expr, users):
            if owner is not None:     # the forward has no needs_input_grad to consult
                users[name].add(positions.index(owner))
    for name, value in reversed(values):
        for used in _shared_names(value.expr, users):
            users[used] |= users[name]
    gradients = [replace(g, terms=tuple(_replace_leaves(t, rewritten) for t in g.terms)) for g in gradients]
    shared = tuple(Shared(name, value, tuple(sorted(users[name]))) for name, value in values)
    contracted = [replace(v, value=_replace_leaves(v.value, rewritten)) for v in contracted]
    return tuple(gradients), shared, contracted


def _renamed_repeats(exprs: list[sympy.Expr], scalars, order) -> list[Leaf]:
    """Values of tensors that occur under two index namings, as a sum's summand and outside it: a centered input,
    x[n] - m and x[n_1] - m, or the mask of a max's ties, reaches(x[n, c], y[n]) and reaches(x[n, c_2], y[n])
    in the count that divides it. Common-subexpression elimination sees two expressions, and the value would be
    computed twice. A value is a sum of terms, a power or a function of tensors; a product is not (its
    factors are shared on their own, and a product inside a sum is a contraction, which stays one)."""
    candidates = list(dict.fromkeys(a for e in exprs for a in sympy.preorder_traversal(e)
                                    if _is_renamable_value(a) and a.atoms(sympy.Indexed) and free_indices(a)
                                    and depends_on_tensor(a, scalars)))
    def as_leaf(expr):
        return Leaf(expr, tuple(i for i in ordered(free_indices(expr), order)))

    found = []
    for position, candidate in enumerate(candidates):
        if any(_renamed_as(f, candidate) is not None for f in found):
            continue
        group = [candidate] + [other for other in candidates[position + 1:]
                               if other != candidate and _renamed_as(as_leaf(candidate), other) is not None]
        if len(group) > 1:      # named as the op names its dims where one of them is
            found.append(as_leaf(next((e for e in group if free_indices(e) <= set(order)), candidate)))
    return found


def _unless_itself(name: str, value: sympy.Expr, before: sympy.Expr) -> sympy.Expr:
    """`value`, the expression cse left for the shared value `name`, or `before` where that reads `name` itself."""
    reads_itself = any(a.base.label.name == name for a in value.atoms(sympy.Indexed)) or \
        sympy.Symbol(name, real=True) in value.free_symbols
    return before if reads_itself else value


def _read_seeds(expr: sympy.Expr, seeds: list[tuple[str, Leaf]], own: str | None = None) -> sympy.Expr:
    """`expr` with each occurrence of a seeded value (but `own`), under any index names, read from its name; the
    largest values first, so that one holding another is found whole."""
    for name, seed in sorted(seeds, key=lambda s: -sympy.count_ops(s[1].expr)):
        if name == own:
            continue
        pattern = [next(j for j in seed.expr.atoms(sympy.Idx) if j.name == i) for i in seed.indices]
        expr = expr.replace(lambda e: renamed_match(seed.expr, pattern, e) is not None,
                            lambda e: tensor_symbol(name)[renamed_match(seed.expr, pattern, e)])
    return expr


def _is_renamable_value(expr: sympy.Basic) -> bool:
    """Whether `expr` is worth a name of its own when it recurs under other index names (see _renamed_repeats)."""
    if isinstance(expr, (sympy.Add, sympy.Pow)):
        return True
    return isinstance(expr, sympy.Function) and not isinstance(expr, (sympy.Sum, sympy.Indexed))


def _renamed_as(value: Leaf, expr: sympy.Expr):
    """The indices of `expr` at which it reads `value` (() for a scalar), or None when it is another value."""
    if not value.indices:
        return () if value.expr == expr else None
    pattern = [next(j for j in value.expr.atoms(sympy.Idx) if j.name == i) for i in value.indices]
    return renamed_match(value.expr, pattern, expr)


def _in_dependency_order(values: list[tuple[str, Leaf]]):
    """Values sorted so that each comes after those it reads, renumbered in that order; with the renaming."""
    known = {name for name, _ in values}
    pending, ordered_values = list(values), []
    while pending:
        done = {name for name, _ in ordered_values}
        ready = next(v for v in pending if set(_shared_names(v[1].expr, known)) - {v[0]} <= done)
        pending.remove(ready)
        ordered_values.append(ready)
    renaming = {}
    for position, (name, value) in enumerate(ordered_values):
        new = f"{naming.SHARED_PREFIX}{position}"
        renaming[tensor_symbol(name)] = tensor_symbol(new)
        renaming[sympy.Symbol(name, real=True)] = sympy.Symbol(new, real=True)
    return [(renaming[tensor_symbol(name)].name, Leaf(value.expr.xreplace(renaming), value.indices))
            for name, value in ordered_values], renaming


def _shared_names(expr: sympy.Expr, known) -> list[str]:
    names = {a.base.label.name for a in expr.atoms(sympy.Indexed)} | {s.name for s in expr.free_symbols}
    return [n for n in names if n in known]


def _replace_leaves(node: Node, rewritten: dict[int, Leaf]) -> Node:
    if isinstance(node, Leaf):
        return rewritten.get(id(node), node)
    if isinstance(node, Product):
        return replace(node, factors=tuple(_replace_leaves(f, rewritten) for f in node.factors))
    if isinstance(node, Einsum):
        return replace(node, operands=tuple(_replace_leaves(o, rewritten) for o in node.operands))
    if isinstance(node, MatMul):
        return replace(node, left=_replace_leaves(node.left, rewritten), right=_replace_leaves(node.right, rewritten))
    if isinstance(node, (Convolution, ConvolutionBackward, Picked)):   # read tensors by index names: no leaf
        return node
    return replace(node, source=_replace_leaves(node.source, rewritten))  # Reduce, Scaled, Scatter


def _broadcast_term(term: TermPlan, target: tuple[str, ...], like: str | None) -> Node:
    if not term.operands:
        return _constant(term)
    leaves = [Leaf(o.expr, o.indices) for o in term.operands]
    used = {i for leaf in leaves for i in leaf.indices}
    if BATCH in used and any(i.startswith(BATCH) and i != BATCH for i in term.summed):
        # a sum over a copy of the batch dims (..._1) beside the batch dims themselves: one tensor cannot hold
        # both, however many dims each is; the factors constant along the sum multiply it instead
        outside = [leaf for leaf in leaves if not set(leaf.indices) & set(term.summed)]
        inside = [leaf for leaf in leaves if set(leaf.indices) & set(term.summed)]
        inner = sorted((i for i in term.aligned if any(i in leaf.indices for leaf in inside)),
                       key=lambda i: not i.startswith(BATCH))      # the copy leads, as the batch does
        node, coefficient = _reduce(inside[0] if len(inside) == 1 else Product(tuple(inside), tuple(inner)),
                                    term.summed, term)
        product = Product(tuple(outside) + (node,), tuple(i for i in term.aligned if i in used - set(term.summed)))
        return product if coefficient == 1 else Scaled(coefficient, product)
    node = leaves[0] if len(leaves) == 1 else Product(tuple(leaves), tuple(i for i in term.aligned if i in used))
    return _finish(node, term.summed, term)


def _contraction_term(term: TermPlan, target: tuple[str, ...], like: str | None) -> Node:
    if not term.operands:
        return _constant(term)
    if term.expand_batch:   # a sum over the broadcast batch shape: expanded, never folded into a matmul
        return _broadcast_term(term, target, like)
    nodes = [Leaf(o.expr, o.indices) for o in term.operands]
    sizes = dict(term.sizes)
    scatter = _scatter(nodes, set(term.summed), target, like, sizes)
    if scatter is not None:
        return _finish(scatter, (), term)
    # torch's convolutions take one batch dim: windows with batch dims '...' stay products of views
    batched = any(BATCH in node.indices for node in nodes)
    convolution = None if batched else (_convolution(nodes, set(term.summed), target)
                                        or _folded_input(nodes, set(term.summed), target))
    if convolution is not None and isinstance(convolution.source, in_range) and is_python_number(term.coefficient):
        return replace(convolution, scale=term.coefficient, known=term.known)   # the kernel of ones is the scale instead
    if convolution is not None:
        return _finish(convolution, (), term)
    # Factors constant along every summed index multiply the sum, not each of its summands:
    # sum(g[d] * r, d) is r * g.sum(d), one small product instead of a full-size one.
    outside = [n for n in nodes if term.summed and not set(n.indices) & set(term.summed)]
    inside = [n for n in nodes if not any(n is o for o in outside)]
    if outside and inside:
        node, summed = _contract(inside, list(term.summed), target, sizes)
        node, coefficient = _reduce(node, tuple(summed), term)
        factors = sorted([*outside, node], key=lambda n: len(n.indices))   # small operands meet first
        result = tuple(i for i in target if any(i in n.indices for n in factors))
        product = Product(tuple(factors), result)
        return product if coefficient == 1 else Scaled(coefficient, product)
    node, summed = _contract(nodes, list(term.summed), target, sizes)
    return _finish(node, tuple(summed), term)


def _indexed_add(plan: ExprPlan, terms: list[Node]) -> LoweredExpr:
    """Take out a term `c * one_hot(index[n], c)` of a gradient shaped (n, c) as an IndexedAdd, when
    the other terms cover every dim (so their scaled sum is a fresh tensor, safe to write into) and
    the scale holds a 0-d tensor (index_put_ takes its value as a tensor): cross-entropy's
    grad_loss / size_n * (softmax(logits) - one_hot(target)) subtracts grad_loss / size_n at each
    row's target instead of materializing the one-hot."""
    for position, node in enumerate(terms):
        coefficient, leaf = (node.coefficient, node.source) if isinstance(node, Scaled) else (sympy.S.One, node)
        if not (isinstance(leaf, Leaf) and isinstance(leaf.expr, one_hot)):
            continue
        rest = terms[:position] + terms[position + 1:]
        covered = {i for t in rest for i in t.indices}
        if one_hot_by_rows(leaf.expr, plan.indices, plan.scale) and covered == set(plan.indices) \
                and not plan.unbroadcast:
            target = leaf.expr.args[0]
            indexed = IndexedAdd(coefficient * plan.scale, target.base.label.name, target.indices[0].name)
            return LoweredExpr(plan, tuple(rest), indexed)
    return LoweredExpr(plan, tuple(terms))


def _merge_elementwise(terms: list[Node]) -> list[Node]:
    """Elementwise terms over the same dims that are rational in the inputs become one expression, when
    factoring it takes fewer operations: BCE's -(target - 1) / (1 - pred) - target / pred becomes
    -(pred - target) / ((pred - 1) * pred), five full-size operations instead of seven. Terms that
    call functions are left as they are: factoring around a call rarely saves one and reads worse."""
    def elementwise(node):
        source = node.source if isinstance(node, Scaled) else node
        # (a coefficient such as exp(700) / 1e300 is left alone: factored, it splits into numbers
        # that overflow a float apart)
        rational = not isinstance(node, Scaled) or node.coefficient.is_Rational
        return isinstance(source, Leaf) and source.indices and not source.expr.atoms(sympy.Function) and rational

    mergeable = [t for t in terms if elementwise(t)]
    if len(mergeable) < 2 or len({frozenset(t.indices) for t in mergeable}) > 1:
        return terms
    indices = mergeable[0].indices
    expr = sympy.Add(*[t.coefficient * t.source.expr if isinstance(t, Scaled) else t.expr for t in mergeable])
    if not all(exact_fraction(number) for number in expr.atoms(sympy.Rational)):
        return terms     # factoring decimals gathers them over one huge denominator: they stay floats
    factored = sympy.factor(expr)
    if sympy.count_ops(factored) >= sympy.count_ops(expr):
        return terms
    coefficient, rest = factored.as_coeff_Mul()
    merged = Leaf(rest, indices) if coefficient == 1 else Scaled(coefficient, Leaf(rest, indices))
    return [merged] + [t for t in terms if not elementwise(t)]


def _constant(term: TermPlan) -> Node:
    """A term with no tensor in it, such as the 2 in y = s + 2: it broadcasts against the others."""
    return Leaf(term.coefficient, ())


def _scatter(nodes: list[Node], summed: set[str], target: tuple[str, ...], like: str | None,
             sizes: dict[str, sympy.Expr]) -> Node | None:
    """sum over n of one_hot(idx[n], v) * f[n, d]  ->  index_add of f's rows into row idx[n] of a zero tensor."""
    for node in nodes:
        if not (isinstance(node.expr, one_hot) and like is not None):
            continue
        value, position = node.expr.args
        if not isinstance(value, sympy.Indexed):
            continue    # an index read through a window (idx[n, t + k]): its one-hot is contracted as it is
        rows = tuple(i.name for i in value.indices)
        at = target.index(position.name) if position.name in target else None
        # the index's dims the gradient keeps (shared with the input's other dims) and those it sums
        own = tuple(i for i in rows if i not in target)
        if at is None or not set(own) <= summed or any(i in summed for i in rows if i in target):
            continue
        if not own and len(nodes) == 1:
            continue    # (a one-hot alone, unsummed, is added in place: _indexed_add)
        layout = target[:at] + own + target[at + 1:]
        others = [n for n in nodes if n is not node] or [Leaf(sympy.S.One, ())]   # each position adds a 1
        source, left = _contract(others, [i for i in summed if i not in own], layout, sizes)
        if left:   # one operand left (the others merged into it): its sum is what is scattered
            source = _sum(source, tuple(left), sizes)
        # a source constant along some dims is expanded to them: each position still adds at its index
        return Scatter(source, value.base.label.name, rows, like, target, position.name)
    return None


def _convolution(nodes: list[Node], summed: set[str], target: tuple[str, ...]) -> Convolution | None:
    """A product of a window read and a kernel read summed over their shared channel and kernel indices,
    as one PyTorch convolution (see Convolution); None when the term is no such product."""
    if len(nodes) != 2:
        return None
    for source, kernel in (nodes, nodes[::-1]):
        spread = _spread(source, kernel, summed, target)
        if spread is not None:
            return spread
        if not (isinstance(source, Leaf) and isinstance(source.expr, window) and isinstance(kernel, Leaf)
                and isinstance(kernel.expr, sympy.Indexed)
                and all(isinstance(i, sympy.Idx) for i in kernel.expr.indices)):
            continue
        kernel_dims = [i.name for i in kernel.expr.indices]
        batch, channels, spatial, sizes = [], [], [], []
        for subscript in source.expr.access.indices:
            if isinstance(subscript, sympy.Idx):
                shared, reduced = subscript.name in kernel_dims, subscript.name in summed
                if shared != reduced:
                    break
                (channels if shared else batch).append(subscript.name)
                continue
            coefficients = {i: int(subscript.coeff(i)) for i in subscript.atoms(sympy.Idx)}
            moving = [i for i, c in coefficients.items() if c > 0 and i.name not in kernel_dims and i.name not in summed]
            taps = [i for i in coefficients if i.name in kernel_dims and i.name in summed]
            if len(coefficients) != 2 or len(moving) != 1 or len(taps) != 1:
                break
            spatial.append((moving[0].name, taps[0].name, coefficients[moving[0]], coefficients[taps[0]]))
            sizes.append(moving[0].upper + 1)
        else:
            out = tuple(i for i in kernel_dims if i not in summed)
            taps = {k for _, k, _, _ in spatial}
            if len(batch) <= 1 and len(channels) <= 1 and len(out) <= 1 and 1 <= len(spatial) <= 3 \
                    and summed == set(channels) | taps and len(kernel_dims) == len(channels) + len(out) + len(taps) \
                    and set(batch) | set(out) | {t for t, _, _, _ in spatial} <= set(target):
                # the upstream gradient is never the kernel: its taps would run over the output's length
                gradient = kernel.expr.base.label.name.startswith(naming.grad(""))
                kind = "conv"
                if gradient and all(s == 1 and d < 0 for _, _, s, d in spatial):
                    kind = "transposed"
                elif gradient and all(d > 0 for _, _, _, d in spatial) and len(batch) == len(channels) == len(out) == 1:
                    kind = "weight"
                elif _input_gradient(source.expr, kernel.expr, spatial) and len(batch) == len(channels) == len(out) == 1:
                    kind = "input"
                return Convolution(source.expr, kernel.expr, tuple(batch), tuple(channels), out, tuple(spatial),
                                   tuple(sizes), kind)
    return None


def _with_bias(plan: ExprPlan, terms: list[Node]) -> tuple[ExprPlan, list[Node]]:
    """A convolution plus a term that reads one tensor at its out-channel alone, b[o], both unscaled: the
    convolution takes the bias in (F.conv1d(x, w, b): no second tensor of the output's size); the plan
    drops the bias's term with it."""
    for position, conv in enumerate(terms):
        if not (isinstance(conv, Convolution) and conv.kind == "conv" and isinstance(conv.source, window)
                and len(conv.out) == 1 and conv.bias is None):
            continue
        for other, bias in enumerate(terms):
            if isinstance(bias, Leaf) and isinstance(bias.expr, sympy.Indexed) and bias.indices == conv.out \
                    and tuple(i.name for i in bias.expr.indices) == conv.out \
                    and all(isinstance(i, sympy.Idx) for i in bias.expr.indices):
                kept = [t for p, t in enumerate(terms) if p != other]
                kept[kept.index(conv)] = replace(conv, bias=bias.expr)
                return replace(plan, terms=tuple(t for p, t in enumerate(plan.terms) if p != other)), kept
    return plan, terms


def _joint_convolution(op_plan: OpPlan, forward: LoweredExpr) -> ConvolutionBackward | None:
    """The rule for a forward term that is one convolution, F.conv(x, w, b): its lowered Convolution of kind
    "conv", unscaled, the bias taken in or none, whose input x and kernel w are distinct floating inputs, each
    read nowhere else in the forward (nor b), every step positive, and the zeros its reads reach torch's
    padding: the same p on both sides of a dim, the result's size there torch's, floor((L + 2p - d*(K - 1) - 1)
    / s) + 1. Then every gradient of x, w and b is that convolution's (the op is linear in each), computed by
    one torch.ops.aten.convolution_backward as autograd does; None when the forward has no such term."""
    plan, op = forward.plan, op_plan.op
    inputs = {t.name: position for position, t in enumerate(op.inputs) if not t.integer}
    if plan.scale != 1 or plan.unbroadcast or BATCH in plan.indices:
        return None
    for conv in forward.terms:
        if not (isinstance(conv, Convolution) and conv.kind == "conv" and isinstance(conv.source, window)
                and conv.scale == 1):
            continue
        access, front, back, _, value = conv.source.args
        names = (access.base.label.name, conv.kernel.base.label.name) + \
            ((conv.bias.base.label.name,) if conv.bias is not None else ())
        others = [t for t in forward.terms if t is not conv]
        if len(set(names)) != len(names) or not set(names) <= set(inputs) or value != 0 \
                or set(names) & _names_read(others) or set(conv.indices) != set(plan.indices) \
                or any(s <= 0 or d <= 0 for _, _, s, d in conv.spatial):
            continue
        known = {size: formula for term in op_plan.forward.terms for size, formula in term.known}
        affine = [p for p, i in enumerate(access.indices) if not isinstance(i, sympy.Idx)]
        padding = [-access.indices[p].subs({i: 0 for i in access.indices[p].atoms(sympy.Idx)}) for p in affine]
        # torch's result is one longer where the reads stop a stride or more before the zeros after x end
        left = [sympy.expand((pad - back[p]).subs(known)) for p, pad in zip(affine, padding)]
        if not all(pad.is_Integer and pad >= 0 and front[p] == pad and rest.is_Integer and 0 <= rest < s
                   for p, pad, rest, (_, _, s, _) in zip(affine, padding, left, conv.spatial)):
            continue
        wanted = tuple(inputs[name] if op.inputs[inputs[name]].differentiable else None for name in names)
        if all(position is None for position in wanted):
            return None
        return ConvolutionBackward(conv, (naming.grad(op.output), plan.indices), tuple(int(p) for p in padding),
                                   wanted + (None,) * (3 - len(wanted)), _picked_dims(op, conv))
    return None


def _names_read(nodes: list[Node]) -> set[str]:
    """The tensors lowered nodes read."""
    names = set()
    for node in (n for root in nodes for n in walk(root)):
        exprs = [node.expr] if isinstance(node, Leaf) else [node.source, node.kernel] + (
            [node.bias] if node.bias is not None else []) if isinstance(node, Convolution) else []
        names |= {a.base.label.name for e in exprs for a in atoms_of(e, sympy.Indexed)}
        if isinstance(node, Scatter):
            names |= {node.index, node.like}
    return names


def _squeezed(conv: Convolution, part: int) -> tuple[int, ...]:
    """The dims of 1 a convolution's backward output has for a missing batch, channel or out-channel index."""
    leading = ((conv.batch, conv.channels), (conv.out, conv.channels), (conv.out,))[part]
    return tuple(position for position, dims in enumerate(leading) if not dims)


def _picked_dims(op, conv: Convolution) -> tuple[tuple[str, ...], ...]:
    """The dims of each output of a convolution's backward, by the names its tensor declares: the input's
    (N, C, L...), the kernel's (O, C, K...), the bias's (O,)."""
    def arranged(access: sympy.Indexed, order: tuple[str, ...]) -> tuple[str, ...]:
        labels = [i.name if isinstance(i, sympy.Idx) else next(t for t, _, _, _ in conv.spatial if t in {
            a.name for a in i.atoms(sympy.Idx)}) for i in access.indices]
        declared = op.input(access.base.label.name).indices
        return tuple(declared[labels.index(label)] for label in order)
    spatial = tuple(t for t, _, _, _ in conv.spatial)
    dims = (arranged(conv.source.args[0], conv.batch + conv.channels + spatial),
            arranged(conv.kernel, conv.out + conv.channels + tuple(k for _, k, _, _ in conv.spatial)))
    return dims + ((arranged(conv.bias, conv.out),) if conv.bias is not None else ())


def _folded_input(nodes: list[Node], summed: set[str], target: tuple[str, ...]) -> Convolution | None:
    """grad_y[b, o, t...] * w[o, c, k...] folded back at l = s*t + d*k + e in each spatial dim (nested
    fold_windows: no step is 1) and summed over o: a convolution's grad_x with a stride and a dilation both
    above 1, torch.nn.grad.conv{1,2,3}d_input (kind "folded"); None when the term is no such fold."""
    if len(nodes) != 1 or not isinstance(nodes[0], Leaf) or not isinstance(nodes[0].expr, fold_window):
        return None
    folds, value = [], nodes[0].expr
    while isinstance(value, fold_window):
        folds.append(value)
        value = value.value
    reads = sympy.Mul.make_args(value)
    if len(reads) != 2 or not all(isinstance(r, sympy.Indexed) and all(isinstance(i, sympy.Idx) for i in r.indices)
                                  for r in reads):
        return None
    gradient, kernel = sorted(reads, key=lambda r: not r.base.label.name.startswith(naming.grad("")))
    if not gradient.base.label.name.startswith(naming.grad("")) or kernel.base.label.name.startswith(naming.grad("")):
        return None
    spatial, moving = [], []
    for fold in folds:
        subscript, position = fold.args[1], fold.args[2]
        taps = [i for i in subscript.atoms(sympy.Idx) if i in kernel.indices and i not in gradient.indices]
        starts = [i for i in subscript.atoms(sympy.Idx) if i in gradient.indices and i not in kernel.indices]
        if len(taps) != 1 or len(starts) != 1 or len(subscript.atoms(sympy.Idx)) != 2:
            return None
        t, k = starts[0], taps[0]
        spatial.append(((position.name, k.name, int(subscript.coeff(t)), int(subscript.coeff(k))), position.upper + 1))
        moving.append(t)
    # the spatial dims in the order the gradient has them (each fold's start index is one of its dims)
    order = sorted(range(len(folds)), key=lambda f: list(gradient.indices).index(moving[f]))
    channels = tuple(i.name for i in gradient.indices if i in kernel.indices)
    batch = tuple(i.name for i in gradient.indices if i not in kernel.indices and i not in moving)
    out = tuple(i.name for i in kernel.indices if i not in gradient.indices and i.name not in
                {k for (_, k, _, _), _ in spatial})
    if len(batch) != 1 or len(channels) != 1 or len(out) != 1 or summed != set(channels) or len(folds) > 3 \
            or not set(batch + out + tuple(p for (p, _, _, _), _ in spatial)) <= set(target):
        return None
    return Convolution(nodes[0].expr, kernel, batch, channels, out, tuple(spatial[f][0] for f in order),
                       tuple(spatial[f][1] for f in order), kind="folded")


def _input_gradient(source: window, kernel: sympy.Indexed, spatial: list) -> bool:
    """Whether a window of the upstream gradient, g[..., t - d*k + e], taken by an input's kernel, is a
    convolution's grad_x with padding e on both sides (its pads equal): torch.nn.grad.conv_input."""
    access, front, back, *_ = source.args
    if not access.base.label.name.startswith(naming.grad("")) or kernel.base.label.name.startswith(naming.grad("")):
        return False
    affine = [p for p, i in enumerate(access.indices) if not isinstance(i, sympy.Idx)]
    return all(s == 1 and d < 0 for _, _, s, d in spatial) and all(
        front[p] == back[p] and access.indices[p].subs({i: 0 for i in access.indices[p].atoms(sympy.Idx)}) >= 0
        for p in affine)


def _spread(source: Node, kernel: Node, summed: set[str], target: tuple[str, ...]) -> Convolution | None:
    """sum over t of g[..., t] * in_range(l - s*t + e, size_k): each entry of g spread over the size_k
    positions from s*t (a pooling's gradient), a transposed convolution of g by ones."""
    if not (isinstance(source, Leaf) and isinstance(source.expr, in_range) and len(source.expr.args) == 3
            and isinstance(kernel, Leaf) and isinstance(kernel.expr, sympy.Indexed)
            and all(isinstance(i, sympy.Idx) for i in kernel.expr.indices)):
        return None
    value = source.expr.args[0]
    coefficients = {i: int(value.coeff(i)) for i in value.atoms(sympy.Idx)}
    kernel_dims = [i.name for i in kernel.expr.indices]
    moving = [i for i, c in coefficients.items() if c == 1 and i.name not in kernel_dims and i.name not in summed]
    taps = [i for i, c in coefficients.items() if c < 0 and i.name in kernel_dims and i.name in summed]
    out = tuple(i for i in kernel_dims if i not in summed)
    if len(coefficients) != 2 or len(moving) != 1 or len(taps) != 1 or summed != {taps[0].name} \
            or kernel_dims[-1] != taps[0].name or not set(out) | {moving[0].name} <= set(target):
        return None
    tap, position = taps[0], moving[0]
    return Convolution(source.expr, kernel.expr, (), (), out, ((position.name, tap.name, 1, coefficients[tap]),),
                       (position.upper + 1,), kind="transposed")


def _contract(nodes: list[Node], summed: list[str], target: tuple[str, ...],
              sizes: dict[str, sympy.Expr]) -> tuple[Node, list[str]]:
    """Contract operands over `summed`; returns the node and the indices it still has to sum."""
    if not nodes:
        raise ValueError("nothing to contract")
    nodes = _merge_nested(nodes)
    # A summed dim that only one operand has is reduced before anything is multiplied.
    for position, node in enumerate(nodes):
        others = {i for other in nodes if other is not node for i in other.indices}
        alone = tuple(i for i in node.indices if i in summed and i not in others)
        if alone and len(nodes) > 1:
            nodes[position] = _sum(node, alone, sizes)
            summed = [i for i in summed if i not in alone]
    if len(nodes) == 1:
        return nodes[0], summed
    # Contractions may produce any dim order: produce the target's, so no transpose follows.
    result = tuple(i for i in target if any(i in n.indices for n in nodes))
    node = _pair(nodes[0], nodes[1], set(summed), result) if len(nodes) == 2 else Einsum(tuple(nodes), result)
    if isinstance(node, (MatMul, Einsum)) and any(_one_hot(n) for n in nodes):
        # an int64 one-hot in a matrix product with float tensors is a dtype error: _scatter adds rows instead
        raise ValueError("a one-hot of an integer input would enter a matrix product")
    return node, []


def _one_hot(node: Node) -> bool:
    return isinstance(node, Leaf) and isinstance(node.expr, one_hot) or \
        isinstance(node, Reduce) and _one_hot(node.source)


def _merge_nested(nodes: list[Node]) -> list[Node]:
    """Multiply operands whose dims are a subset of another's into it: no intermediate grows."""
    nodes = list(nodes)
    merged = True
    while merged and len(nodes) > 1:
        merged = False
        for small in nodes:
            big = next((b for b in nodes if b is not small and set(small.indices) <= set(b.indices)), None)
            if big is not None:
                nodes.remove(small)
                nodes[nodes.index(big)] = Leaf(small.expr * big.expr, big.indices)
                merged = True
                break
    return nodes


def _pair(a: Node, b: Node, summed: set[str], result: tuple[str, ...]) -> Node:
    contracted = tuple(i for i in a.indices if i in summed and i in b.indices)
    if not contracted:
        return Product((a, b), result)
    batch = tuple(i for i in result if i in a.indices and i in b.indices)
    a_free = [i for i in result if i in a.indices and i not in b.indices]
    b_free = [i for i in result if i in b.indices and i not in a.indices]
    matrix = contracted != (BATCH,) and len(contracted) == 1 and len(a_free) <= 1 and len(b_free) <= 1 and (not batch or (a_free and b_free))
    # the batch dims lead a matrix product's operands: as a matrix row they would follow its batch
    matrix = matrix and not (batch and BATCH in a_free + b_free)
    if not matrix:
        return Einsum((a, b), result)
    # The operand whose free dim comes first in the result goes on the left.
    left, right, left_free, right_free = a, b, a_free, b_free
    if a_free and b_free and result.index(b_free[0]) < result.index(a_free[0]):
        left, right, left_free, right_free = b, a, b_free, a_free
    return MatMul(left, right, left_layout=batch + tuple(left_free) + contracted,
                  right_layout=batch + contracted + tuple(right_free),
                  indices=batch + tuple(left_free) + tuple(right_free))


def _finish(node: Node, summed: tuple[str, ...], term: TermPlan) -> Node:
    """Reduce over `summed` (as a mean when the coefficient divides by their sizes), then scale."""
    node, coefficient = _reduce(node, summed, term)
    return node if coefficient == 1 else Scaled(coefficient, node)


def _reduce(node: Node, summed: tuple[str, ...], term: TermPlan) -> tuple[Node, sympy.Expr]:
    """`node` reduced over `summed`, and the part of the term's coefficient a mean did not absorb."""
    coefficient = term.coefficient
    if summed:
        sizes = dict(term.sizes)
        count = sympy.Mul(*[sizes[i] for i in summed])
        ratio = sympy.cancel(coefficient * count)
        mean = not (ratio.free_symbols & count.free_symbols)
        if mean:
            coefficient = ratio
        # a mean too: over an empty broadcast batch shape it is NaN, as torch's, where x's own is not
        node = _sum(node, summed, sizes, mean, term.expand_batch if BATCH in summed else ())
    return node, coefficient


def _sum(node: Node, summed: tuple[str, ...], sizes: dict[str, sympy.Expr], mean: bool = False,
         expand_batch: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> Reduce:
    """`node` reduced over `summed`; a sum over the batch dims names the size of each dim it keeps
    (the plan's: a renamed index such as n_1 has n's size)."""
    batch = BATCH in summed or bool(node.indices) and node.indices[0].startswith(BATCH) and node.indices[0] in summed
    kept = tuple(sizes[i] for i in node.indices if i not in summed) if batch else ()
    return Reduce(node, summed, mean, kept, expand_batch)


def backward_reads(lowered: LoweredOp) -> set[str]:
    """Names of the inputs and output whose values or shapes the backward's code reads."""
    return reads_of(lowered.gradients, lowered.shared)


def tangent_reads(lowered: LoweredOp) -> set[str]:
    """Names of the inputs, output and tangents whose values or shapes the tangents' code reads."""
    return reads_of(lowered.tangents, lowered.tangent_shared)


def reads_of(exprs: tuple[LoweredExpr, ...], shared: tuple[Shared, ...], shapes: bool = True) -> set[str]:
    """Names of the tensors and symbols whose values or shapes (`shapes=False`: values only) the code of
    `exprs` and `shared` reads."""
    names: set[str] = set()
    leaves = [node for s in shared for node in walk(s.value) if isinstance(node, Leaf)]
    for joint in (s.value for s in shared if isinstance(s.value, ConvolutionBackward)):
        conv = joint.forward      # reads its input and kernel (the bias's size is the kernel's out-channels)
        names |= {joint.gradient[0], conv.source.args[0].base.label.name, conv.kernel.base.label.name}
    for expr in exprs:
        if shapes and (expr.plan.unbroadcast or (expr.plan.like is not None
                                                 and covered(expr) != set(expr.plan.indices))):
            names.add(expr.plan.like)      # sum_to_size / expand_as / zeros_like
        if shapes and expands_batch(expr):
            names |= {name for name, _ in expr.plan.batch_inputs}
        names |= {s.name for s in expr.plan.scale.free_symbols}
        if expr.indexed is not None:
            names.add(expr.indexed.index)
        for term in expr.terms:
            for node in walk(term):
                if isinstance(node, Leaf):
                    leaves.append(node)
                elif isinstance(node, Scatter):
                    names |= {node.like, node.index} if shapes else {node.index}
                elif isinstance(node, Reduce) and shapes:
                    names |= {name for name, _ in node.expand_batch}
                elif isinstance(node, Convolution):
                    leaves += [Leaf(node.source, ()), Leaf(node.kernel, ())] + \
                        ([Leaf(node.bias, ())] if node.bias is not None else [])
                elif isinstance(node, Picked):
                    names.add(node.name)
    for leaf in leaves:
        expr = leaf.expr if shapes else leaf.expr.xreplace(
            {call: call.func(*[sympy.S.Zero if a in call.shape_only() else a for a in call.args])
             for call in atoms_of(leaf.expr, Fused) if call.shape_only()})
        names |= {a.base.label.name for a in atoms_of(expr, sympy.Indexed)}
        names |= {s.name for s in expr.free_symbols}
    return names


def covered(expr: LoweredExpr) -> set[str]:
    """The dims an expression's terms produce; fewer than its target's when a term broadcasts."""
    return set().union(*(t.indices for t in expr.terms)) if expr.terms else set()


def expands_batch(expr: LoweredExpr) -> bool:
    """Whether a gradient summed back to its input's shape is first expanded to the broadcast batch shape:
    when no term is known to span it, or a term lacks one of the input's dims."""
    return expr.plan.unbroadcast and (expr.plan.short_of_batch or covered(expr) != set(expr.plan.indices))


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Product):
        return node.factors
    if isinstance(node, Einsum):
        return node.operands
    if isinstance(node, MatMul):
        return node.left, node.right
    if isinstance(node, (Reduce, Scaled, Scatter)):
        return (node.source,)
    if isinstance(node, Leaf):
        return tuple(value for _, value in node.inline)
    return ()


def walk(node: Node):
    """Every node of a tree, parents first."""
    yield node
    for child in children(node):
        yield from walk(child)


def largest_intermediate_violations(lowered: LoweredOp) -> list[str]:
    """Intermediates whose dims are not a subset of a tensor the op already holds.

    The tensors held are the inputs, the output and the upstream gradient (which has
    the output's dims). An intermediate whose dims are a subset of one of theirs can
    never be larger than it, whatever the sizes: this is the static memory guarantee.
    """
    op = lowered.plan.op
    declared = {i: size_symbol(op.size_of(i)) for i in op.index_order}
    held = [Counter(declared[i] for i in dims) for dims in [t.indices for t in op.inputs] + [op.output_indices]]
    problems = []
    for expr in (lowered.forward, *lowered.gradients):
        for term, term_plan in zip(expr.terms, expr.plan.terms):
            # the plan knows each index's size, the derivation's copies (c_1 of c) included
            sizes = declared | dict(term_plan.sizes)
            for node in walk(term):
                if isinstance(node, Leaf) and isinstance(node.expr, window):
                    continue    # a window is a view of its (padded) input: Tensor.unfold allocates nothing
                if not any(Counter(sizes[i] for i in node.indices) <= h for h in held):
                    problems.append(f"{expr.plan.target}: {type(node).__name__} over {node.indices}")
    return problems
