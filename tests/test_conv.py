"""A convolution's gradients, x[n, c, s*t + d*k - p] * w[o, c, k] summed over c and k (plus b[o]): in the
contraction style one torch.ops.aten.convolution_backward call for all of them, its output mask asking only
for those needed, as autograd's (lower._joint_convolution); any N-d, stride, dilation and zero pad torch's
conv takes, a stride and a dilation both above 1 in every dim included. The broadcast style keeps its
readable windows. Forward, backward (exact shapes), jvp, gradcheck and gradgradcheck against the torch
builtin in float64, in both styles, on lengths the windows fill and do not, size-1 channels, equal sizes.
"""

import inspect

import pytest
import torch

from derive.testing import (check_gradients, check_tangents, gradcheck_op, make_inputs, op_saved_bytes, reference,
                            sizes_for)

from conftest import written_specs


def conv1d(stride: int, dilation: int, pad: int, bias: bool = True) -> str:
    """F.conv1d(x, w, b, stride, padding, dilation) written as its sum."""
    read = " + ".join(([f"{stride}*t"] if stride != 1 else ["t"]) + ([f"{dilation}*k"] if dilation != 1 else ["k"]))
    return ('inputs = ["x[n, c, l]", "w[o, c, k]"' + (', "b[o]"' if bias else '') + ']\n'
            + (f'pad = {{ x = {{ l = {pad} }} }}\n' if pad else '')
            + f'equation = "y[n, o, t] = sum(x[n, c, {read}{f" - {pad}" if pad else ""}] * w[o, c, k], c, k)'
            + (' + b[o]' if bias else '') + '"\n'
            + f'reference = "torch.nn.functional.conv1d(x, w{", b" if bias else ""}, stride={stride}, '
              f'padding={pad}, dilation={dilation})"\n')


SPECS = {
    # F.conv1d(x, w, b, stride=2, dilation=2, padding=2)
    "conv1d_s2_d2_p2": conv1d(2, 2, 2),
    # a "same" conv2d of a 3 x 3 kernel
    "conv2d_same": '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]", "b[o]"]
pad = { x = { h = 1, v = 1 } }
equation = "y[n, o, i, j] = sum(x[n, c, i + p - 1, j + q - 1] * w[o, c, p, q], c, p, q) + b[o]"
reference = "torch.nn.functional.conv2d(x, w, b, padding=1)"
''',
    # a stride and a dilation both above 1 in both dims
    "conv2d_s2_d2": '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]"]
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + 2*p, 2*j + 2*q] * w[o, c, p, q], c, p, q)"
reference = "torch.nn.functional.conv2d(x, w, stride=2, dilation=2)"
''',
}
SLOW_SPECS = {f"conv1d_s{s}_d{d}_p{p}": conv1d(s, d, p) for s in (1, 2, 3) for d in (1, 2) for p in (0, 1, 2)} | {
    "conv1d_no_bias_s2_d3_p1": conv1d(2, 3, 1, bias=False),
    # strides, dilations and pads that differ between the dims, with a bias
    "conv2d_s21_d12_p12": '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]", "b[o]"]
pad = { x = { h = 1, v = 2 } }
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + p - 1, j + 2*q - 2] * w[o, c, p, q], c, p, q) + b[o]"
reference = "torch.nn.functional.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))"
''',
    "conv3d_s2_d2_p1": '''inputs = ["x[n, c, h, v, z]", "w[o, c, p, q, r]", "b[o]"]
pad = { x = { h = 1, v = 1, z = 1 } }
equation = "y[n, o, i, j, m] = sum(x[n, c, 2*i + 2*p - 1, 2*j + 2*q - 1, 2*m + 2*r - 1] * w[o, c, p, q, r], c, p, q, r) + b[o]"
reference = "torch.nn.functional.conv3d(x, w, b, stride=2, padding=1, dilation=2)"
''',
    # channels last and the kernel's dims in another order: the call takes permuted views
    "conv1d_channels_last": '''inputs = ["x[n, l, c]", "w[k, c, o]", "b[o]"]
equation = "y[n, t, o] = sum(x[n, t + k, c] * w[k, c, o], c, k) + b[o]"
reference = "torch.nn.functional.conv1d(x.transpose(1, 2), w.permute(2, 1, 0), b).transpose(1, 2)"
''',
    # no channel and no out-channel index, a stride and a dilation in both dims: dims of 1 in the call
    "conv2d_one_channel_s2_d2": '''inputs = ["x[n, h, v]", "w[p, q]"]
equation = "y[n, i, j] = sum(x[n, 2*i + 2*p, 2*j + 2*q] * w[p, q], p, q)"
reference = "torch.nn.functional.conv2d(x.unsqueeze(1), w[None, None], stride=2, dilation=2).squeeze(1)"
''',
    # no batch index: torch's unbatched conv
    "conv1d_unbatched": '''inputs = ["x[c, l]", "w[o, c, k]", "b[o]"]
equation = "y[o, t] = sum(x[c, 3*t + k] * w[o, c, k], c, k) + b[o]"
reference = "torch.nn.functional.conv1d(x, w, b, stride=3)"
''',
    # a stride and a dilation in both dims, zeros after the input only: grad_x is conv2d_input, not folds
    "conv2d_s2_d2_pad_after": '''inputs = ["x[n, c, h, v]", "w[o, c, p, q]"]
pad = { x = { h = [0, 1], v = [0, 1] } }
equation = "y[n, o, i, j] = sum(x[n, c, 2*i + 2*p, 2*j + 2*q] * w[o, c, p, q], c, p, q)"
reference = "torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, stride=2, dilation=2)"
''',
    # zeros after the input only: no padding torch's conv takes, so the gradients stay the per-input kernels
    "conv1d_pad_after": '''inputs = ["x[n, c, l]", "w[o, c, k]"]
