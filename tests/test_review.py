"""Regressions a review of today's features (masks with inf, joint convolution backward, gathers, max over
`...`, normalizations) found, each on the smallest spec that shows it."""

from __future__ import annotations

import pytest
import torch

import derive
from derive.testing import check_gradients, sizes_for


def test_a_reference_may_read_the_values_of_torch_max():
    """README writes tie="first" as `torch.max(x, 1).values`; a reference spelled so was refused ("attribute
    'values' is not allowed"), so a user had to write `torch.max(x, 1)[0]`. Ties in both rows."""
    op = derive.op("y[n] = max(x[n, c], c, tie='first')", inputs=["x[n, c]"],
                   reference="torch.max(x, 1).values", name="first_max")
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    op(x).sum().backward()
    leaf = x.detach().requires_grad_()
    torch.max(leaf, 1).values.sum().backward()
    torch.testing.assert_close(x.grad, leaf.grad)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="verify_op's equal-size check (sizes_for(op) all 3) ignores the reach of an "
                   "affine read when another input sets the window count: x[n, c, t + k] with b[o, t] gets l = t = k = "
                   "3, and the forward's shape contract refuses it (would read past the end of dim l), so a correct "
                   "op fails verify_op")
def test_equal_sizes_respect_an_affine_read_whose_window_count_an_input_sets():
    op = derive.op("y[n, o, t] = sum(x[n, c, t + k] * w[o, c, k], c, k) + b[o, t]",
                   inputs=["x[n, c, l]", "w[o, c, k]", "b[o, t]"],
                   reference="torch.nn.functional.conv1d(x, w) + b", name="conv_bias_nt")
    check_gradients(op._built.op, op.module, sizes=dict.fromkeys(sizes_for(op._built.op), 3))


def test_a_row_masked_whole_with_minus_inf_has_a_zero_gradient():
    """logsumexp(where(x > 0, 2 x, -inf), c) over a row with no x > 0 is -inf, its softmax NaN; the masked
    entries' gradient is 0 (as through masked_fill). The step where(x > 0, g, 0) was fused into
    leaky_relu_backward(g, x, 0), whose 0 * NaN is NaN: the whole row's gradient was NaN."""
    op = derive.op("y[n] = logsumexp(where(x[n, c] > 0, 2 * x[n, c], -inf), c)", inputs=["x[n, c]"],
                   reference="torch.logsumexp((2 * x).masked_fill(x <= 0, -torch.inf), 1)", name="masked_lse")
    x = torch.tensor([[0.0, -1.0, 0.0], [0.5, 0.0, -2.0]], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    got, = torch.autograd.grad(op(leaf).sum(), leaf)
    leaf = x.clone().requires_grad_()
    want, = torch.autograd.grad(torch.logsumexp((2 * leaf).masked_fill(leaf <= 0, -torch.inf), 1).sum(), leaf)
    torch.testing.assert_close(got, want)
    # forward mode: the same share, 0 on the masked row (torch's own forward mode gives NaN there: 0 * NaN)
    tangent = torch.ones_like(x)
    torch.testing.assert_close(op.jvp(x, tangent), (want * tangent).sum(1))


def _random(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("equation, reference", [
    ("y[c] = mean(x[..., c], ...)", "x.reshape(-1, x.shape[-1]).mean(0)"),
    pytest.param("y[c] = mean(x[..., c, k] * w[k], ..., k)", "(x * w).mean(-1).reshape(-1, x.shape[-2]).mean(0)",
                 marks=pytest.mark.slow),
])
def test_a_mean_over_the_batch_dims_alone_keeps_the_named_dims(equation, reference):
    """README: mean(expr, i, ...) over `...` too. A mean over the batch dims of a value with named dims kept
    (a batch norm over all dims but the channel, x[..., c]) was refused: "a mean over the batch dims '...'
    together with other dims is not supported". Batch dims: none, and two (equal sizes)."""
    from test_differential import check_by_hand
    inputs = '"x[..., c]"' if "k" not in equation else '"x[..., c, k]", "w[k]"'
    toml = f'[ops.fuzzed]\ninputs = [{inputs}]\nequation = "{equation}"\nreference = "{reference}"\n'
    tail = [] if "k" not in equation else [_random(2, seed=9)]
    shapes = [(3, 3), (2, 3, 3)] if "k" not in equation else [(3, 2), (2, 3, 2)]
    check_by_hand(toml, [[_random(*shapes[0][-1:] if "k" not in equation else shapes[0]), *tail],
                         [_random(*shapes[1], seed=2), *tail]])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the double backward (autograd through the generated backward) of "
                   "logsumexp(where(s < t, x[n, s] * w[s], -inf), s) is NaN in every entry of w's Jacobian once a row "
                   "is masked whole (y[n, 0] = -inf, its softmax NaN), where autograd through the masked_fill "
                   "reference is finite; the first backward and the forward are right")
def test_the_double_backward_of_a_row_masked_whole_is_finite():
    from derive.testing import finite_part
    op = derive.op("y[n, t] = logsumexp(where(s < t, x[n, s] * w[s], -inf), s)", inputs=["x[n, s]", "w[s]"],
                   sizes={"t": 3}, name="strict_causal_lse")
    x = _random(2, 4).requires_grad_()
    w = _random(4, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(finite_part(op.Function.apply), (x, w))
    assert torch.autograd.gradgradcheck(finite_part(op.Function.apply), (x, w), raise_exception=False)
