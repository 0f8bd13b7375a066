"""An optional input the backward reads only to tell it from None is kept as its shape, not saved (issue 14).

`optional.keep_optional`: the Function keeps the inputs the backwards of the op and of its variants (the op
with optional inputs None) read the values of; an optional input that none of them reads is kept as its shape,
None where it is absent, and the backward gets a stand-in of that shape holding no data (or None). Ops of my
own: a bias beside a scale that is read, and optional inputs that only the op's result stands in for.
"""

import ast
import functools

import pytest
import torch

from derive.emit import render_module
from derive.pipeline import build_op
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_optional, gradcheck_op, load_module, make_inputs, op_saved_bytes

from conftest import first_by_default

INVENTED = parse_catalog("""
[ops.scale_shift]
inputs = ["x[n, d]", "s[d]", "b[d]"]
optional = { s = 1, b = 0 }
equation = "y[n, d] = tanh(x[n, d]) * s[d] + b[d]"
reference = "torch.tanh(x) * s + b"

[ops.shifted_tanh]
inputs = ["x[n, d]", "c[d]"]
optional = { c = 0.5 }
equation = "y[n, d] = tanh(x[n, d] + c[d])"
reference = "torch.tanh(x + c)"

[ops.exp_scaled]
inputs = ["x[n]", "a[n]"]
optional = { a = 0 }
equation = "y[n] = tanh(x[n]) * exp(a[n])"
reference = "torch.tanh(x) * torch.exp(a)"
""", "invented.toml")

# (what the Function saves, the inputs it keeps as their shape or None)
SAVED = {
    "shifted_tanh": (("y",), ("c",)),       # 1 - y**2: c is read through the result alone
    "scale_shift": (("x", "s"), ("b",)),    # grad_x reads s, grad_s reads x; b is read by nothing
    "exp_scaled": (("x", "a"), ()),         # grad_x reads exp(a): a is saved
}


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("bias")


@functools.cache
def _module(name: str, directory):
    """One invented op in the contraction style, with its variants: (op, module, its text)."""
    op = INVENTED.op(name)
    built = build_op(op, ("contraction",))
    variants = tuple((absent, v.derivation, v.lowered["contraction"], v.signatures["contraction"])
                     for absent, v in built.variants)
    text = render_module(built.derivation, built.lowered["contraction"], "invented.toml", "-",
                         f"derive_bias_test_{name}", built.signatures["contraction"], variants)
    path = directory / f"{name}.py"
    path.write_text(text)
    return op, load_module(path), text


def _saved_by_function(text: str, output: str) -> tuple[str, ...]:
    (function,) = [node for node in ast.parse(text).body if isinstance(node, ast.ClassDef)
                   and node.name.endswith("Function")]
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "save_for_backward"]
    return tuple(output if a.id == "output" else a.id for call in calls for a in call.args)


@pytest.mark.parametrize("name", first_by_default(list(SAVED), 1))
def test_an_optional_input_read_only_for_none_is_kept_as_its_shape(directory, name):
    """The Function saves only the inputs whose values a backward reads; with every set of optional inputs None
    or given, its gradients (float64 gradcheck and gradgradcheck, exact shapes), the custom op's and forward mode
    are those of the op with the declared values; and it saves at most autograd's bytes, at sizes 1 and 0 too."""
    op, module, text = _module(name, directory)
    saved, shaped = SAVED[name]
    assert _saved_by_function(text, op.output) == saved
    for input_name in shaped:
        assert f"ctx.{input_name}_shape = None if {input_name} is None else {input_name}.shape" in text
    check_optional(op, module)
    gradcheck_op(op, module)
    for size in (4, 1, 0):
        sizes = {index: size for index in dict(op.index_sizes)}
        check_gradients(op, module, sizes=sizes)
        inputs = make_inputs(op, sizes, torch.float32)
        generated, autograd = op_saved_bytes(op, module, inputs)
        assert generated <= autograd, (name, size, generated, autograd)


def test_the_stand_in_holds_the_shape_and_no_data(directory):
    """Given c, the backward gets a stand-in of c's shape (its shape contract reads it; c's gradient, a sum over n,
    comes back at c's size); without it, None: c's gradient is None and x's is that with c = 0.5."""
    _, module, _ = _module("shifted_tanh", directory)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for shift, value in ((c, c), (None, 0.5)):
        leaves = [t for t in (x, shift) if t is not None]
        got = torch.autograd.grad(module.shifted_tanh(x, shift).square().sum(), leaves)
        want = torch.autograd.grad(torch.tanh(x + value).square().sum(), leaves)
        assert len(got) == len(want)
        for a, e in zip(got, want):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e)
