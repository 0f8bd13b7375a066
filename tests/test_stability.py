"""Large-magnitude inputs, NaN and infinity: the stable forms derive lowers to, compared with torch."""

import pytest
import torch

from derive.functions import STABLE_FUNCTIONS, stabilize
from derive.testing import check_gradients, make_inputs

from conftest import CATALOG, OPS, generated_module


def stabilized(op) -> bool:
    """Whether derive lowers the op to a stable function (softmax, logsumexp, softplus, sigmoid, log1p): its
    forward is the stabilized equation (derive's first step; collecting the tests derives nothing)."""
    return stabilize(op.rhs).has(*STABLE_FUNCTIONS)


STABLE_OPS = [name for name in OPS if stabilized(CATALOG.op(name))]
ELEMENTWISE_OPS = [name for name in OPS if [t.indices for t in CATALOG.op(name).inputs] == [("...",)]]


def test_the_stability_list_is_covered():
    expected = {"softmax", "log_softmax", "cross_entropy", "cross_entropy_probs", "softplus",
                "binary_cross_entropy_with_logits", "sigmoid"}
    assert expected <= set(STABLE_OPS)


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("op_name", STABLE_OPS)
def test_large_inputs_stay_finite_and_match_torch(op_name, scale):
    op = CATALOG.op(op_name)
    ranged = {name for name, _, _ in op.ranges}
    inputs = [t * scale if meta.name not in ranged and t.is_floating_point() else t
              for t, meta in zip(make_inputs(op), op.inputs)]
    module = generated_module(op_name)
    output = getattr(module, f"{op_name}_forward")(*inputs)
    assert torch.isfinite(output).all(), f"{op_name} forward overflows at {scale}"
    check_gradients(op, module, inputs=inputs)


@pytest.mark.parametrize("op_name", ELEMENTWISE_OPS)
def test_nan_and_infinity_propagate_as_in_torch(op_name):
    op = CATALOG.op(op_name)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.5, -2.0], dtype=torch.float64)
    if op.ranges:
        low, high = op.ranges[0][1:]
        special = torch.tensor([float("nan"), float("inf"), low, high], dtype=torch.float64)
    check_gradients(op, generated_module(op_name), inputs=[special], equal_nan=True)
