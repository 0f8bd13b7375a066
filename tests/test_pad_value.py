"""`pad_value`: what reads of an input outside its range are, instead of zeros (README "Convolutions and
pooling"). A max pool pads with -inf as torch's does, a min pool with inf, any op with a number; the value
reaches every window of the input's reads in the forward and in the backward's comparisons (the share of a
max), never the padding of a gradient or a tangent (nothing flows back to a constant, and it has no tangent).
"""

from __future__ import annotations

import pytest
import torch

from derive.build import render_catalog
from derive.model import SpecError
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, gradcheck_op, kink_inputs, load_module, make_inputs

SPECS = {
    # torch's own max pool with padding, stride 2, kernel 3: the whole gradient to the first maximum
    "max_pool_padded": """
        inputs = ["x[n, c, l]"]
        equation = "y[n, c, t] = max(x[n, c, 2*t + k - 1], k, tie=\\"first\\")"
        sizes = { k = 3 }
        pad = { x = { l = 1 } }
        pad_value = { x = -inf }
        reference = "torch.nn.functional.max_pool1d(x, 3, 2, padding=1)"
    """,
    # a min over overlapping windows, ties split, padded with inf on both sides
    "min_pool_split": """
        inputs = ["x[n, l]"]
        equation = "y[n, t] = min(x[n, t + k - 1], k)"
        sizes = { k = 3 }
        pad = { x = { l = 1 } }
        pad_value = { x = inf }
        reference = "torch.nn.functional.pad(x, (1, 1), value=torch.inf).unfold(1, 3, 1).amin(-1)"
    """,
    # a number, on one side only, under a function: exp(1.5) enters the first mean
    "mean_filled": """
        inputs = ["x[n, l]"]
        equation = "y[n, t] = mean(exp(x[n, t + k - 1]), k)"
        sizes = { k = 2 }
        pad = { x = { l = [1, 0] } }
        pad_value = { x = 1.5 }
        reference = "torch.exp(torch.nn.functional.pad(x, (1, 0), value=1.5)).unfold(1, 2, 1).mean(-1)"
    """,
    # a padded window times a kernel, a weight's gradient reads the filled windows
    "conv_filled": """
        inputs = ["x[n, c, l]", "w[o, c, k]"]
        equation = "y[n, o, t] = sum(x[n, c, t + k - 1] * w[o, c, k], c, k)"
        pad = { x = { l = 1 } }
        pad_value = { x = -2 }
        reference = "torch.nn.functional.conv1d(torch.nn.functional.pad(x, (1, 1), value=-2.0), w)"
    """,
}
STYLES = ("contraction", "broadcast")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pad_value")
    text = "".join(f"[ops.{name}]\n{body}\n" for name, body in SPECS.items())
    catalog = parse_catalog(text, "pad_value.toml")
    for path, source in render_catalog(catalog, STYLES, namespace="pad_value").items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(source)

    def op_and_module(name, style):
        return catalog.op(name), load_module(directory / ("" if style == "contraction" else "broadcast") / f"{name}.py")
    return op_and_module


def negative(op, sizes=None, seed=0) -> list[torch.Tensor]:
    """Inputs below zero, where a padding of zeros would win every max at the edges."""
    return [-t.abs() - 0.25 if t.is_floating_point() else t for t in make_inputs(op, sizes, seed=seed)]


# the broadcast style's convolution, an einsum of windows, under `-m slow` (CI)
@pytest.mark.parametrize("name, style", [
    pytest.param(name, style, marks=[pytest.mark.slow] if (name, style) == ("conv_filled", "broadcast") else [])
    for name in SPECS for style in STYLES])
def test_matches_the_reference(generated, name, style):
    op, module = generated(name, style)
    for sizes in ({}, {"n": 2, "c": 2, "o": 2, "l": 2}, {"n": 1, "c": 1, "o": 1, "l": 1}):
        check_gradients(op, module, inputs=negative(op, sizes))
        check_gradients(op, module, sizes=sizes)
    placed, _ = kink_inputs(op, negative(op, seed=3), generator=torch.Generator().manual_seed(0))
    check_gradients(op, module, inputs=placed)
    check_tangents(op, module)
    gradcheck_op(op, module)


@pytest.mark.parametrize("style", STYLES)
def test_the_value_is_printed_where_the_input_is_padded(generated, style):
    _, module = generated("max_pool_padded", style)
    source = open(module.__file__).read()
    assert "value=-math.inf" in source and "import math" in source


def test_without_a_pad_value_the_padding_reads_zeros(generated):
    op, module = generated("max_pool_padded", "contraction")
    text = "[ops.max_pool_padded]\n" + SPECS["max_pool_padded"].replace("pad_value = { x = -inf }", "")
    zeros = parse_catalog(text, "zeros.toml").op("max_pool_padded")
    assert zeros.pad_value_of("x") == 0 and op.pad_value_of("x") == -float("inf")
    # on inputs below zero a padding of zeros would win the edge windows: the forward's do not
    x = negative(op)[0]
    zero_padded = torch.nn.functional.max_pool1d(torch.nn.functional.pad(x, (1, 1)), 3, 2)
    assert (zero_padded[..., 0] == 0).all() and (module.max_pool_padded_forward(x) < 0).all()


@pytest.mark.parametrize("table, problem", [
    ('pad_value = { x = -inf }', "'pad_value' names 'x', which 'pad' does not pad"),
    ('pad = { x = { l = 1 } }\npad_value = { z = 1 }', "'pad_value' names 'z', which is not a float input"),
    ('pad = { x = { l = 1 } }\npad_value = { x = nan }', "'pad_value' entry 'x' must be a number or -inf/inf"),
    ('pad = { x = { l = 1 } }\npad_value = { x = "-inf" }', "'pad_value' entry 'x' must be a number or -inf/inf"),
    ('pad = { x = { l = 1 } }\npad_value = 3', "'pad_value' must be a table of input = number"),
])
def test_bad_pad_values_are_one_line_errors(table, problem):
    text = f'[ops.pool]\ninputs = ["x[n, l]"]\nequation = "y[n, t] = max(x[n, t + k - 1], k)"\nsizes = {{ k = 2 }}\n{table}\n'
    with pytest.raises(SpecError) as error:
        parse_catalog(text, "pool.toml")
    message = str(error.value)
    assert problem in message and "pool" in message and "\n" not in message
