"""The fused-kernel table (derive/kernels.py): one record per kernel, applied by one stage, contraction style only."""

import re
import textwrap
from dataclasses import replace

import pytest
import sympy

from derive import kernels
from derive.build import build_op, render_catalog
from derive.derivation import derive
from derive.kernels import KERNELS, Kernel, Fused, fuse
from derive.plan import plan
from derive.printing import TorchCodePrinter, kernel_comments, render_expr
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, gradcheck_op, load_module

from conftest import CATALOG, GENERATED, ROOT, STYLES

# a call of an aten kernel, or of a torch function that is some op's backward (not the module's own
# `<op>_backward`, which no `torch.` qualifies)
KERNEL_CALL = re.compile(r"torch\.ops\.aten\.|torch\.[\w.]*_backward\w*\(")


def test_broadcast_modules_spell_out_every_formula():
    modules = sorted((GENERATED / "broadcast").glob("*.py"))
    assert modules
    for path in modules:
        calls = [line.strip() for line in path.read_text().splitlines() if KERNEL_CALL.search(line)]
        assert not calls, (path.name, calls)


def test_the_printer_prints_a_where_as_a_where():
    """Choosing a kernel is the fusion stage's: the printer spells out the step it is given."""
    x, g = sympy.IndexedBase("x"), sympy.IndexedBase("g")
    n = sympy.Idx("n", 5)
    step = sympy.Piecewise((0, x[n] <= 0), (g[n], True))
    assert TorchCodePrinter(("n",)).doprint(step) == "torch.where(x <= 0, 0, g)"
    leaky = sympy.Piecewise((g[n], x[n] > 0), (sympy.Rational(1, 100) * g[n], True))
    assert TorchCodePrinter(("n",)).doprint(leaky) == "torch.where(x > 0, g, g / 100)"


def spec_module(tmp_path, text, style):
    catalog = parse_catalog(textwrap.dedent(text), "test.toml")
    files = render_catalog(catalog, (style,), namespace=f"test_{tmp_path.name}_{style}".replace("-", "_"))
    (path, source), = [(p, s) for p, s in files.items() if p.endswith(".py")]
    target = tmp_path / path.replace("/", "_")
    target.write_text(source)
    return catalog.ops[0], load_module(target), source


