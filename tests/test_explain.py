"""`derive explain` and generated/DERIVATIONS.md: the derivation record rendered for people.

The snapshots under tests/snapshots/ are the exact expected output. After an intended
change, regenerate them by hand and review the diff:

    python -m derive explain linear > tests/snapshots/explain_linear.txt
    python -m derive explain linear --format markdown > tests/snapshots/explain_linear.md
"""

import functools
import re

import pytest
import torch

from derive import naming
from derive.build import render_catalog
from derive.cli import main
from derive.explain import DERIVATIONS_FILE, explain_op, parse_shapes, render_explanation
from derive.files import MARKER, is_generated
from derive.model import Catalog
from derive.printing import render_expr, size_bindings
from derive.testing import make_inputs, sizes_for

from conftest import CATALOG, GENERATED, OPS, ROOT, built, rendered, shared_builds

SNAPSHOTS = ROOT / "tests" / "snapshots"


@pytest.fixture(autouse=True)
def each_op_built_once():
    """`derive explain` and explain_op build the op they explain; these tests explain the catalog's ops
    over and over: they share one build per op in the session (with the catalog's rendering too)."""
    with shared_builds():
        yield


def explain_cli(capsys, *args):
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("format, snapshot", [("text", "explain_linear.txt"), ("markdown", "explain_linear.md")])
def test_explain_linear_matches_snapshot(capsys, format, snapshot):
    code, out, err = explain_cli(capsys, "linear", "--format", format)
    assert code == 0, err
    assert out == (SNAPSHOTS / snapshot).read_text(encoding="utf-8")


def test_explain_linear_reproduces_the_seed_reasoning(capsys):
    """The seed's shape arguments for all three gradients, with its own sizes."""
    code, out, _ = explain_cli(capsys, "linear", "--shapes", "n=1000,k=784,m=50")
    assert code == 0
    assert "(1000, 1, 50) × (784, 50) → (1000, 784, 50) → sum(dim=-1) → (1000, 784)" in out
    assert "(1000, 784, 1) × (1000, 1, 50) → (1000, 784, 50) → sum(dim=0) → (784, 50)" in out
    assert "(1000, 50) → sum(0) → (50,)" in out
    for line in ("grad_x = (grad_y.unsqueeze(1) * w).sum(dim=-1)", "grad_x = grad_y @ w.T",
                 "grad_w = (x.unsqueeze(-1) * grad_y.unsqueeze(1)).sum(dim=0)", "grad_w = x.T @ grad_y",
                 "grad_b = grad_y.sum(0)"):
        assert line in out
    assert "saved from the forward: w" in out and "saved from the forward: x" in out
    assert "SAVED for the backward: x, w" in out


def test_explained_code_is_the_generated_code():
    """One record: the lines explain shows are the lines in generated/ (no second derivation)."""
    explanation = explain_op(CATALOG.op("linear"))
    for style, folder in (("contraction", GENERATED), ("broadcast", GENERATED / "broadcast")):
        module = (folder / "linear.py").read_text()
        for gradient in explanation.gradients:
            (line,) = [c.line for c in gradient.code if c.style == style]
            assert f"        {line}\n" in module


# One op per kind of plan: a contraction, a scaled loss, a kink, batch dims, a gather.
SHAPE_OPS = [name for name in ("linear", "mse", "relu", "matmul", "embedding") if name in OPS]


@pytest.mark.parametrize("op_name", SHAPE_OPS)
def test_shape_table_multiplies_out_to_the_real_shapes(op_name):
    """Run the broadcast code with concrete sizes: every shape in the table is the tensor's real shape."""
    op = CATALOG.op(op_name)
    sizes = sizes_for(op)
    explanation = explain_op(op, sizes={i: (sizes[r],) for i, r in op.index_sizes if i == r})
    inputs = make_inputs(op, sizes)
    scope = {"torch": torch, **{p.name: p.default for p in op.params}, **{t.name: v for t, v in zip(op.inputs, inputs)}}
    scope.update({naming.size(r): sizes[r] for r in set(dict(op.index_sizes).values())})
    output = torch.as_tensor(_evaluate_forward(op, scope))
    scope[op.output] = output
    scope[naming.grad(op.output)] = torch.randn(output.shape, dtype=output.dtype)
    for gradient in explanation.gradients:
        expected = tuple(scope[gradient.input].shape)
        assert gradient.shape.values == expected
        for term in gradient.terms:
            for operand in term.operands:
                assert tuple(eval(operand.code, scope).shape) == operand.lined_up_shape.values
                access = re.fullmatch(r"(\w+)(\[[\w., ]*\])?", operand.notation)
                if access:     # a plain tensor: its own shape too
                    assert tuple(scope[access[1]].shape) == operand.shape.values
            value = eval(term.product_code, scope)
            if term.product is not None:
                assert tuple(value.shape) == term.product.values
            if term.reduction:
                value = eval(f"({term.product_code}).{term.reduction}", scope)
            assert tuple(value.shape) == term.reduced.values
            assert term.result.values == expected
        for code in gradient.code:
            local = dict(scope)
            for name, text in code.setup:
                local[name] = eval(text, local)
            _, _, text = code.line.partition(" = ")
            assert tuple(eval(text, local).shape) == expected, (code.style, code.line)


