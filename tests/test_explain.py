"""`derive explain` and generated/DERIVATIONS.md: the derivation record rendered for people.

The snapshots under tests/snapshots/ are the exact expected output. After an intended
change, regenerate them by hand and review the diff:

    python -m derive explain linear > tests/snapshots/explain_linear.txt
    python -m derive explain linear --format markdown > tests/snapshots/explain_linear.md
"""

import ast
import functools
import re

import pytest
import torch

from derive import naming
from derive.build import render_catalog
from derive.pipeline import build_op
from derive.cli import main
from derive.emit import render_module
from derive.explain import explain, explain_op, parse_shapes, render_explanation
from derive.naming import DERIVATIONS_FILE
from derive.files import MARKER, is_generated
from derive.model import Catalog
from derive.printing import render_expr, size_bindings
from derive.spec import parse_catalog
from derive.testing import make_inputs, sizes_for

from conftest import CATALOG, GENERATED, OPS, ROOT, built, half_by_default, rendered, shared_builds

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


def _backward_lines(module_text: str, op_name: str) -> set[str]:
    """The stripped lines of `<op>_backward` in a module's text."""
    function = next(node for node in ast.parse(module_text).body
                    if isinstance(node, ast.FunctionDef) and node.name == naming.backward(op_name))
    return {line.strip() for line in ast.get_source_segment(module_text, function).splitlines()}


def _saved_by_function(module_text: str, output: str) -> tuple[str, ...]:
    """What the module's autograd.Function passes to ctx.save_for_backward (`output` for its result). The custom
    op's setup_context saves the same, or, where the Function returns its saved values as differentiable outputs,
    the inputs too (the op returns its result alone, so its double backward computes them again)."""
    (function,) = [node for node in ast.parse(module_text).body if isinstance(node, ast.ClassDef)
                   and any(ast.unparse(base) == "torch.autograd.Function" for base in node.bases)]
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "save_for_backward"]
    saved = {tuple(output if a.id == "output" else a.id for a in call.args) for call in calls}
    assert len(saved) <= 1, saved
    return saved.pop() if saved else ()


def _names(code: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}


def _assert_explains_the_module(explanation, op, modules: dict[str, str]):
    """Every line explain shows for a gradient stands in that style's <op>_backward; the sizes and shared
    values a line uses are shown with it; what a gradient reads is what its lines read; what explain says
    the Function saves is what the module's Function saves."""
    forward_tensors = {t.name for t in op.inputs} | {op.output} | {name for name, _ in explanation.values}
    saved = {style: dict(explanation.saved).get(style, dict(explanation.saved).get(None)) for style in modules}
    for style, text in modules.items():
        assert saved[style] == _saved_by_function(text, op.output), (op.name, style)
        lines = _backward_lines(text, op.name)
        for gradient in explanation.gradients:
            (code,) = [c for c in gradient.code if c.style == style]
            shown = [f"{name} = {value}" for name, value in code.setup] + [code.line]
            # (a gradient a native kernel's joint call computes with others, grad_x, grad_w, grad_b =
            # native_layer_norm_backward(..., [needs_input_grad[0], ...]), is explained as its own call of that kernel)
            joined = {(kernel, target) for line in lines
                      if (found := re.match(r"([\w, ]+) = torch\.ops\.aten\.(\w+)\(", line))
                      for kernel in [found.group(2)] for target in found.group(1).split(", ")}
            missing = [line for line in shown if line not in lines and not (
                (found := re.match(r"(\w+) = torch\.ops\.aten\.(\w+)\(", line)) and
                (found.group(2), found.group(1)) in joined)]
            assert not missing, f"{op.name} ({style}) grad_{gradient.input}: not in the module: {missing}"
            bound = {name for name, _ in code.setup}
            used = set().union(*(_names(line) for line in shown))
            assert {n for n in used if n.startswith(("size_", naming.SHARED_PREFIX))} <= bound, (op.name, style)
            assert set(code.reads) == used & forward_tensors, (op.name, style, gradient.input)
            shaped = dict(explanation.shaped).get(style, dict(explanation.shaped).get(None, ()))
            assert set(code.reads) <= set(saved[style]) | set(shaped), (op.name, style, gradient.input)
            reads = dict(gradient.saved)
            assert reads.get(style, reads.get(None)) == code.reads


@pytest.mark.parametrize("op_name", half_by_default(OPS))
def test_explain_shows_only_lines_of_the_module(op_name):
    """For every catalog op, input and style (the regression: linear_batched's grad_b read size_m off w in
    explain, off grad_y in the module)."""
    op = CATALOG.op(op_name)
    modules = {style: (GENERATED / folder / f"{op_name}.py").read_text()
               for style, folder in (("contraction", ""), ("broadcast", "broadcast"))}
    for gradient in explained(op_name).gradients:
        alone = explain(built_op(op_name), (gradient.input,))
        assert [g.input for g in alone.gradients] == [gradient.input]
        _assert_explains_the_module(alone, op, modules)


