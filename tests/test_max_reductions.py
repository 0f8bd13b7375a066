"""max and min reductions, `max(expr, i, ...)` / `min(...)`: specs generated from forms x conventions, each
derived, written and checked against a torch reference, with inputs placed exactly on ties (several equal
maxima in a row), where the tie convention decides: tie="split" (default) shares the gradient evenly among
the maximal positions as torch.amax does, tie="first" gives it all to the first one as torch.max(x, dim)."""

import re
import textwrap

import pytest
import torch

from derive import naming
from derive.build import render_catalog
from derive.model import SpecError
from derive.spec import parse_catalog
from derive.testing import (autograd_gradients, call_backward, check_gradients, check_tangents, kink_inputs, load_module,
                            make_inputs, reference, verify_op)

# form -> (inputs, equation with {f} for max/min and {tie} for the keyword, reference with {split} for
# torch.amax/amin and {first} for torch.max/min(..., dim)[0] written out below)
FORMS = {
    "one_index": (["x[n, c]"], "y[n] = {f}(x[n, c], c{tie})", {"split": "torch.a{f}(x, 1)",
                                                                  "first": "torch.{f}(x, 1)[0]"}),
    "two_indices": (["x[n, c, k]"], "y[n] = {f}(x[n, c, k], c, k{tie})",
                    {"split": "torch.a{f}(x, (1, 2))", "first": "torch.{f}(x.flatten(1), 1)[0]"}),
    "leading_index": (["x[c, n]"], "y[n] = {f}(x[c, n], c{tie})", {"split": "torch.a{f}(x, 0)",
                                                                     "first": "torch.{f}(x, 0)[0]"}),
    "whole_tensor": (["x[c]"], "y = {f}(x[c], c{tie})", {"split": "torch.a{f}(x, 0)", "first": "torch.{f}(x, 0)[0]"}),
    "centered": (["x[n, c]"], "y[n, c] = x[n, c] - {f}(x[n, c], c{tie})",
                 {"split": "x - torch.a{f}(x, 1, keepdim=True)", "first": "x - torch.{f}(x, 1, keepdim=True)[0]"}),
    "of_a_product": (["a[n, c]", "b[c]"], "y[n] = {f}(a[n, c] * b[c], c{tie})",
                     {"split": "torch.a{f}(a * b, 1)", "first": "torch.{f}(a * b, 1)[0]"}),
    "in_a_loss": (["x[n, c]", "w[n]"], "loss = sum({f}(x[n, c], c{tie}) * w[n], n)",
                  {"split": "(torch.a{f}(x, 1) * w).sum()", "first": "(torch.{f}(x, 1)[0] * w).sum()"}),
    "batched": (["x[..., c]"], "y[...] = {f}(x[..., c], c{tie})",
                {"split": "torch.a{f}(x, -1)", "first": "torch.{f}(x, -1)[0]"}),
    "of_a_contraction": (["x[n, c, k]", "w[k]"], "y[n] = {f}(sum(x[n, c, k] * w[k], k), c{tie})",
                         {"split": "torch.a{f}((x * w).sum(2), 1)", "first": "torch.{f}((x * w).sum(2), 1)[0]"}),
    "stable_softmax": (["x[n, c]"],
                       "y[n, c] = exp(x[n, c] - {f}(x[n, c], c{tie})) / sum(exp(x[n, c] - {f}(x[n, c], c{tie})), c)",
                       {"split": "torch.softmax(x, 1)", "first": "torch.softmax(x, 1)"}),
}
TIES = {"split": "", "first": ', tie=\\"first\\"'}


def spec_body(form: str, function: str, tie: str) -> str:
    inputs, equation, references = FORMS[form]
    return textwrap.dedent(f'''
        inputs = {inputs!r}
        equation = "{equation.format(f=function, tie=TIES[tie])}"
        reference = "{references[tie].format(f=function)}"
    ''').replace("'", '"')


CASES = [(form, function, tie) for form in FORMS for function in ("max", "min") for tie in TIES]
# by default four forms, each function and convention twice; every case under -m slow
QUICK = {("one_index", "max", "split"), ("two_indices", "min", "first"), ("centered", "max", "first"),
         ("of_a_product", "min", "split")}


