"""Batch dims `...` that broadcast between inputs (README "Shape contracts"): `x[...]` stands for x
broadcast to the shape every input's `...` broadcasts to, so each gradient is summed back to exactly its
input's shape, a sum over `...` counts every broadcast position, and the tangent has the output's shape.

Specs are generated: each body below is combined with each way of ending it (elementwise result, sum and
mean over `...`, contractions with batch dims) and run on pairs of batch shapes that differ by rank, by
size-1 dims and by size 0, in both styles, against autograd of the torch reference written beside each spec.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from pathlib import Path

import pytest
import torch

from derive import naming
from derive.build import STYLE_DIRS, build_op
from derive.emit import render_module
from derive.spec import parse_catalog
from derive.testing import autograd_gradients, call_backward, check_tangents, load_module, make_inputs, reference

from conftest import half_by_default

# elementwise bodies of two batched inputs x[...] and s[...], with their torch reference
BODIES = {
    "sum": ("x[...] + s[...]", "(x + s)"),
    "product": ("x[...] * s[...]", "(x * s)"),
    "mixed": ("tanh(x[...]) * s[...] + x[...] - s[...] ** 2", "(torch.tanh(x) * s + x - s ** 2)"),
}
# how a body ends: the equation around it and the reference around its torch expression
ENDINGS = {
    "elementwise": ("y[...] = {body}", "{ref} + torch.zeros(torch.broadcast_shapes(x.shape, s.shape))"),
    "sum": ("loss = sum({body}, ...)", "({ref} + torch.zeros(torch.broadcast_shapes(x.shape, s.shape))).sum()"),
    "mean": ("loss = mean({body}, ...)", "({ref} + torch.zeros(torch.broadcast_shapes(x.shape, s.shape))).mean()"),
    "scaled_sum": ("loss = 3 * sum({body}, ...) + sum(x[...], ...)",
                   "3 * ({ref} + torch.zeros(torch.broadcast_shapes(x.shape, s.shape))).sum()"
                   " + (x + torch.zeros(torch.broadcast_shapes(x.shape, s.shape))).sum()"),
}
# contractions with batch dims: inputs a[..., n, k] and b[..., k]
CONTRACTIONS = {
    "matvec": ("y[..., n] = sum(a[..., n, k] * b[..., k], k)", "torch.matmul(a, b.unsqueeze(-1)).squeeze(-1)"),
    "matvec_sum": ("loss = sum(a[..., n, k] * b[..., k], ..., n, k)", "torch.matmul(a, b.unsqueeze(-1)).sum()"),
    "scaled_rows": ("y[..., n, k] = a[..., n, k] * b[..., k]", "a * b.unsqueeze(-2)"),
    "row_sums": ("y[..., n] = sum(a[..., n, k], k) + sum(b[..., k], k)",
                 "a.sum(-1) + b.sum(-1, keepdim=True)"),
}
# (first input's batch shape, second's): by rank, by size-1 dims, size 0, and equal
# The default run takes one pair per way batch shapes differ (a size-1 dim expanded, a missing leading dim, a
# size-0 broadcast shape); `-m slow` (CI) takes the rest.
# Pairs of batch shapes for (x, s): a dim that broadcasts, ranks that differ, a size 0, and (slow) the rest.
PAIRS = [((2, 1), (2, 5)), ((3, 4), (4,)), ((1, 1), (2, 0)), ((1,), (2, 3)), ((3,), (1,)), ((3,), (3,))]
DEFAULT_PAIRS = 3
STYLES = tuple(STYLE_DIRS)
_WORK = Path(tempfile.mkdtemp(prefix="derive_batch_broadcast_"))


def _toml(name: str, inputs: list[str], equation: str, ref: str) -> str:
    quoted = ", ".join(f'"{i}"' for i in inputs)
    return f'[ops.{name}]\ninputs = [{quoted}]\nequation = "{equation}"\nreference = "{ref}"\n'


SPECS = {f"{body}_{ending}": _toml(f"{body}_{ending}", ["x[...]", "s[...]"], eq.format(body=b), r.format(ref=rr))
         for (body, (b, rr)), (ending, (eq, r)) in itertools.product(BODIES.items(), ENDINGS.items())}
SPECS |= {name: _toml(name, ["a[..., n, k]", "b[..., k]"], eq, r) for name, (eq, r) in CONTRACTIONS.items()}


@functools.cache
def _modules(name: str):
    op = parse_catalog(SPECS[name], "batch.toml").ops[0]
    built = build_op(op)
    modules = {}
    for style in STYLES:
        text = render_module(built.derivation, built.lowered[style], "batch.toml", "derive generate",
                             f"batch_{os.getpid()}_{name}_{style}")
        path = _WORK / f"{name}_{style}.py"
        path.write_text(text)
        modules[style] = load_module(path)
    return op, modules


def _inputs(op, batches):
    names = [t.name for t in op.inputs]
    return make_inputs(op, sizes={"n": 3, "k": 3}, batch_shapes=dict(zip(names, batches)), seed=len(op.name))


def cases():
    """Every spec with every pair; the default run takes each spec with one of the first three pairs, in
    turn (so each of those pairs meets a third of the specs), and `-m slow` (CI) the rest of the product."""
    for position, name in enumerate(sorted(SPECS)):
        for number, pair in enumerate(PAIRS):
            marks = [] if number == position % DEFAULT_PAIRS else [pytest.mark.slow]
            yield pytest.param(name, pair, marks=marks, id=f"{name}-{pair[0]}x{pair[1]}")


@pytest.mark.parametrize("name, batches", half_by_default(list(cases())))     # every other spec; all under -m slow
def test_gradients_are_summed_back_to_each_input_shape(name, batches):
    op, modules = _modules(name)
    inputs = _inputs(op, batches)
    ref = reference(op)
    expected = ref(*inputs)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = autograd_gradients(ref, inputs, grad_output, [True] * len(inputs))
    for style, module in modules.items():
        output = getattr(module, naming.forward(op.name))(*inputs)
        torch.testing.assert_close(output, expected, equal_nan=True, msg=lambda m: f"{style} forward: {m}")
        got = call_backward(op, module, grad_output, inputs, output)
        for tensor, g, w in zip(op.inputs, got, want):
            assert g.shape == w.shape, f"{style} grad_{tensor.name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{style} grad_{tensor.name}: {m}")
        # through the Function and the custom op, with the double backward and forward mode
        for entry in (op.name, naming.custom_op(op.name)):
            got = autograd_gradients(getattr(module, entry), inputs, grad_output, [True] * len(inputs))
            for tensor, g, w in zip(op.inputs, got, want):
                torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{style} {entry} grad_{tensor.name}: {m}")
        leaves = [t.detach().requires_grad_() for t in inputs]
        function = getattr(module, op.name)
        if expected.isfinite().all():    # a mean over no position is NaN, as torch's
            assert torch.autograd.gradcheck(function, leaves)
            assert torch.autograd.gradgradcheck(function, leaves)
        check_tangents(op, module, inputs=inputs, equal_nan=True)


@pytest.mark.parametrize("name", ["sum_mean", "product_sum", "mixed_elementwise"])
def test_no_redundant_reshaping_when_a_term_spans_the_batch(name):
    """A gradient that a term reads grad_<out> (or every batched input) into already has the broadcast
    batch shape: it is summed back without an expand; and no `.expand_as(x).sum_to_size(x.shape)`."""
    op, modules = _modules(name)
    for module in modules.values():
        text = Path(module.__file__).read_text()
        assert ".sum_to_size(x.shape)" in text
        assert ".expand_as(x).sum_to_size" not in text and ".expand_as(s).sum_to_size" not in text
