"""Every catalog op, in both styles: generated gradients against torch.autograd."""

import pytest
import torch

from derive import naming
from derive.testing import call_backward, check_gradients, gradcheck_op, has_kinks, make_inputs

from conftest import CATALOG, KINK_OPS, generated_module


def test_gradcheck_float64(op, style):
    gradcheck_op(op, generated_module(op.name, style))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_matches_autograd_of_reference(op, style, dtype):
    check_gradients(op, generated_module(op.name, style), dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("op_name", KINK_OPS)
def test_matches_autograd_at_kinks(op_name, style, seed):
    """A third of the inputs sit exactly on the kink, where PyTorch's convention decides."""
    check_gradients(CATALOG.op(op_name), generated_module(op_name, style), torch.float64, seed=seed, kinks=True)


def test_gradient_shapes_exact(op, style):
    """Called directly, so autograd cannot sum an unreduced gradient down for us."""
    module = generated_module(op.name, style)
    sizes = {rep: 1 for rep in set(dict(op.index_sizes).values())}
    for chosen in ({}, sizes):
        inputs = make_inputs(op, chosen)
        output = getattr(module, naming.forward(op.name))(*inputs)
        grads = call_backward(op, module, torch.ones_like(output), inputs, output)
        for meta, tensor, grad in zip(op.inputs, inputs, grads):
            if meta.differentiable:
                assert grad.shape == tensor.shape
            else:
                assert grad is None


def test_needs_input_grad_skips_gradients(op):
    module = generated_module(op.name)
    inputs = make_inputs(op)
    output = getattr(module, naming.forward(op.name))(*inputs)
    for skipped in range(len(inputs)):
        flags = tuple(position != skipped for position in range(len(inputs)))
        grads = call_backward(op, module, torch.ones_like(output), inputs, output, needs_input_grad=flags)
        assert grads[skipped] is None
        full = call_backward(op, module, torch.ones_like(output), inputs, output)
        for position, (grad, reference) in enumerate(zip(grads, full)):
            if position != skipped and reference is not None:
                torch.testing.assert_close(grad, reference)


@pytest.mark.parametrize("op_name", [op.name for op in CATALOG.ops if op.params])
def test_hyperparameters_other_than_the_defaults(op_name, style):
    op = CATALOG.op(op_name)
    params = {p.name: 1.5 * p.default + 0.25 for p in op.params}
    check_gradients(op, generated_module(op_name, style), params=params)
    check_gradients(op, generated_module(op_name, style), torch.float32, params=params)


def test_the_ops_read_as_kinked_off_their_equation_are_those_whose_derivative_jumps():
    """conftest picks KINK_OPS from the equations without deriving; derive.testing.has_kinks derives them."""
    assert KINK_OPS == [op.name for op in CATALOG.ops if has_kinks(op)]
