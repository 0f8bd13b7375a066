"""A stride and a dilation both above 1 in one affine read, x[n, c, 2*t + 2*k] (F.conv1d(x, w, stride=2,
dilation=2), F.max_pool1d(x, 2, 2, dilation=2)): no summed index has the step 1 that solving the gradient's
delta for it needs, so the gradient folds the values over the windows back onto the positions they read
(fold_window: the taps d apart, then unfold_backward; a max's share at the saved argmax, d apart from s*t).
Forward, backward (exact shapes), jvp and gradcheck must equal autograd of the torch builtin in float64 in
both styles, on lengths the windows fill exactly and not, every index one size, size 1, and ties.
"""

import pytest
import torch

from derive.testing import (check_gradients, check_tangents, gradcheck_op, kink_inputs, make_inputs,
                            sizes_for)

from conftest import written_specs


def conv1d(stride: int, dilation: int) -> str:
    return ('inputs = ["x[n, c, l]", "w[o, c, k]"]\n'
            f'equation = "y[n, o, t] = sum(x[n, c, {stride}*t + {dilation}*k] * w[o, c, k], c, k)"\n'
            f'reference = "torch.nn.functional.conv1d(x, w, stride={stride}, dilation={dilation})"\n')


def max_pool1d(size: int, stride: int, dilation: int) -> str:
    return (f'inputs = ["x[n, c, l]"]\nsizes = {{ k = {size} }}\n'
            f'equation = "y[n, c, t] = max(x[n, c, {stride}*t + {dilation}*k], k, tie=\\"first\\")"\n'
            f'reference = "torch.nn.functional.max_pool1d(x, {size}, {stride}, dilation={dilation})"\n')


CONV2D = '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]"]
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + p, j + 2*q] * w[o, c, p, q], c, p, q)"
reference = "torch.nn.functional.conv2d(x, w, stride=(2, 1), dilation=(1, 2))"
'''
CONV2D_BOTH = '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]"]
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + 2*p, 3*j + 2*q] * w[o, c, p, q], c, p, q)"
reference = "torch.nn.functional.conv2d(x, w, stride=(2, 3), dilation=2)"
'''

# zeros after x only, which torch's conv cannot pad: no one convolution_backward (test_conv.py), each gradient its own
PAD_AFTER = conv1d(2, 2).replace("conv1d(x, w,", "conv1d(torch.nn.functional.pad(x, (0, 1)), w,") + \
    "pad = { x = { l = [0, 1] } }\n"
SPECS = {"conv1d_s2_d2": conv1d(2, 2), "max_pool1d_k2_s2_d2": max_pool1d(2, 2, 2), "conv1d_s2_d2_pad_after": PAD_AFTER}
SLOW_SPECS = {"conv2d_s21_d12": CONV2D, "conv2d_s23_d2": CONV2D_BOTH} | {
    f"conv1d_s{s}_d{d}": conv1d(s, d) for s in (2, 3) for d in (2, 3)} | {
    f"max_pool1d_k{k}_s{s}_d{d}": max_pool1d(k, s, d) for k in (1, 2, 3) for s in (2, 3) for d in (2, 3)} | {
    # ties split evenly, as amax's
    "max_split_k2_s2_d2": 'inputs = ["x[n, c, l]"]\nsizes = { k = 2 }\n'
                          'equation = "y[n, c, t] = max(x[n, c, 2*t + 2*k], k)"\n'
                          'reference = "x.unfold(2, 3, 2)[:, :, :, ::2].amax(-1)"\n'}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (op, module), each spec derived and written once."""
    written = written_specs(tmp_path_factory.mktemp("stride"), SPECS | SLOW_SPECS, "stride")
    return lambda name, style="contraction": written(name, style)[:2]


def check(op, module, sizes=None):
    gradcheck_op(op, module, sizes=sizes)
    check_gradients(op, module, sizes=sizes)
    check_tangents(op, module, sizes=sizes)
    if len(op.inputs) == 1:    # a pool: exact ties inside windows, the gradient to the first maximum
        (x,), _ = kink_inputs(op, make_inputs(op, sizes, dtype=torch.float64, seed=0),
                              generator=torch.Generator().manual_seed(0))
        check_gradients(op, module, inputs=[x])


def run(op, module):
    spatial = [i for i in sizes_for(op) if i in ("l", "h", "v")]
    check(op, module)
    check(op, module, sizes=dict.fromkeys(spatial, 10))
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 1) | dict.fromkeys(spatial, 7))   # size-1 channels
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 3) | dict.fromkeys(spatial, 8))   # equal sizes
    for length in (9, 10):      # the windows fill the input exactly or leave its end unread
        check(op, module, sizes=dict.fromkeys(spatial, length))


# By default each spec in one style, forward and gradients against autograd on one length the windows do not
# fill (10: with K = 4, s = d = 2 the last position is never read; ties for the pool); `-m slow` (CI) runs
# gradcheck and jvp too, in both styles, on every size below.
@pytest.mark.parametrize("name, style", [("conv1d_s2_d2", "contraction"), ("max_pool1d_k2_s2_d2", "broadcast")])
def test_matches_the_reference_on_a_length_the_windows_do_not_fill(generated, name, style):
    op, module = generated(name, style)
    check_gradients(op, module, sizes={"l": 10})
    if len(op.inputs) == 1:
        (x,), _ = kink_inputs(op, make_inputs(op, {"l": 10}, dtype=torch.float64, seed=0),
                              generator=torch.Generator().manual_seed(0))
        check_gradients(op, module, inputs=[x])


@pytest.mark.slow
@pytest.mark.parametrize("name, style", [(name, style) for name in SPECS for style in ("contraction", "broadcast")])
def test_matches_the_reference(generated, name, style):
    run(*generated(name, style))


@pytest.mark.slow
@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", SLOW_SPECS)
def test_every_stride_and_dilation(generated, name, style):
    run(*generated(name, style))


def test_double_backward_through_the_function(generated):
    op, module = generated("conv1d_s2_d2")
    inputs = [torch.randn(1, 2, 8, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradgradcheck(getattr(module, op.name), inputs)


@pytest.mark.slow    # (a convolution torch's conv can pad is one convolution_backward: test_conv.py, by default)
def test_grad_x_is_pytorchs_input_gradient_in_the_contraction_style(generated):
    """The fold of grad_y * w summed over o is conv1d_input with the stride and the dilation, no (N, C, O, T, K)
    product; the broadcast style keeps the readable fold."""
    import inspect
    op, module = generated("conv1d_s2_d2_pad_after")
    assert "torch.nn.grad.conv1d_input((size_n, size_c, " in inspect.getsource(module)
    assert "stride=2, dilation=2)" in inspect.getsource(module)
    check_gradients(op, module, sizes={"l": 10})
    _, broadcast = generated("conv1d_s2_d2", "broadcast")
    assert "unfold_backward" in inspect.getsource(broadcast)
