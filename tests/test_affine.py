"""Affine subscripts: convolutions and pooling written as index expressions, x[n, c, 2*t + k - 1].

A generator writes conv1d specs over strides, dilations, zero padding and kernel sizes, pooling specs with
a size set by `sizes`, and conv2d, each beside its torch.nn.functional reference. The size of `t` is never
declared: range inference gives it. The generated forward, backward (exact shapes), double backward and
jvp must equal autograd of the reference in float64, in both styles, for sizes that collide (every index
equal, size 1, a kernel as long as the input); an input too short for the reads is a one-line error, as
torch's is.
"""


import pytest
import torch

from derive.errors import SpecError
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, gradcheck_op, sizes_for

from conftest import written_specs


def conv1d(stride: int, dilation: int, padding: int, bias: bool = False) -> str:
    """y = F.conv1d(x, w, stride=, dilation=, padding=), written with an affine subscript."""
    subscript = f"{stride}*t + {dilation}*k" + (f" - {padding}" if padding else "")
    pad = f"pad = {{ x = {{ l = {padding} }} }}\n" if padding else ""
    return (f'inputs = ["x[n, c, l]", "w[o, c, k]"{", " + chr(34) + "b[o]" + chr(34) if bias else ""}]\n{pad}'
            f'equation = "y[n, o, t] = sum(x[n, c, {subscript}] * w[o, c, k], c, k){" + b[o]" if bias else ""}"\n'
            f'reference = "torch.nn.functional.conv1d(x, w{", b" if bias else ""}, stride={stride}, '
            f'dilation={dilation}, padding={padding})"\n')


def avg_pool1d(size: int, stride: int) -> str:
    return (f'inputs = ["x[n, c, l]"]\nsizes = {{ k = {size} }}\n'
            f'equation = "y[n, c, t] = mean(x[n, c, {stride}*t + k], k)"\n'
            f'reference = "torch.nn.functional.avg_pool1d(x, {size}, {stride})"\n')


CONV2D = '''
inputs = ["x[n, c, h, v]", "w[o, c, p, q]"]
pad = { x = { h = 1, v = [0, 1] } }
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + p - 1, j + q] * w[o, c, p, q], c, p, q)"
reference = "torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 1, 1)), w, stride=(2, 1))"
'''

