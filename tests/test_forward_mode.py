"""Forward mode: the Jacobian-vector product derived from the same partial derivatives as the gradients.

Oracles: torch.func.jvp of the op's torch reference and of the generated forward (plain torch ops,
whose forward-mode formulas are torch's own), and reverse mode (jacfwd against jacrev).
"""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from derive import naming
from derive.build import STYLE_DIRS, render_catalog
from derive.spec import load_catalog
from derive.testing import check_tangents, load_module, make_inputs, nonempty_sizes, reference

from conftest import CATALOG, KINK_OPS, OPS, first_by_default, generated_module


def differentiable_positions(op):
    return [p for p, meta in enumerate(op.inputs) if meta.differentiable]


def random_tangents(op, inputs, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(inputs[p].shape, generator=generator, dtype=inputs[p].dtype)
            for p in differentiable_positions(op)]


def in_differentiable(op, function, inputs):
    """`function` as a function of the op's differentiable inputs alone, the others fixed."""
    positions = differentiable_positions(op)

    def restricted(*values):
        arguments = list(inputs)
        for p, value in zip(positions, values):
            arguments[p] = value
        return function(*arguments)
    return restricted, tuple(inputs[p] for p in positions)


@pytest.mark.parametrize("style", list(STYLE_DIRS))
@pytest.mark.parametrize("op_name", OPS)
def test_jvp_through_the_function_matches_the_reference(op_name, style):
    op = CATALOG.op(op_name)
    check_tangents(op, generated_module(op_name, style))


@pytest.mark.parametrize("op_name", KINK_OPS)
def test_jvp_at_kinks_matches_the_reference(op_name):
    op = CATALOG.op(op_name)
    check_tangents(op, generated_module(op_name), kinks=True)


# the generated forward itself is NaN there (a mean over no rows) where F.cross_entropy gives 0
EMPTY_FORWARD_DIFFERS = {"cross_entropy_probs"}
# the torch reference refuses 0 channels (F.conv1d, F.conv2d: 0 out-channels; F.avg_pool1d: 0 channels)
EMPTY_REFUSED_BY_TORCH = {"conv1d", "conv2d", "avg_pool1d"}


@pytest.mark.parametrize("op_name, size", [
    pytest.param(op.name, size, marks=[pytest.mark.xfail(strict=True, reason="the forward differs from the "
                                                         "reference at size 0")]
                 if size == 0 and op.name in EMPTY_FORWARD_DIFFERS else
                 [pytest.mark.xfail(strict=True, raises=RuntimeError, reason="the reference refuses 0 channels")]
                 if size == 0 and op.name in EMPTY_REFUSED_BY_TORCH else [])
    for op in CATALOG.ops if not any(t.integer for t in op.inputs) for size in (0, 1)
    if not (size == 0 and nonempty_sizes(op))])     # a max over nothing raises, in torch.amax too
def test_jvp_with_every_size_equal(op_name, size):
    """All index sizes equal (0: a mean over nothing is NaN, in the oracles too)."""
    op = CATALOG.op(op_name)
    check_tangents(op, generated_module(op_name), sizes={r: size for r in dict(op.index_sizes).values()},
                   equal_nan=size == 0)


@pytest.mark.parametrize("op_name", [op.name for op in CATALOG.ops if op.params])
def test_jvp_with_other_params(op_name):
    op = CATALOG.op(op_name)
    check_tangents(op, generated_module(op_name), params={p.name: 1.5 * p.default + 0.25 for p in op.params})


@pytest.mark.parametrize("op_name", OPS)
def test_jacfwd_equals_jacrev(op_name):
    op = CATALOG.op(op_name)
    function, primals = in_differentiable(op, getattr(generated_module(op_name), op_name),
                                          make_inputs(op, sizes={size: 2 for size in dict(op.index_sizes).values()}))
    argnums = tuple(range(len(primals)))
    forward = torch.func.jacfwd(function, argnums=argnums)(*primals)
    backward = torch.func.jacrev(function, argnums=argnums)(*primals)
    for got, want in zip(forward, backward):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op_name", OPS)