def name_of(form, function, tie):
    return f"{function}_{tie}_{form}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(form, function, tie, style) -> (spec path, op, module path), each spec written and derived once."""
    directory = tmp_path_factory.mktemp("max_reductions")
    made = {}

    def build(form, function, tie, style="contraction"):
        name = name_of(form, function, tie)
        if name not in made:
            spec = directory / f"{name}.toml"
            spec.write_text(f"[ops.{name}]{spec_body(form, function, tie)}")
            catalog = parse_catalog(spec.read_text(), str(spec))
            for path, source in render_catalog(catalog, namespace=f"maxred_{name}").items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(source)
            made[name] = spec, catalog.op(name)
        spec, op = made[name]
        return spec, op, directory / ("broadcast" if style == "broadcast" else "") / f"{name}.py"
    return build


def params(cases):
    return [pytest.param(*case, marks=[] if case in QUICK else [pytest.mark.slow], id=name_of(*case))
            for case in cases]


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("form, function, tie", params(CASES))
def test_verify_op_against_the_torch_reference(generated, form, function, tie, style):
    """gradcheck, float64 and float32 against the reference, all sizes equal, inputs on ties (kink_inputs),
    the Function (gradgradcheck), the custom op and forward mode."""
    spec, op, path = generated(form, function, tie, style)
    verify_op(spec, op.name, path)


# kink_inputs solves `operand = max` for an input carrying every index of the operand: not through a sum
TIED = [case for case in CASES if case[0] != "of_a_contraction"]


@pytest.mark.parametrize("form, function, tie", params(TIED))
def test_ties_follow_the_convention_and_the_other_one_is_caught(generated, form, function, tie):
    """On inputs with several exactly equal maxima in a row the generated gradient (and autograd through the
    generated forward) equals the reference's; the reference of the other convention differs there, so
    the tie inputs do decide between the two."""
    _, op, path = generated(form, function, tie)
    module = load_module(path)
    placed, placements = kink_inputs(op, make_inputs(op), generator=torch.Generator().manual_seed(3))
    assert placements, placements
    check_gradients(op, module, inputs=placed)
    check_tangents(op, module, inputs=placed, kinks=True)
    grad_output = torch.randn(reference(op)(*placed).shape, dtype=torch.float64)
    flags = [t.differentiable for t in op.inputs]
    forward = getattr(module, naming.forward(op.name))
    for got, want in zip(autograd_gradients(forward, placed, grad_output, flags),
                         autograd_gradients(reference(op), placed, grad_output, flags)):
        torch.testing.assert_close(got, want)
    if form != "stable_softmax":      # there the max cancels: both conventions give softmax's gradient
        other = "first" if tie == "split" else "split"
        other_op = parse_catalog(f"[ops.{op.name}]{spec_body(form, function, other)}", "other.toml").op(op.name)
        actual = call_backward(op, module, grad_output, placed)
        expected = autograd_gradients(reference(other_op), placed, grad_output, flags)
        assert any(not torch.allclose(got, want) for got, want in zip(actual, expected) if want is not None)


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("form, function, tie", params([c for c in CASES if c[0] in ("two_indices", "of_a_product")]))
def test_every_index_of_one_size(generated, form, function, tie, size):
    """n, c and k of one length (3), and 1: a single position is its own max and takes the whole gradient."""
    _, op, path = generated(form, function, tie)
    sizes = {size_name: size for size_name in dict(op.index_sizes).values()}
    check_gradients(op, load_module(path), sizes=sizes)


