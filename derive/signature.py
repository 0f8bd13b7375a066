"""Stage 5b, lowered op -> signature: the generated backward as its callers and readers see it.

One record per op and style (torchgen's "api" layer): the backward's arguments, the tensors it
reads, what the autograd.Function saves for it, where each size is read from, and each gradient's
line with the sizes and shared values it uses. It is decided here once; emit writes the module
from it, explain and DERIVATIONS.md show it, derive.testing calls the backward by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import naming
from .derivation import Derivation
from .lower import Leaf, LoweredExpr, LoweredOp, backward_reads, reads_of
from .model import OpSpec
from .printing import render, render_expr, size_bindings, size_readers, sizes_used

Binding = tuple[str, str]    # (name, code): `size_m = grad_y.shape[-1]`, `shared_0 = torch.sigmoid(x)`


@dataclass(frozen=True)
class SharedValue:
    """A value the backward computes once for several gradients (or just before the one that needs it)."""

    name: str                   # shared_0
    code: str                   # what it computes, as Python
    users: tuple[int, ...]      # positions (among the op's inputs) of the gradients that read it


@dataclass(frozen=True)
class GradientSignature:
    """One gradient of the backward: its line and everything that line needs."""

    input: str                  # the input X
    target: str                 # grad_X, the variable the line assigns
    position: int               # X's place among the op's inputs: its needs_input_grad flag
    code: str                   # the line's right-hand side: `grad_X = <code>`
    sizes: tuple[Binding, ...]  # the backward's size bindings this line (or a shared value it reads) uses
    shared: tuple[Binding, ...] # the shared values it reads, in the order the backward computes them
    reads: tuple[str, ...]      # forward tensors (inputs, output, saved values) it reads, sizes included

    @property
    def line(self) -> str:
        return f"{self.target} = {self.code}"


@dataclass(frozen=True)
class Signature:
    """`<op>_backward` in one style, and the autograd.Function's side of it."""

    style: str
    grad_output: str                    # grad_y, the first argument
    arguments: tuple[str, ...]          # every positional argument: grad_y, the inputs, y when the
                                        # gradients reuse it, the values the forward saves
    values: tuple[str, ...]             # those forward values (saved_log_softmax), computed by <op>_forward_saving
    uses_output: bool                   # whether the forward's result is an argument
    sources: tuple[tuple[str, tuple[str, ...]], ...]   # (tensor, dims) sizes are read from, first match wins
    sizes: tuple[Binding, ...]          # the size bindings at the top of the backward
    reads: tuple[str, ...]              # forward tensors the backward reads, values or shapes, in op order
    kept: tuple[str, ...]               # the inputs the Function keeps for it
    shaped: tuple[str, ...]             # the inputs whose shape alone the backward reads: the Function keeps
                                        # the shape (ints), and hands the backward a stand-in holding no data
    saved: tuple[str, ...]              # what the Function saves: kept inputs, the output, the values
    shared: tuple[SharedValue, ...]     # values computed once, in dependency order
    gradients: tuple[GradientSignature, ...]   # one per differentiable input, in input order
    forward_sizes: tuple[Binding, ...]  # the size bindings of <op>_forward (read off the inputs)


def backward_signature(derivation: Derivation, lowered: LoweredOp) -> Signature:
    """The backward of one lowered op: read its sizes off grad_out first, then off inputs it reads anyway."""
    op = derivation.op
    inputs = [(t.name, t.indices) for t in op.inputs]
    code_reads = backward_reads(lowered)
    sources = [(derivation.grad_output, op.output_indices)] + \
        sorted(inputs, key=lambda source: source[0] not in code_reads)
    exprs = list(lowered.gradients)
    shared_leaves = tuple(s.value for s in lowered.shared)
    reads = code_reads | _size_reads(op, sizes_used(op, exprs, shared_leaves), sources)
    values = tuple(v.name for v in lowered.plan.saved)
    # An op with values to compute again in a double backward keeps every input it computes them from.
    recomputed = any(v.recompute and v.adjoint is None for v in lowered.plan.saved)
    values_read = reads_of(tuple(lowered.gradients), lowered.shared, shapes=False)
    kept = tuple(t.name for t in op.inputs
                 if recomputed or (t.name in reads and (t.integer or t.name in values_read)))
    shaped = tuple(t.name for t in op.inputs if t.name in reads and t.name not in kept)
    output = (op.output,) if derivation.uses_output else ()
    sizes = tuple(size_bindings(op, exprs, sources, shared_leaves))
    forward_leaves = tuple(s.value for s in lowered.forward_shared) \
        + tuple(Leaf(v.expr, v.indices) for v in lowered.plan.saved)
    shared = tuple(SharedValue(s.name, render(s.value).text, s.users) for s in lowered.shared)
    return Signature(
        style=lowered.style, grad_output=derivation.grad_output,
        arguments=(derivation.grad_output, *(t.name for t in op.inputs), *output, *values),
        values=values, uses_output=derivation.uses_output, sources=tuple(sources), sizes=sizes,
        reads=_forward_tensors(op, lowered, reads), kept=kept, shaped=shaped, saved=kept + output + values,
        shared=shared,
        gradients=tuple(_gradient(op, lowered, g.input, expr, shared, sources, sizes)
                        for g, expr in zip(derivation.gradients, lowered.gradients)),
        forward_sizes=tuple(size_bindings(op, [lowered.forward], shared=forward_leaves)),
    )


def _gradient(op: OpSpec, lowered: LoweredOp, name: str, expr: LoweredExpr, shared: tuple[SharedValue, ...],
              sources: list[tuple[str, tuple[str, ...]]], sizes: tuple[Binding, ...]) -> GradientSignature:
    position = [t.name for t in op.inputs].index(name)
    values = tuple(s for s in lowered.shared if position in s.users)
    used = sizes_used(op, [expr], tuple(s.value for s in values))
    names = {naming.size(i) for i in used}
    reads = reads_of((expr,), values) | _size_reads(op, used, sources)
    return GradientSignature(
        input=name, target=naming.grad(name), position=position, code=render_expr(expr),
        sizes=tuple((size, code) for size, code in sizes if size in names),
        shared=tuple((s.name, s.code) for s in shared if position in s.users),
        reads=_forward_tensors(op, lowered, reads))


def _size_reads(op: OpSpec, indices: list[str], sources: list[tuple[str, tuple[str, ...]]]) -> set[str]:
    """The tensors the bindings of these indices' sizes read."""
    return {name for i in indices for name in size_readers(i, sources, op)}


def _forward_tensors(op: OpSpec, lowered: LoweredOp, names: set[str]) -> tuple[str, ...]:
    """The forward's tensors among `names` (inputs, output, values the forward saves), in op order."""
    order = [t.name for t in op.inputs] + [op.output] + [v.name for v in lowered.plan.saved]
    return tuple(n for n in order if n in names)