def test_dual_tensors_through_the_function(op_name):
    op = CATALOG.op(op_name)
    module = generated_module(op_name)
    inputs = make_inputs(op)
    tangents = random_tangents(op, inputs)
    _, expected = torch.func.jvp(*in_differentiable(op, reference(op), inputs), tuple(tangents))
    with forward_ad.dual_level():
        duals = list(inputs)
        for p, tangent in zip(differentiable_positions(op), tangents):
            duals[p] = forward_ad.make_dual(inputs[p], tangent)
        got = forward_ad.unpack_dual(getattr(module, op_name)(*duals)).tangent
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op_name", ["tanh", "softmax", "log_softmax", "cross_entropy", "layer_norm", "mse",
                                     "linear", "binary_cross_entropy_with_logits", "gelu"])
def test_hessian_matches_the_reference(op_name):
    """jacfwd over jacrev: forward mode through the Function's backward, and its jvp."""
    op = CATALOG.op(op_name)
    module = generated_module(op_name)
    inputs = make_inputs(op, sizes={size: 2 for size in dict(op.index_sizes).values()})
    weights = torch.randn(reference(op)(*inputs).shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
    first = differentiable_positions(op)[0]

    def scalar(function):
        def value(x):
            arguments = list(inputs)
            arguments[first] = x
            return (function(*arguments) * weights).sum()
        return value
    got = torch.func.hessian(scalar(getattr(module, op_name)))(inputs[first])
    expected = torch.func.hessian(scalar(reference(op)))(inputs[first])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op_name", OPS)
def test_custom_op_never_returns_a_zero_tangent(op_name):
    """torch.library has no forward mode for a custom op: it dropped the tangents and returned zeros."""
    op = CATALOG.op(op_name)
    custom_op = getattr(generated_module(op_name), naming.custom_op(op_name))
    inputs = make_inputs(op)
    tangents = random_tangents(op, inputs)
    message = rf"{naming.custom_op(op_name)}: forward-mode AD .* call {op_name}\(\)"
    with pytest.raises(NotImplementedError, match=message):
        torch.func.jvp(*in_differentiable(op, custom_op, inputs), tuple(tangents))
    with pytest.raises(NotImplementedError, match=message):
        torch.func.jacfwd(*in_differentiable(op, custom_op, inputs)[:1])(*in_differentiable(op, custom_op, inputs)[1])
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=message):
        duals = list(inputs)
        p = differentiable_positions(op)[0]
        duals[p] = forward_ad.make_dual(inputs[p], tangents[0])
        custom_op(*duals)
    # reverse mode through the custom op is torch.library's own, as before
    leaves = [t.clone().requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    custom_op(*leaves).sum().backward()
    expected = [t.clone().requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    reference(op)(*expected).sum().backward()
    for got, want in zip(leaves, expected):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad)


# --- invented specs: equal sizes for different indices catch a transposed or misplaced tangent -------

INVENTED = """
[ops.tanh_dense]
inputs = ["x[n, k]", "w[k, m]"]
equation = "y[n, m] = sum(tanh(x[n, k]) * w[k, m], k)"
reference = "torch.tanh(x) @ w"

[ops.dense_transposed]
inputs = ["x[n, k]", "w[m, k]", "b[m]"]
equation = "y[n, m] = sum(x[n, k] * w[m, k], k) + b[m]"
reference = "x @ w.T + b"

[ops.swap_scale]
inputs = ["x[j, i]", "s[i]"]
equation = "y[i, j] = x[j, i] * s[i]"
reference = "x.T * s.unsqueeze(1)"

[ops.squares_dense]
inputs = ["x[n, k]", "w[m, k]"]
equation = "y[n, m] = sum(x[n, k] ** 2 * w[m, k], k)"
reference = "(x ** 2) @ w.T"

[ops.weighted_exp_total]
inputs = ["x[n, k]", "w[k]"]
equation = "loss = sum(w[k] * exp(x[n, k]), n, k)"
reference = "(w * torch.exp(x)).sum()"

[ops.scaled_gather]
inputs = ["table[v, d]", "idx[n]", "s[d]"]
integer = ["idx"]
equation = "y[n, d] = table[idx[n], d] * s[d]"
reference = "table[idx] * s"

[ops.scalar_scale]
inputs = ["x[n, k]", "s"]
equation = "y[k, n] = x[n, k] * s ** 2"
reference = "x.T * s ** 2"

[ops.softmax_first_dim]
inputs = ["x[c, n]"]
equation = "y[c, n] = exp(x[c, n]) / sum(exp(x[c, n]), c)"
reference = "torch.softmax(x, 0)"

[ops.bilinear]
inputs = ["x[n, i]", "a[i, j]", "z[n, j]"]
equation = "y[n] = sum(x[n, i] * a[i, j] * z[n, j], i, j)"
reference = "((x @ a) * z).sum(1)"

[ops.shift]
inputs = ["x[n, k]", "s"]
equation = "y[n, k] = x[n, k] + s"
reference = "x + s"

[ops.broadcast_sum]
inputs = ["x[...]", "w[...]"]
equation = "y[...] = x[...] + sin(w[...])"
reference = "x + torch.sin(w)"
"""


@pytest.fixture(scope="module")
def invented(tmp_path_factory):
    """The invented catalog, generated in both styles (custom ops in a namespace of their own)."""
    directory = tmp_path_factory.mktemp("forward_mode")
    spec = directory / "invented.toml"
    spec.write_text(INVENTED)
    catalog = load_catalog(spec)
    for path, text in render_catalog(catalog, namespace="derive_forward_mode_test").items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(text)
    return catalog, directory


# The broadcast style under `-m slow` (CI).
@pytest.mark.parametrize("style", first_by_default(list(STYLE_DIRS), 1))
@pytest.mark.parametrize("op_name", ["tanh_dense", "dense_transposed", "swap_scale", "squares_dense",
                                     "weighted_exp_total", "scaled_gather", "scalar_scale", "softmax_first_dim",
                                     "bilinear", "shift", "broadcast_sum"])
@pytest.mark.parametrize("size", [3, 1])
def test_invented_specs_with_equal_sizes(invented, op_name, style, size):
    catalog, directory = invented
    op = catalog.op(op_name)
    module = load_module(directory / STYLE_DIRS[style] / f"{op_name}.py")
    check_tangents(op, module, sizes={representative: size for representative in dict(op.index_sizes).values()})
    # jacfwd vmaps the generated jvp; the reference's reverse mode is the oracle (the generated backward
    # has tests of its own)
    inputs = make_inputs(op, sizes={r: size for r in dict(op.index_sizes).values()})
    function, primals = in_differentiable(op, getattr(module, op_name), inputs)
    oracle, _ = in_differentiable(op, reference(op), inputs)
    argnums = tuple(range(len(primals)))
    for got, want in zip(torch.func.jacfwd(function, argnums=argnums)(*primals),
                         torch.func.jacrev(oracle, argnums=argnums)(*primals)):
        torch.testing.assert_close(got, want)


def test_batch_dims_that_broadcast(invented):
    """A share that reads only one input's batch dims is expanded to the broadcast result's shape."""
    catalog, directory = invented
    op = catalog.op("broadcast_sum")
    module = load_module(directory / "broadcast_sum.py")
    x, w = make_inputs(op, batch_shapes={"x": (2, 1), "w": (3,)})
    tangent_x = torch.randn_like(x)
    share = module.broadcast_sum_jvp(x, w, tangent_x, None)
    _, expected = torch.func.jvp(lambda x: module.broadcast_sum_forward(x, w), (x,), (tangent_x,))
    assert share.shape == (2, 3)
    torch.testing.assert_close(share, expected)
    check_tangents(op, module, inputs=[x, w])