@pytest.mark.parametrize("function, tie", [("max", "split"), ("min", "first")])
def test_an_empty_reduced_dim_raises_as_torch_does(generated, function, tie):
    """The max of nothing is undefined: where torch.amax / torch.max(x, dim) raise, the generated entry points
    refuse the shape, naming the op, the tensor and the index."""
    _, op, path = generated("one_index", function, tie)
    module = load_module(path)
    x = torch.zeros(3, 0, dtype=torch.float64)
    with pytest.raises((IndexError, RuntimeError), match="non-zero size"):
        reference(op)(x)
    message = rf"{op.name}: x has size 0 at dim 1 \(index c\), which a max or min reduces over"
    for entry in (getattr(module, naming.forward(op.name)), getattr(module, op.name)):
        with pytest.raises(RuntimeError, match=message):
            entry(x)
    with pytest.raises(RuntimeError, match=message):
        call_backward(op, module, torch.zeros(3, dtype=torch.float64), [x], torch.zeros(3, dtype=torch.float64))
    # an empty batch along a kept index is fine
    empty_rows = torch.zeros(0, 4, dtype=torch.float64)
    check_gradients(op, load_module(path), inputs=[empty_rows])


def test_the_code_is_amax_and_a_tie_mask_or_an_argmax_scatter(generated):
    """No one-hot of size N x C x C: the split gradient is a mask of the maxima divided by their count,
    the first-maximum gradient a scatter of ones at argmax."""
    _, _, split = generated("one_index", "max", "split")
    _, _, first = generated("one_index", "min", "first")
    split_code, first_code = split.read_text(), first.read_text()
    assert "return x.amax(-1)" in split_code
    assert "(x == y.unsqueeze(-1)).to(x.dtype)" in split_code and ".sum(-1)" in split_code
    assert "return x.min(-1).values" in first_code
    assert "torch.zeros_like(x).scatter(-1, x.argmin(-1, keepdim=True), 1)" in first_code


@pytest.mark.parametrize("equation, message", [
    ('y[n] = max(x[n, c], c, tie="last")', 'tie="split"'),
    ("y[n] = max(x[n, c], c, tie=0)", 'tie="split"'),
    ("y[n] = max(x[n, c], c, w[n])", "is not one"),
    ("y[n] = max(x[n, c], c, c)", "twice"),
    ("y = max(x[n, c], ..., c)", "batch dims"),
    ("y[n] = max(w[n], c)", "does not use"),
    ('y[n] = max(x[n, c], c, tie="first", foo=1)', "one keyword"),
])
def test_bad_reductions_are_one_line_errors(equation, message):
    text = f"[ops.bad]\ninputs = ['x[n, c]', 'w[n]']\nequation = '{equation}'\nreference = 'x'\n"
    with pytest.raises(SpecError, match=re.escape(message)) as error:
        parse_catalog(text, "bad.toml")
    assert "bad.toml" in str(error.value) and "'bad'" in str(error.value) and "\n" not in str(error.value)


def test_elementwise_max_of_values_is_unchanged():
    """Max(a, b) of two values (a 0-d input as the second) stays the elementwise max."""
    text = '[ops.m]\ninputs = ["x[n]", "s"]\nequation = "y[n] = max(x[n], s)"\nreference = "torch.maximum(x, s)"\n'
    op = parse_catalog(text, "m.toml").op("m")
    assert "amax" not in str(op.rhs) and "Max" in str(op.rhs)


@pytest.mark.parametrize("function", ["max", "min"])
def test_kink_inputs_put_several_equal_extrema_in_a_row(function):
    """derive.testing.kink_inputs: about a third of each row moved exactly onto the row's max (min), so that
    rows hold several equal maxima, and nothing is moved off it."""
    op = parse_catalog(f"[ops.r]{spec_body('two_indices', function, 'split')}", "r.toml").op("r")
    (x,) = make_inputs(op, sizes={"n": 5, "c": 4, "k": 3})
    (placed,), placements = kink_inputs(op, [x], generator=torch.Generator().manual_seed(0))
    assert [p.kink.function for p in placements] == [function]
    extremum = placed.flatten(1).amax(1) if function == "max" else placed.flatten(1).amin(1)
    original = x.flatten(1).amax(1) if function == "max" else x.flatten(1).amin(1)
    torch.testing.assert_close(extremum, original, rtol=0, atol=0)
    ties = (placed.flatten(1) == extremum.unsqueeze(1)).sum(1)
    assert (ties >= 2).sum() >= 3, ties
    moved = placed != x
    assert torch.equal(moved, moved & (placed == extremum.view(-1, 1, 1)))
