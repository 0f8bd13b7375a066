"""Contractions inside functions (issue 14, item 2): `softmax(sum(q * k, e) * c, s)`, `tanh(sum(x * w, k))`, ...

A contraction that stands inside a function, in the forward or in a gradient, is bound to a named value
(`contracted_0 = q @ k.mT`, written where it is read when one leaf reads it) and lowered as a term of its own,
never spelled as the broadcast product of all its operands; a softmax VJP whose upstream side is a contraction (attention's `grad_o @ v.mT`) is regrouped
so that the gradient is a contraction of the fused `_softmax_backward_data` with the other operand. The
oracle is autograd of each op's torch reference (float64 gradcheck, float32, every index of one size, of size
1 and of size 0, forward mode); the memory bound is read off the lowered plan: no intermediate of the
contraction style has more dims than the op's largest tensor, none of the broadcast style more than one
contraction spells (one index more). The default run derives attention alone (its plan and code); `-m slow`
runs the rest and the numerical checks.
"""

import dataclasses
import re

import pytest
import torch

import derive.build
import sympy

from derive.functions import free_indices
from derive.lower import Leaf, walk
from derive.naming import STYLE_DIRS, STYLES
from derive.spec import parse_catalog
from conftest import first_by_default
from derive.testing import (built_op, check_gradients, check_tangents, gradcheck_op, load_module, sizes_for,
                            verify_op)

SPEC = """
[ops.attention]
inputs = ["q[b, h, t, e]", "k[b, h, s, e]", "v[b, h, s, d]"]
params = { c = 0.5 }
equation = "o[b, h, t, d] = sum(softmax(sum(q[b, h, t, e] * k[b, h, s, e], e) * c, s) * v[b, h, s, d], s)"
reference = "torch.softmax(q @ k.mT * c, -1) @ v"

[ops.attention_batched]
inputs = ["q[..., t, e]", "k[..., s, e]", "v[..., s, d]"]
equation = "o[..., t, d] = sum(softmax(sum(q[..., t, e] * k[..., s, e], e), s) * v[..., s, d], s)"
reference = "torch.softmax(q @ k.mT, -1) @ v"

[ops.tanh_matmul]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n, m] = tanh(sum(x[n, k] * w[k, m], k))"
reference = "torch.tanh(x @ w)"

[ops.tanh_layers]
inputs = ["x[n, k]", "w[k, m]", "u[m, j]"]
equation = "y[n, j] = sum(tanh(sum(x[n, k] * w[k, m], k)) * u[m, j], m)"
reference = "torch.tanh(x @ w) @ u"

[ops.exp_then_sum]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n] = sum(exp(sum(x[n, k] * w[k, m], k) / 4), m)"
reference = "torch.exp(x @ w / 4).sum(-1)"

[ops.logsumexp_matmul]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n] = logsumexp(sum(x[n, k] * w[k, m], k), m)"
reference = "torch.logsumexp(x @ w, -1)"

[ops.nested_operand]
inputs = ["x[n]", "a[m, n, k]", "b[k]"]
equation = "y[n, m] = x[n] * tanh(sum(a[m, n, k] * b[k], k))"
reference = "x.unsqueeze(1) * torch.tanh(a @ b).T"

[ops.clamped_matmul]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n, m] = Min(sum(x[n, k] * w[k, m], k), 0)"
reference = "torch.minimum(x @ w, torch.zeros_like(x @ w))"

[ops.max_of_matmul]
inputs = ["q[k]", "r[k, j]", "p[m, k]"]
equation = "y = max(sum(erf(q[k]) * sigmoid(r[k, j]) * sigmoid(p[m, k]), k, m), j)"
reference = "torch.amax((torch.erf(q)[:, None, None] * torch.sigmoid(r)[:, :, None] * torch.sigmoid(p).T[:, None, :]).sum(dim=(0, 2)), dim=0)"

[ops.softmax_matmul]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n, m] = softmax(sum(x[n, k] * w[k, m], k), m)"
reference = "torch.softmax(x @ w, -1)"
"""