# ops invented here: a step wrapping a product over its dims, a scaled step, a step of an expression,
# a step whose other factor is over fewer dims, a leaky step with a param slope
STEPS = {
    "weighted_relu": ('''
        inputs = ["x[n, d]", "w[d]"]
        equation = "y[n, d] = Max(x[n, d], 0, tie=0) * w[d]"
        reference = "torch.relu(x) * w"
    ''', "torch.ops.aten.threshold_backward(grad_y * w, x, 0)"),
    "scaled_relu": ('''
        inputs = ["x[n]"]
        equation = "y[n] = 3 * Max(x[n], 0, tie=0)"
        reference = "3 * torch.relu(x)"
    ''', "torch.ops.aten.threshold_backward(3 * grad_y, y, 0)"),
    "hinge": ('''
        inputs = ["x[n]"]
        equation = "loss = sum(Max(1 - x[n], 0, tie=0), n)"
        reference = "torch.relu(1 - x).sum()"
    ''', None),
    "row_scaled_leaky": ('''
        inputs = ["x[n, d]", "s[n]"]
        params = { slope = 0.2 }
        equation = "y[n, d] = where(x[n, d] > 0, x[n, d], slope * x[n, d]) * s[n]"
        reference = "torch.nn.functional.leaky_relu(x, slope) * s[:, None]"
    ''', "torch.ops.aten.leaky_relu_backward(grad_y * s.unsqueeze(-1), x, slope, False)"),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", STEPS)
def test_steps_fuse_in_the_contraction_style_only(tmp_path, name, style):
    body, expected = STEPS[name]
    op, module, source = spec_module(tmp_path, f"[ops.{name}]" + textwrap.dedent(body), style)
    backward = source.split(f"def {name}_backward", 1)[1].split("\ndef ", 1)[0]
    if style == "broadcast":
        assert not KERNEL_CALL.search(source), source
    elif expected is not None:
        assert expected in backward, backward
    for sizes in ({"n": 3, "d": 4}, {"n": 1, "d": 1}, {"n": 0, "d": 3}, {"n": 4, "d": 4}):
        check_gradients(op, module, sizes={k: v for k, v in sizes.items() if k in dict(op.index_sizes)}, kinks=True)
    gradcheck_op(op, module)
    check_tangents(op, module, kinks=True)


def test_fusion_is_a_stage_of_its_own():
    """plan() plans what it is given: the derivation as derived keeps its step, the fused one has the call."""
    derivation = derive(CATALOG.op("relu"))
    (term,) = plan(derivation).gradients[0].terms
    assert any(isinstance(o.expr, sympy.Piecewise) for o in term.operands)
    (fused,) = plan(fuse(derivation)).gradients[0].terms
    assert [type(o.expr).__name__ for o in fused.operands] == ["threshold_backward"]
    assert fuse(derivation).gradients[0].vjp == derivation.gradients[0].vjp     # the docs keep the formula


def test_every_kernel_is_one_record_with_its_own_node():
    called = [k for k in KERNELS if k.node is not None]
    assert len({k.node for k in called}) == len(called) and len({k.name for k in KERNELS}) == len(KERNELS)
    assert all(issubclass(k.node, Fused) and k.formulas for k in called)
    assert all(k.save is not None for k in KERNELS if k.node is None)     # a record without a call only saves
    assert set(kernels.KERNEL_OF) == {k.node for k in called}


def readme_kernel() -> Kernel:
    """The record README's "Add a fused kernel" appends to the table, from its code block."""
    section = (ROOT / "README.md").read_text().split("### Add a fused kernel", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"Fused": Fused, "Kernel": Kernel, "sympy": sympy, "replace": replace}
    exec(code, namespace)
    return namespace["KERNELS"][-1]


def test_a_new_kernel_is_one_record(tmp_path, monkeypatch):
    """The README's example: one record added to the table, and the contraction style calls the kernel,
    with its comment, in the backward and in the jvp; the broadcast style keeps the formula."""
    sigmoid = readme_kernel()
    monkeypatch.setattr(kernels, "KERNELS", KERNELS + (sigmoid,))
    monkeypatch.setitem(kernels.KERNEL_OF, sigmoid.node, sigmoid)
    spec = '''
        [ops.scaled_sigmoid]
        inputs = ["x[n, d]", "w[d]"]
        equation = "y[n, d] = w[d] / (1 + exp(-x[n, d]))"
        reference = "w * torch.sigmoid(x)"
    '''
    op, module, source = spec_module(tmp_path, spec, "contraction")
    lines = source.splitlines()
    calls = [number for number, line in enumerate(lines) if "torch.ops.aten.sigmoid_backward(" in line]
    assert len(calls) == 2, source      # the backward's grad_x and the jvp's share of tangent_x
    for number in calls:
        assert lines[number - 1].strip() == "# sigmoid_backward(g, y) = g * y * (1 - y)"
    check_gradients(op, module, sizes={"n": 3, "d": 4})
    gradcheck_op(op, module)
    check_tangents(op, module)
    _, _, broadcast = spec_module(tmp_path, spec, "broadcast")
    assert "torch.ops.aten.sigmoid_backward(" not in broadcast and not KERNEL_CALL.search(broadcast)


def test_comments_come_from_the_records_of_the_calls():
    """Each gradient's comments are the formulas of the calls its code makes, and of no other."""
    lowered = build_op(CATALOG.op("layer_norm")).lowered["contraction"]
    by_target = {g.plan.target: kernel_comments([g]) for g in lowered.gradients}
    assert by_target["grad_x"] == (kernels.LAYER_NORM_FORMULAS[0],)
    assert by_target["grad_w"] == (kernels.LAYER_NORM_FORMULAS[1],)
    assert by_target["grad_b"] == (kernels.LAYER_NORM_FORMULAS[2],)
    assert "native_layer_norm_backward" in render_expr(lowered.gradients[0])
