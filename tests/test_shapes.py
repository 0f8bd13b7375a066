"""Hypothesis-drawn shapes: size-1 dims, zero to two batch dims, empty batches, broadcast batch dims."""

import warnings

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from derive.naming import BATCH
from derive.testing import check_gradients, make_inputs, reference

from conftest import CATALOG, OPS, first_by_default, generated_module, half_by_default


@st.composite
def shapes(draw, op):
    """Sizes for every index, and each batched input's own (broadcastable) batch shape."""
    representatives = sorted(set(dict(op.index_sizes).values()) - {BATCH})
    sizes = {r: draw(st.integers(1, 4)) for r in representatives}
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    batch_shapes = {}
    for tensor in op.inputs:
        if BATCH in tensor.indices:
            dropped = draw(st.integers(0, len(batch)))           # missing leading dims
            own = [1 if draw(st.booleans()) else d for d in batch[dropped:]]   # size-1 dims
            batch_shapes[tensor.name] = tuple(own)
    return sizes, batch, batch_shapes


def reference_accepts(op, inputs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference(op)(*inputs)
        return True
    except (RuntimeError, ValueError):
        return False


# The broadcast style of every op under `-m slow` (CI): the default run draws the contraction style's shapes.
@pytest.mark.parametrize("style", first_by_default(["contraction", "broadcast"], 1))
@pytest.mark.parametrize("op_name", half_by_default(OPS))
def test_drawn_shapes_match_autograd(op_name, style):
    op = CATALOG.op(op_name)
    module = generated_module(op_name, style)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(shapes(op))
    def check(drawn):
        sizes, batch, batch_shapes = drawn
        inputs = make_inputs(op, sizes, batch_shapes=batch_shapes)
        if not reference_accepts(op, inputs):
            # the reference insists on equal shapes (binary_cross_entropy does): use the full batch everywhere
            inputs = make_inputs(op, sizes, batch_shapes={name: batch for name in batch_shapes})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # torch warns when a loss broadcasts its target
            check_gradients(op, module, inputs=inputs, equal_nan=True)

    check()