OPS = ("attention", "attention_batched", "tanh_matmul", "tanh_layers", "exp_then_sum", "logsumexp_matmul",
       "nested_operand", "clamped_matmul", "softmax_matmul")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (spec path, op, module), each op derived once and written once per style."""
    directory = tmp_path_factory.mktemp("inner_contractions")
    spec = directory / "inner.toml"
    spec.write_text(SPEC)
    catalog = parse_catalog(SPEC, str(spec))
    made = {}

    def spec_op_and_module(name: str, style: str):
        if (name, style) not in made:
            one = dataclasses.replace(catalog, ops=(catalog.op(name),))
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(derive.build, "build_op", lambda op, *args: built_op(op))
                files = derive.build.render_catalog(one, (style,), namespace=f"inner_{name}_{style}")
            for path, source in files.items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(source)
            made[name, style] = spec, catalog.op(name), load_module(directory / STYLE_DIRS[style] / f"{name}.py")
        return made[name, style]
    return spec_op_and_module


def materialized(node) -> int:
    """How many dims the largest tensor a node computes has: its result's (an einsum of three or more
    operands takes opt_einsum's pairwise path, tests/test_lowering.py), and for a leaf each sum inside it,
    which the printer spells as the broadcast product of its body."""
    if isinstance(node, Leaf):
        return max([len(node.indices)] + [len(free_indices(s.function)) for s in node.expr.atoms(sympy.Sum)])
    return len(node.indices)


def largest(op, style: str) -> list[tuple[str, int]]:
    """(node, dims) of every node of the lowered op, its bound contractions and shared values included."""
    lowered = built_op(op).lowered[style]
    roots = [t for e in (lowered.forward, *lowered.gradients, *lowered.tangents) for t in e.terms]
    roots += [s.value for s in (*lowered.shared, *lowered.forward_shared, *lowered.tangent_shared)]
    return [(type(node).__name__, materialized(node)) for root in roots for node in walk(root)]


@pytest.mark.parametrize("name", first_by_default(OPS, 1))
def test_no_intermediate_outgrows_the_operands(generated, name):
    """Contraction style: no intermediate has more dims than the op's largest tensor (attention's (B, H, T,
    S, E) scores product inside the softmax is gone); broadcast style: none more than the contraction each product spells (attention's
    gradients were 7-dim products of P, P, grad_o, k and v)."""
    spec, op, _ = generated(name, "contraction")
    rank = max(len(dims) for dims in [t.indices for t in op.inputs] + [op.output_indices])   # `...`: one dim
    # the broadcast style spells each term's contraction as one product: tanh_layers' gradients sum over two
    # indices (m and j of grad_y[n, j] * u[m, j] * w[k, m] * (1 - t**2)[n, m]; the contraction style gives
    # that four-operand einsum to opt_einsum), the others' over one
    for style, bound in (("contraction", rank), ("broadcast", rank + (2 if name == "tanh_layers" else 1))):
        over = [(kind, dims) for kind, dims in largest(op, style) if dims > bound]
        assert not over, f"{name} ({style}): intermediates over {bound} dims: {over}"


def test_attention_is_matrix_products_and_the_fused_softmax_backward(generated):
    """The forward computes P = `softmax(c * (q @ k.mT))` once, saves it (saving.save_reduced_values) and returns
    `P @ v`; the backward computes `grad_o @ v.mT` once (written where it is read, so it is freed as soon as its
    reader is done), the softmax VJP once from P, by `_softmax_backward_data`, then one matrix product per
    gradient, and never the scores again."""
    _, _, module = generated("attention", "contraction")
    source = open(module.__file__).read()
    code = [line.strip() for line in source.splitlines() if not line.strip().startswith(("#", '"'))]
    body = "\n".join(code)
    assert "einsum" not in body and "unsqueeze" not in body, body
    assert "saved_softmax = torch.softmax(c * (q @ k.mT), dim=-1)" in code
    assert "return saved_softmax @ v, saved_softmax" in code
    backward = source[source.index("def attention_backward"):source.index("def attention_jvp")]
    assert backward.count("_softmax_backward_data(grad_o @ v.mT, saved_softmax") == 1, backward
    assert backward.count("q @ k.mT") == 0, backward
    assert re.search(r"grad_q = c \* \(shared_\d @ k\)", backward), backward
    assert re.search(r"grad_k = c \* \(shared_\d\.mT @ q\)", backward), backward


def test_a_contracted_value_is_read_in_the_dims_it_comes_out_in(generated):
    """sum(a[m, n, k] * b[k], k) comes out as (m, n), a's order, where the op's order is (n, m): the leaf reads
    it so (the fuzzer found it reading (n, m) as a permuted access of an (m, n) tensor)."""
    _, op, module = generated("nested_operand", "contraction")
    check_gradients(op, module)


def test_a_reduction_of_a_value_written_where_it_is_read_binds_to_all_of_it(generated):
    """max over j of a contraction written in place: `(a @ b).amax(0)`, never `a @ b.amax(0)` (the CI fuzz campaign
    found the forward reducing one operand)."""
    _, op, module = generated("max_of_matmul", "contraction")
    source = open(module.__file__).read()
    assert ").amax(0)" in source and "@ torch.sigmoid(r).amax(0)" not in source, source
    check_gradients(op, module)
    check_tangents(op, module)


def test_a_value_written_where_it_is_read_lends_a_tensor_its_dtype(generated):
    """Min(x @ w, 0) reads the product once, so it is written there: the 0 takes its dtype and device from x
    (the fuzzer found `contracted_0.new_tensor(0)` with no contracted_0 defined)."""
    _, op, module = generated("clamped_matmul", "contraction")
    source = open(module.__file__).read()
    assert "torch.minimum(x @ w, x.new_tensor(0))" in source, source
    check_gradients(op, module)


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_attention_matches_autograd(generated, style):
    """The default run's oracle for the issue's op: gradcheck, float32, every index of one size, of size 1 and
    of size 0, and forward mode, in both styles."""
    _, op, module = generated("attention", style)
    gradcheck_op(op, module)
    check_gradients(op, module, torch.float32)
    for size in (3, 1, 0):
        check_gradients(op, module, sizes=dict.fromkeys(sizes_for(op), size), equal_nan=size == 0)
    check_tangents(op, module)


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", OPS)
def test_each_op_verifies(generated, name, style):
    """verify_op (gradcheck, float64 and float32, params, equal sizes, the Function's gradgradcheck, the custom
    op, forward mode), then every index of size 1 and of size 0."""
    spec, op, module = generated(name, style)
    verify_op(spec, name, module.__file__)
    for size in (1, 0):
        check_gradients(op, module, sizes=dict.fromkeys(sizes_for(op), size), equal_nan=size == 0)
        check_tangents(op, module, sizes=dict.fromkeys(sizes_for(op), size), equal_nan=size == 0)
