"""What the generated autograd.Function saves for the backward: never more than autograd saves (issue 14).

The rules (derive/saving.py): the gradients read the output instead of an input where SymPy proves it equal
(`read_output`), an input whose shape alone the backward reads is kept as its shape, and a saved log-softmax
is an output of the Function with its own VJP, so the logits are not kept beside it, and a step the gradients
read their inputs through is saved instead of them (l1_loss's sign(pred - target)). Bytes are measured with
`derive.testing.saved_bytes` (saved_tensors_hooks), at small shapes.
"""

import ast
import textwrap

import pytest
import torch

from derive import bench
from derive.emit import render_module
from derive.pipeline import build_op
from derive.model import SpecError
from derive.spec import parse_catalog
from derive.testing import (check_gradients, check_tangents, gradcheck_op, kink_inputs, load_module, make_inputs,
                            op_saved_bytes, reference, saved_bytes)

from conftest import CATALOG, GENERATED, OPS, first_by_default

QUICK = bench.SIZE_PRESETS["quick"]


@pytest.mark.parametrize("op_name", OPS)
def test_the_function_saves_at_most_what_autograd_saves(op_name):
    op = CATALOG.op(op_name)
    module = load_module(GENERATED / f"{op_name}.py")
    inputs = make_inputs(op, dtype=torch.float32)
    generated, autograd = op_saved_bytes(op, module, inputs)
    assert generated <= autograd, (op_name, generated, autograd)


def test_the_mlp_saves_at_most_what_autograd_saves():
    """linear -> relu -> linear -> cross_entropy: relu's output is what the second linear saves anyway, and
    cross_entropy keeps the log-softmax alone (activations; before: 1.44x at these sizes, 1.83x at the seed's)."""
    modules = {name: load_module(GENERATED / f"{name}.py") for name in ("linear", "relu", "cross_entropy")}
    case = bench.mlp_case(modules, QUICK)
    generated, autograd = case.saved
    assert 0 < generated <= autograd, case.saved
    bench.verify(case)


def test_saved_bytes_counts_a_storage_once():
    x = torch.randn(8, 4, requires_grad=True)
    once = saved_bytes(lambda: (x * x).sum())              # mul saves x twice: one storage
    assert once == x.untyped_storage().nbytes()
    assert saved_bytes(lambda: (x.exp() * x).sum()) == 2 * once     # exp's result and x


INVENTED = """
[ops.scaled_tanh]
inputs = ["x[n]"]
equation = "y[n] = 2 * tanh(3 * x[n])"
reference = "2 * torch.tanh(3 * x)"

[ops.scaled_exp]
inputs = ["x[n, d]"]
equation = "y[n, d] = 3 * exp(2 * x[n, d])"
reference = "3 * torch.exp(2 * x)"

[ops.shifted_relu]
inputs = ["x[...]"]
equation = "y[...] = Max(x[...] - 1, 0, tie=0)"
reference = "torch.relu(x - 1)"

[ops.relu_tanh]
inputs = ["x[n]"]
equation = "y[n] = tanh(Max(x[n], 0, tie=0))"
reference = "torch.tanh(torch.relu(x))"

[ops.tanh_of_exp]
inputs = ["x[n]"]
equation = "y[n] = tanh(exp(x[n]))"
reference = "torch.tanh(torch.exp(x))"

[ops.gated]
inputs = ["x[n, d]", "g[n, d]"]
equation = "y[n, d] = x[n, d] * sigmoid(g[n, d])"
reference = "x * torch.sigmoid(g)"

[ops.relu_tie_one]
inputs = ["x[n]"]
equation = "y[n] = Max(x[n], 0, tie=1)"
reference = "torch.clamp(x, min=0)"

[ops.leaky]
inputs = ["x[n]"]
params = { slope = 0.1 }
equation = "y[n] = where(x[n] > 0, x[n], slope * x[n])"
reference = "torch.nn.functional.leaky_relu(x, slope)"

[ops.abs_diff]
inputs = ["a[n]", "b[n]"]
equation = "loss = sum(2 * Abs(a[n] - b[n]), n)"
reference = "2 * (a - b).abs().sum()"

[ops.square]
inputs = ["x[n]"]
equation = "y[n] = x[n] ** 2"
reference = "x ** 2"
"""

# what each invented op's Function saves: the output wherever the gradient can be written in it
SAVED = {
    "scaled_tanh": ("y",),        # 6 * (1 - (y / 2) ** 2)
    "scaled_exp": ("y",),         # 2 * y
    "shifted_relu": ("y",),       # y > 0 exactly where x > 1, and 0 at x == 1 on both sides
    "relu_tanh": ("y",),          # (1 - y**2) where y > 0
    "tanh_of_exp": ("x", "y"),    # exp(x) is no multiple of y: x stays, beside y as autograd keeps two results
    "gated": ("x", "g"),          # sigmoid(g) is no multiple of y
    "relu_tie_one": ("x",),       # the gradient at x == 0 is 1, where y == 0 cannot tell x == 0 from x < 0
    "leaky": ("x",),              # the slope's sign is unknown: y > 0 is not proved to be x > 0
    "square": ("x",),             # x is not a single multiple of y
    "abs_diff": ("saved_step",),  # both gradients read a and b only through sign(a - b): saved instead
}
SIZES = [{"n": 5, "d": 3}, {"n": 1, "d": 1}, {"n": 0, "d": 2}, {"n": 4, "d": 4}]