INVENTED = """
[ops.scaled_rows]
inputs = ["x[n, k]", "w[k, k2]", "v[n]"]
equation = "y[n] = sum(x[n, k] * w[k, k2] * v[n], k, k2) / 4"
reference = "(x @ w).sum(-1) * v / 4"

[ops.batched_norm]
inputs = ["x[..., d]", "g[d]"]
equation = "y[..., d] = g[d] * (x[..., d] - mean(x[..., d], d))"
reference = "g * (x - x.mean(-1, keepdim=True))"

[ops.one_input]
inputs = ["x[n]"]
equation = "loss = sum(Max(x[n], 0) ** 2, n)"
reference = "(x.clamp_min(0) ** 2).sum()"
"""


@pytest.mark.parametrize("op_name", ["scaled_rows", "batched_norm", "one_input"])
def test_explain_shows_only_lines_of_the_module_on_invented_ops(op_name):
    """The same on ops of a spec of its own: equal sizes for different indices, batch dims, a 0-d output."""
    op = parse_catalog(INVENTED, "invented.toml").op(op_name)
    built = build_op(op)
    modules = {style: render_module(built.derivation, built.lowered[style], "invented.toml", "derive generate")
               for style in built.lowered}
    _assert_explains_the_module(explain(built), op, modules)


def test_explain_reads_sizes_where_the_module_does(capsys):
    code, out, err = explain_cli(capsys, "linear_batched", "--input", "b")
    assert code == 0, err
    assert "size_m = grad_y.shape[-1]" in out and "w.shape[0]" not in out
    assert "saved from the forward: nothing (only grad_y)" in out
    assert "SAVED for the backward: x, w" in out      # what the Function keeps, whichever input is asked


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
    assert "grad_x = torch.ops.aten.threshold_backward(grad_y, y, 0)" in out   # read off the saved output
    assert "saved from the forward: y" in out


def test_explain_one_input_with_markdown_math(capsys):
    code, out, _ = explain_cli(capsys, "linear", "--input", "w", "--format", "markdown")
    assert code == 0
    assert "grad_w" in out and "grad_x" not in out and "grad_b" not in out
    assert "$$\n\\mathrm{grad}_{w}[k, m] = \\sum_{n} \\mathrm{grad}_{y}[n, m] \\cdot x[n, k]\n$$" in out


def built_op(op_name):
    """build_op of a catalog op, shared with every other test of the session that builds it."""
    return built(CATALOG.op(op_name))


@functools.cache
def explained(op_name):
    """explain_op of a catalog op, derived once for all three formats."""
    return explain(built_op(op_name))


# Every op in every format under `-m slow` (CI); by default every op in one format, the formats taken in turn.
FORMATS = ["text", "markdown", "latex", "html"]


@pytest.mark.parametrize("op_name, format", [
    pytest.param(op_name, format, id=f"{format}-{op_name}",
                 marks=[] if (number - FORMATS.index(format)) % len(FORMATS) == 0 else [pytest.mark.slow])
    for number, op_name in enumerate(OPS) for format in FORMATS])
def test_every_op_explains_in_every_format(op_name, format):
    text = render_explanation(explained(op_name), format)
    assert text.endswith("\n") and not re.search(r"[ \t]+\n", text), "no trailing whitespace"
    if format == "html":
        from test_inmem import _Page
        page = _Page()
        page.feed(text)     # every element closed, in order
        assert page.open == [] and text.startswith("<!DOCTYPE html>\n")
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


def test_a_power_of_a_kink_with_its_tie_convention_is_typeset():
    """LaTeX's printer hands a function raised to a power its exponent: Max(..., tie=1) ** 2 crashed the render
    of the derivations document ("unexpected keyword argument 'exp'")."""
    catalog = parse_catalog('[ops.clipped]\ninputs = ["p[n, m]", "t[n, m]"]\nparams = { lo = -0.5 }\n'
                            'equation = "loss = mean(Max(p[n, m] - t[n, m], lo, tie=1) ** 2, n, m)"\n'
                            'reference = "(torch.clamp_min(p - t, -0.5) ** 2).mean()"\n', "clipped.toml")
    document = render_catalog(catalog)[DERIVATIONS_FILE]
    assert re.search(r"\\max\\left\(.*; \\mathrm\{tie\} = 1\\right\)\^\{2\}", document)
