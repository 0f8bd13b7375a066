"""Max and min pooling: a max or min reduction over an affine read, max(x[n, c, s*t + k], k, tie=...).

The gradient of such a max cannot solve the window's position k = l - s*t inside the share (which looks
along k): derivation folds the share back onto x with the adjoint of the window's unfold (fold_window,
printed as aten.unfold_backward). tie="first" must equal F.max_pool1d (the whole gradient to the first
maximum of each window), the default even split must equal autograd of unfold(...).amax(-1); both on
inputs with exact ties inside windows (kink_inputs), for kernel sizes 1 to 3 and strides 1 to 3 (the
windows overlap, touch or leave gaps), size 1 and every index equal, in both styles, and through the
Function's double backward.
"""

from pathlib import Path

import pytest
import torch

from derive.spec import parse_catalog
from derive.testing import (autograd_gradients, check_gradients, check_tangents, gradcheck_op, kink_inputs,
                            load_module, make_inputs, reference, sizes_for)

from conftest import written_specs


def pool(size: int, stride: int, tie: str, largest: bool = True) -> str:
    """max (min) over windows of `size` every `stride`, beside its torch reference."""
    function = "max" if largest else "min"
    tied = ', tie=\\"first\\"' if tie == "first" else ""
    if tie == "first":
        reference = f"torch.nn.functional.max_pool1d({'x' if largest else '-x'}, {size}, {stride})"
        reference = reference if largest else f"-{reference}"
    else:
        reference = f"x.unfold(2, {size}, {stride}).{'amax' if largest else 'amin'}(-1)"
    return (f'inputs = ["x[n, c, l]"]\nsizes = {{ k = {size} }}\n'
            f'equation = "y[n, c, t] = {function}(x[n, c, {stride}*t + k], k{tied})"\n'
            f'reference = "{reference}"\n')


SPECS = {
    "max_pool_first": pool(2, 2, "first"),                          # F.max_pool1d(x, 2)
    "min_pool_k3_s1_split": pool(3, 1, "split", largest=False),     # overlapping windows
}
SLOW_SPECS = {f"{'max' if largest else 'min'}_pool_k{size}_s{stride}_{tie}": pool(size, stride, tie, largest)
              for size in (1, 2, 3) for stride in (1, 2, 3) for tie in ("first", "split") for largest in (True, False)} | {
    "max_pool_k2_d2_first": 'inputs = ["x[n, c, l]"]\nsizes = { k = 2 }\n'
                            'equation = "y[n, c, t] = max(x[n, c, t + 2*k], k, tie=\\"first\\")"\n'
                            'reference = "torch.nn.functional.max_pool1d(x, 2, 1, dilation=2)"\n'}


def parsed(name):
    return parse_catalog(f"[ops.{name}]\n{(SPECS | SLOW_SPECS)[name]}", f"{name}.toml").op(name)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (op, module), each spec derived and written once."""
    written = written_specs(tmp_path_factory.mktemp("max_pool"), SPECS | SLOW_SPECS, "max_pool")
    return lambda name, style="contraction": written(name, style)[:2]


def tied(op, sizes=None, seed=0):
    """Random inputs with exact ties inside windows, and how many windows have several extremal entries."""
    (x,), placements = kink_inputs(op, make_inputs(op, sizes, dtype=torch.float64, seed=seed),
                                   generator=torch.Generator().manual_seed(seed))
    size = dict(op.fixed_sizes)["k"]
    stride = int(op.rhs.args[0].indices[2].coeff(op.rhs.args[1]))
    windows = x.unfold(2, size, stride)
    extremum = windows.amax(-1, keepdim=True) if op.rhs.largest else windows.amin(-1, keepdim=True)
    return x, int(((windows == extremum).sum(-1) >= 2).sum())


def check(op, module, sizes=None):
    x, _ = tied(op, sizes)
    gradcheck_op(op, module, sizes=sizes)
    check_gradients(op, module, sizes=sizes)
    check_gradients(op, module, inputs=[x])
    check_tangents(op, module, sizes=sizes)


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", SPECS)
def test_matches_the_reference_with_ties_in_windows(generated, name, style):
    op, module = generated(name, style)
    check(op, module)
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 1))   # size 1 (the length grows to two windows)


@pytest.mark.parametrize("name", SPECS)
def test_tie_inputs_put_several_extrema_in_windows(generated, name):
    _, windows_tied = tied(parsed(name))
    assert windows_tied >= 3


@pytest.mark.parametrize("name, other", [("max_pool_first", "max_pool_k2_s2_split"),
                                         ("min_pool_k3_s1_split", "min_pool_k3_s1_first")])
def test_the_other_convention_differs_at_ties(generated, name, other):
    """The tie inputs tell the two conventions apart: the gradient of one is not the other's reference."""
    op, module = generated(name)
    other_op = parsed(other)
    x, _ = tied(op)
    grad_y = torch.randn(reference(op)(x).shape, dtype=torch.float64)
    (own,) = autograd_gradients(getattr(module, op.name), [x], grad_y, [True])
    (want,) = autograd_gradients(reference(op), [x], grad_y, [True])
    (others,) = autograd_gradients(reference(other_op), [x], grad_y, [True])
    torch.testing.assert_close(own, want)
    assert not torch.allclose(own, others)


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", SPECS)
def test_double_backward_through_the_function(generated, name, style):
    op, module = generated(name, style)
    x = make_inputs(op, {"n": 2, "c": 3, "l": 7}, dtype=torch.float64)[0].requires_grad_()
    assert torch.autograd.gradgradcheck(getattr(module, op.name), [x])


def test_gradient_goes_to_the_first_maximum_as_max_pool1d():
    x = torch.tensor([[[1.0, 1.0, 2.0, 2.0, 0.0, 3.0, 3.0]]], dtype=torch.float64)
    module = load_module(Path(__file__).parent.parent / "generated" / "max_pool1d.py")   # the catalog's op
    grad_y = torch.arange(1.0, 4.0, dtype=torch.float64).view(1, 1, 3)
    want = x.clone().requires_grad_()
    torch.nn.functional.max_pool1d(want, 2).backward(grad_y)
    torch.testing.assert_close(module.max_pool1d_forward(x), torch.nn.functional.max_pool1d(x, 2))
    # the forward hands the backward each window's first maximal position, as max_pool1d's indices
    y, saved_argmax = module.max_pool1d_forward_saving(x)
    torch.testing.assert_close(saved_argmax, torch.nn.functional.max_pool1d(x, 2, return_indices=True)[1],
                               rtol=0, atol=0)
    (grad_x,) = module.max_pool1d_backward(grad_y, x, saved_argmax)
    torch.testing.assert_close(grad_x, want.grad)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", SLOW_SPECS)
def test_every_kernel_and_stride(generated, name, style):
    op, module = generated(name, style)
    check(op, module)
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 3))   # every index one size
    check(op, module, sizes=dict.fromkeys(sizes_for(op), 1))
    for seed in (1, 2):
        check_gradients(op, module, inputs=[tied(op, seed=seed)[0]])