def _invented(tmp_path, op_name: str):
    """One invented op, generated in the contraction style: (op, module, its text)."""
    op = parse_catalog(textwrap.dedent(INVENTED), "invented.toml").op(op_name)
    built = build_op(op, ("contraction",))
    text = render_module(built.derivation, built.lowered["contraction"], "invented.toml", "derive generate",
                         namespace=f"test_saved_{op_name}")
    path = tmp_path / f"{op_name}.py"
    path.write_text(text)
    return op, load_module(path), text


def _saved_by_function(text: str, output: str) -> tuple[str, ...]:
    (function,) = [node for node in ast.parse(text).body if isinstance(node, ast.ClassDef)]
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "save_for_backward"]
    return tuple(output if a.id == "output" else a.id for call in calls for a in call.args)


# one op whose gradient is a multiple of the output, one whose kink moves onto it, one that keeps its input
@pytest.mark.parametrize("op_name", first_by_default(["scaled_tanh", "shifted_relu", "relu_tie_one"], 3)
                         + first_by_default([name for name in SAVED if name not in
                                             ("scaled_tanh", "shifted_relu", "relu_tie_one")], 0))
def test_the_output_stands_in_for_the_input_where_proved(tmp_path, op_name):
    """The Function saves the output where the gradient is written in it, the input elsewhere; either way its
    gradients (float64, on every kink too, and through the Function itself) and tangents are autograd's."""
    op, module, text = _invented(tmp_path, op_name)
    assert _saved_by_function(text, op.output) == SAVED[op_name]
    for sizes in SIZES:
        sizes = {k: v for k, v in sizes.items() if k in dict(op.index_sizes)}
        check_gradients(op, module, sizes=sizes, kinks=True)
    gradcheck_op(op, module)
    check_tangents(op, module, kinks=True)
    inputs = make_inputs(op, {k: 6 for k in dict(op.index_sizes)}, torch.float64)
    on_kinks, _ = kink_inputs(op, inputs)
    for values in (inputs, on_kinks):
        generated = [t.clone().requires_grad_() for t in values]
        expected = [t.clone().requires_grad_() for t in values]
        grad_output = torch.randn(reference(op)(*values).shape, dtype=torch.float64)
        got = torch.autograd.grad(getattr(module, op_name)(*generated), generated, grad_output)
        want = torch.autograd.grad(reference(op)(*expected), expected, grad_output)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    generated_bytes, autograd_bytes = op_saved_bytes(op, module, inputs)
    assert generated_bytes <= autograd_bytes


def test_cross_entropy_twice_differentiable_without_its_logits():
    """The Function keeps target and the log-softmax; a double backward goes through the log-softmax, an output
    of the Function (as autograd's graph goes through log_softmax's saved result); the custom op, which
    returns the loss alone, computes it again from the logits it keeps."""
    module = load_module(GENERATED / "cross_entropy.py")
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2, 2])
    for call in (module.cross_entropy, module.cross_entropy_op):
        assert torch.autograd.gradgradcheck(lambda x: call(x, target), (logits,))
    expected = torch.func.hessian(lambda x: torch.nn.functional.cross_entropy(x, target))(logits)
    torch.testing.assert_close(torch.func.hessian(lambda x: module.cross_entropy(x, target))(logits), expected)


CROSS_ENTROPY = """
[ops.ce]
inputs = ["logits[n, c]", "target[n]"]
integer = ["target"]
equation = "loss = mean(logsumexp(logits[n, c], c) - logits[n, target[n]], n)"
reference = "torch.nn.functional.cross_entropy(logits, target)"
saving = "{policy}"
"""


@pytest.mark.parametrize("policy, saved", [("auto", ("target", "saved_log_softmax")), ("recompute", ("logits", "target")),
                                           ("save", ("target", "saved_log_softmax"))])
def test_the_saving_key_chooses_save_or_recompute(tmp_path, policy, saved):
    """`saving`: "auto" saves the log-softmax (4 passes to recompute, over the cost rule's 2), "recompute" keeps the
    logits and computes it again in the backward, "save" saves it; each gives autograd's gradients."""
    op = parse_catalog(CROSS_ENTROPY.format(policy=policy), "ce.toml").op("ce")
    built = build_op(op, ("contraction",))
    text = render_module(built.derivation, built.lowered["contraction"], "ce.toml", "derive generate",
                         namespace=f"test_saved_ce_{policy}")
    (tmp_path / "ce.py").write_text(text)
    module = load_module(tmp_path / "ce.py")
    assert _saved_by_function(text, op.output) == saved
    check_gradients(op, module, sizes={"n": 4, "c": 3})
    inputs = make_inputs(op, {"n": 4, "c": 3}, torch.float64)
    generated_bytes, autograd_bytes = op_saved_bytes(op, module, inputs)
    assert generated_bytes <= autograd_bytes


def test_an_unknown_saving_policy_is_a_spec_error():
    with pytest.raises(SpecError, match=r"op 'ce': 'saving' is 'never'; expected one of auto, save, recompute"):
        parse_catalog(CROSS_ENTROPY.format(policy="never"), "ce.toml")