# the issue's own spellings, a "same" convolution (odd kernel, padding (K - 1) / 2 at both ends) and an
# affine read that is not a convolution: a shift with zeros (x[l - 1], the first entry 0)
SPECS = {
    "conv1d": conv1d(1, 1, 0, bias=True),
    "conv1d_stride2": conv1d(2, 1, 0),
    "conv1d_same": conv1d(1, 1, 1),
    "avg_pool1d": avg_pool1d(2, 2),
    "shift": '''
inputs = ["x[n, l]", "s[l]"]
pad = { x = { l = [1, 0] } }
equation = "y[n, l] = x[n, l - 1] * s[l]"
reference = "torch.nn.functional.pad(x, (1, 0))[:, :-1] * s"
''',
}
# (the catalog's conv2d runs by default, in the catalog's tests)
SLOW_SPECS = {"conv1d_dilation2": conv1d(1, 2, 0), "conv2d_strided_padded": CONV2D} | {
    f"conv1d_s{stride}_d{dilation}_p{padding}": conv1d(stride, dilation, padding)
    for stride in (1, 2, 3) for dilation in (1, 2) for padding in (0, 1, 2) if stride == 1 or dilation == 1
} | {f"avg_pool1d_k{size}_s{stride}": avg_pool1d(size, stride) for size in (1, 2, 3) for stride in (1, 2, 3)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (op, module), each spec derived and written once."""
    written = written_specs(tmp_path_factory.mktemp("affine"), SPECS | SLOW_SPECS, "affine")
    return lambda name, style="contraction": written(name, style)[:2]


def check(op, module, sizes=None):
    check_gradients(op, module, sizes=sizes)
    check_tangents(op, module, sizes=sizes)


# Each spec in one style by default, the styles alternating; `-m slow` (CI) takes the other style too.
@pytest.mark.parametrize("name, style", [
    pytest.param(name, style, marks=[] if (position + number) % 2 == 0 else [pytest.mark.slow])
    for position, name in enumerate(SPECS) for number, style in enumerate(["contraction", "broadcast"])])
def test_matches_the_reference(generated, name, style):
    op, module = generated(name, style)
    gradcheck_op(op, module)
    check(op, module)
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 3))   # every index one size (the input grows)
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 1))   # size 1


@pytest.mark.parametrize("name", ["conv1d", "conv1d_same"])
def test_double_backward_through_the_function(generated, name):
    op, module = generated(name)
    x, w, *rest = [torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(4, 3, 3, dtype=torch.float64),
                   torch.randn(4, dtype=torch.float64)][:len(op.inputs)]
    inputs = [t.requires_grad_() for t in (x, w, *rest)]
    assert torch.autograd.gradgradcheck(getattr(module, op.name), inputs)


@pytest.mark.parametrize("kernel", range(1, 6))
def test_every_kernel_size_up_to_the_input(generated, kernel):
    """K from 1 to L = 5: the inferred size L - K + 1 runs down to 1."""
    op, module = generated("conv1d")
    check(op, module, sizes={"k": kernel, "l": 5})


def test_inferred_size_is_read_off_the_inputs(generated):
    op, module = generated("conv1d_stride2")
    x, w = torch.randn(2, 3, 9), torch.randn(4, 3, 3)
    assert module.conv1d_stride2_forward(x, w).shape == (2, 4, 4)      # (9 - 3) // 2 + 1
    assert dict(op.inferred_sizes)["t"] is not None


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
def test_an_input_too_short_for_the_reads_is_an_error(generated, style):
    """L < K: torch refuses, and so does the contract, naming the op and the read."""
    op, module = generated("conv1d_stride2", style)
    x, w = torch.randn(2, 3, 2), torch.randn(4, 3, 3)
    with pytest.raises(RuntimeError):
        torch.nn.functional.conv1d(x, w, stride=2)
    with pytest.raises(RuntimeError, match=r"conv1d_stride2: the size of index t inferred from "
                                           r"x\[n, c, k \+ 2\*t\].* is below 1.*size_l = 2"):
        module.conv1d_stride2_forward(x, w)


def test_grad_output_of_another_size_is_an_error(generated):
    op, module = generated("conv1d")
    x, w, b = torch.randn(2, 3, 6), torch.randn(4, 3, 3), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"conv1d: grad_y has size 5 at dim 2 \(index t\) but the size inferred "
                                           r"for t is size_l \+ 1 - size_k \(size_k = 3, size_l = 6"):
        module.conv1d_backward(torch.randn(2, 4, 5), x, w, b)


def test_the_gradient_of_an_affine_read_is_a_gather(generated):
    """d x[n, c, t + k] / d x[n', c', l'] is a delta solved for k = l - t: grad_x reads w at l - t
    (or grad_y at l - k), never a one-hot of (l, t, k); pooling keeps k's range as in_range(l - 2*t, 2)."""
    from derive.pipeline import build_op
    op, _ = generated("conv1d")
    gradient = build_op(op, ("contraction",)).derivation.gradients[0]
    assert "KroneckerDelta" not in str(gradient.vjp)
    assert "grad_y[n, o, -k + l]" in str(gradient.vjp)
    op, _ = generated("avg_pool1d")
    assert "in_range(l - 2*t, size_k)" in str(build_op(op, ("contraction",)).derivation.gradients[0].vjp)


@pytest.mark.parametrize("equation, keys, problem", [
    ("y[n, t] = sum(x[n, t * k], k)", 'sizes = { k = 2 }', "a product of two indices is not"),
    ("y[n, t] = sum(x[n, t + k], k)", 'sizes = { l = 2 }', "a dim of input 'x'"),
    ("y[n, t] = sum(x[n, t + k], k)", 'sizes = { k = 0 }', "whole number from 1"),
    ("y[n, t] = sum(x[n, t + k], k)", 'sizes = { k = 2, m = 3 }', "does not use"),
    ("y[n, t] = sum(x[n, t - k], k)", 'sizes = { k = 2 }', "reads below 0 of x"),
    ("y[n, t] = sum(x[n, t + k], k)", 'pad = { x = { q = 1 } }', "not a dim of"),
    ("y[n, t] = sum(x[n, t + k], k)", 'pad = { x = { l = -1 } }', "number of zeros"),
    ("y[n, t] = x[n, 2 * t] * x[n, t - t + 1]", '', "is a constant"),
    ("y[n, t, s] = x[n, t + s]", '', "cannot be inferred"),
    ("y[n] = x[n, n + 1]", '', "two of its subscripts"),
])
def test_bad_affine_specs_are_one_line_errors(equation, keys, problem):
    text = f'[ops.bad]\ninputs = ["x[n, l]"]\n{keys}\nequation = "{equation}"\nreference = "x"\n'
    with pytest.raises(SpecError, match=problem) as error:
        parse_catalog(text, "bad.toml")
    assert "bad" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", SLOW_SPECS)
def test_strides_dilations_padding_and_pools(generated, name, style):
    op, module = generated(name, style)
    gradcheck_op(op, module)
    check(op, module)
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 2))