def _evaluate_forward(op, scope):
    """The op's forward, as its generated module computes it."""
    forward = built(op).lowered["contraction"].forward
    local = dict(scope)
    for name, text in size_bindings(op, [forward]):
        local[name] = eval(text, local)
    return eval(render_expr(forward), local)


def test_explain_relu_states_the_kink_value(capsys):
    code, out, err = explain_cli(capsys, "relu")
    assert code == 0, err
    assert "x[...] = 0: the gradient jumps" in out
    assert "x[...] = 0: grad_x[...] = 0" in out
    assert "θ(x[" in out
    assert "grad_x = torch.ops.aten.threshold_backward(grad_y, x, 0)" in out
    assert "saved from the forward: x" in out


def test_explain_one_input_with_markdown_math(capsys):
    code, out, _ = explain_cli(capsys, "linear", "--input", "w", "--format", "markdown")
    assert code == 0
    assert "grad_w" in out and "grad_x" not in out and "grad_b" not in out
    assert "$$\n\\mathrm{grad}_{w}[k, m] = \\sum_{n} \\mathrm{grad}_{y}[n, m] \\cdot x[n, k]\n$$" in out


@functools.cache
def explained(op_name):
    """explain_op of a catalog op, derived once for all three formats."""
    return explain_op(CATALOG.op(op_name))


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("format", ["text", "markdown", "latex"])
def test_every_op_explains_in_every_format(op_name, format):
    text = render_explanation(explained(op_name), format)
    assert text.endswith("\n") and not re.search(r"[ \t]+\n", text), "no trailing whitespace"
    if format == "latex":
        assert text.count("\\begin{") == text.count("\\end{")
        body = re.sub(r"\\begin\{verbatim\}.*?\\end\{verbatim\}", "", text, flags=re.S).replace("\\{", "").replace("\\}", "")
        assert body.count("{") == body.count("}")


def test_batch_dims_take_several_sizes():
    op = CATALOG.op("matmul") if "matmul" in OPS else pytest.skip("no batched op in the catalog")
    explanation = explain_op(op, sizes=parse_shapes("...=4x3,i=2,k=5,j=6", op))
    grad_a = explanation.gradients[0]
    assert grad_a.shape.values == (4, 3, 2, 5)


@pytest.mark.parametrize("args, message", [
    (["nope"], "no op named 'nope'"),
    (["linear", "--input", "y"], "'y' is not a differentiable input of linear"),
    (["linear", "--shapes", "n=0"], "bad --shapes item 'n=0'"),
    (["linear", "--shapes", "n"], "bad --shapes item 'n'"),
    (["linear", "--shapes", "q=3"], "--shapes names 'q', which is not an index of linear"),
])
def test_explain_errors_are_one_line(capsys, args, message):
    code, out, err = explain_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_derivations_document_is_generated_and_checked():
    files = rendered(CATALOG)
    document = files[DERIVATIONS_FILE]
    first = document.splitlines()[0]
    assert first.startswith("<!--") and MARKER in first and first.endswith("-->")
    assert is_generated(GENERATED / DERIVATIONS_FILE)
    assert (GENERATED / DERIVATIONS_FILE).read_text(encoding="utf-8") == document
    for op in CATALOG.ops:
        assert f"\n## {op.name}\n" in document
    assert "$$\n\\mathrm{grad}_{x}[n, k] = \\sum_{m} \\mathrm{grad}_{y}[n, m] \\cdot w[k, m]\n$$" in document
    assert "sum(dim=-1)  [ size_n ][ size_k ] --sum---" in document
    # only a rendering with the contraction style writes the document (a one-op catalog shows it)
    relu = Catalog(CATALOG.path, (CATALOG.op("relu"),))
    assert DERIVATIONS_FILE in render_catalog(relu, styles=("contraction",))
    assert DERIVATIONS_FILE not in render_catalog(relu, styles=("broadcast",))
    assert f"(generated/{DERIVATIONS_FILE})" in (ROOT / "README.md").read_text()