pad = { x = { l = [0, 2] } }
equation = "y[n, o, t] = sum(x[n, c, t + k] * w[o, c, k], c, k)"
reference = "torch.nn.functional.conv1d(torch.nn.functional.pad(x, (0, 2)), w)"
''',
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (op, module), each spec derived and written once."""
    written = written_specs(tmp_path_factory.mktemp("conv"), SPECS | SLOW_SPECS, "conv")
    return lambda name, style="contraction": written(name, style)[:2]


def spatial(op) -> list[str]:
    return [i for i in op.inputs[0].indices if i not in ("n", "c")]


def size_cases(op) -> list[dict[str, int]]:
    """Lengths the windows fill exactly and leave an end unread, size-1 channels, every index one size."""
    names = sizes_for(op)
    return [dict.fromkeys(spatial(op), 9), dict.fromkeys(spatial(op), 10),
            dict.fromkeys(names, 1) | dict.fromkeys(spatial(op), 7),
            dict.fromkeys(names, 3) | dict.fromkeys(spatial(op), 8)]


def some_inputs_need_a_gradient(op, module, sizes):
    """The Function with only some inputs requiring a gradient: the others' are not computed, the rest
    equal autograd of the reference."""
    for wanted in ([True, False, False], [False, True, False], [False, False, True], [True, False, True]):
        inputs = [t.requires_grad_(flag) for t, flag in zip(make_inputs(op, sizes), wanted)]
        grad_y = torch.randn_like(reference(op)(*inputs))
        leaves = [t for t in inputs if t.requires_grad]
        got = torch.autograd.grad(getattr(module, op.name)(*inputs), leaves, grad_y)
        want = torch.autograd.grad(reference(op)(*inputs), leaves, grad_y)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


def double_backward(op, module, sizes):
    inputs = [t.requires_grad_() for t in make_inputs(op, sizes)]
    assert torch.autograd.gradgradcheck(getattr(module, op.name), inputs)


# By default two specs in the contraction style: the one call, its results against autograd of the builtin on one
# length the windows do not fill, with only some gradients asked for, and twice differentiated (the slow run: every
# spec, both styles, every size, gradcheck and jvp).
def test_one_convolution_backward_for_every_gradient(generated):
    """The gradients of x, w and b come from one convolution_backward call with stride, padding and dilation,
    asked for each by its needs_input_grad flag; no per-input kernel, no product of windows; the forward
    takes the bias and the padding in (no second output-sized tensor, no padded copy of x)."""
    op, module = generated("conv1d_s2_d2_p2")
    source = inspect.getsource(getattr(module, f"{op.name}_backward"))
    assert source.count("torch.ops.aten.convolution_backward(grad_y, x, w, [size_o], [2], [2], [2], False, [0], 1, "
                        "[needs_input_grad[0], needs_input_grad[1], needs_input_grad[2]])") == 1
    assert "conv1d_input" not in source and "conv1d_weight" not in source and "unfold" not in source
    forward = inspect.getsource(getattr(module, f"{op.name}_forward"))
    assert "torch.nn.functional.conv1d(x, w, b, stride=2, padding=2, dilation=2)" in forward
    assert "pad(" not in forward
    check_gradients(op, module, sizes={"l": 10})
    some_inputs_need_a_gradient(op, module, {"l": 10})
    double_backward(op, module, {"n": 1, "c": 2, "o": 2, "k": 2, "l": 7})
    _, broadcast = generated("conv1d_s2_d2_p2", "broadcast")
    assert "convolution_backward" not in inspect.getsource(broadcast)


def test_a_stride_and_a_dilation_in_both_dims_is_one_call(generated):
    """Not the fold of grad_y * w over the windows (an N*C*O*T*K product in the second dim)."""
    op, module = generated("conv2d_s2_d2")
    source = inspect.getsource(getattr(module, f"{op.name}_backward"))
    assert "convolution_backward(grad_y, x, w, None, [2, 2], [0, 0], [2, 2]" in source
    assert "unfold_backward" not in source
    check_gradients(op, module, sizes={"h": 10, "v": 9})


@pytest.mark.slow
def test_a_fold_in_both_dims_is_the_input_gradient_kernel(generated):
    """Where no one call applies (zeros after x only), grad_x of a stride and a dilation both above 1 in both
    dims is torch.nn.grad.conv2d_input, cropped or padded, not two folds of an (N, C, O, ...) product."""
    op, module = generated("conv2d_s2_d2_pad_after")
    source = inspect.getsource(getattr(module, f"{op.name}_backward"))
    assert "torch.nn.grad.conv2d_input(" in source and "stride=(2, 2), dilation=(2, 2))" in source
    assert "unfold_backward" not in source and "convolution_backward" not in source


@pytest.mark.slow
@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", list(SPECS | SLOW_SPECS))
def test_every_size(generated, name, style):
    op, module = generated(name, style)
    for sizes in size_cases(op):
        check_gradients(op, module, sizes=sizes)
        check_tangents(op, module, sizes=sizes)
    gradcheck_op(op, module, sizes=size_cases(op)[2])
    small = dict.fromkeys(sizes_for(op), 2) | dict.fromkeys(spatial(op), 6)
    double_backward(op, module, small)
    if len(op.inputs) == 3:
        some_inputs_need_a_gradient(op, module, small)
    if style == "contraction":      # the forward saves what autograd's does, no padded copy of x
        saved, autograd_saved = op_saved_bytes(op, module, make_inputs(op, small))
        assert saved <= autograd_saved, (saved, autograd_saved)
