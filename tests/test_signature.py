"""The signature record: what the backward takes, reads and has saved, decided once per op and style."""

import ast
import re

import pytest
import torch

from derive import naming
from derive.build import STYLE_DIRS, build_op, render_catalog
from derive.spec import parse_catalog
from derive.testing import autograd_gradients, check_tangents, gradcheck_op, load_module, reference

from conftest import CATALOG, GENERATED, OPS, half_by_default


def _backward_reads(module_text: str, op) -> set[str]:
    """The forward's tensors `<op>_backward` reads, from its text (the shape contract's call aside: it
    takes every input, None where the Function does not keep it; and the hand-over of a call with optional
    inputs None to the op without them, `if b is None: ...`, which the Function keeps them for)."""
    function = next(node for node in ast.parse(module_text).body
                    if isinstance(node, ast.FunctionDef) and node.name == naming.backward(op.name))
    body = [statement for statement in function.body[1:]
            if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
                    and getattr(statement.value.func, "id", "") == naming.check_shapes(op.name))
            and not (isinstance(statement, ast.If) and op.optional and _is_none_test(statement.test))]
    return {node.id for statement in body for node in ast.walk(statement) if isinstance(node, ast.Name)}


def _is_none_test(test: ast.expr) -> bool:
    """`b is None`, `w is None and b is None`."""
    if isinstance(test, ast.BoolOp):
        return all(_is_none_test(value) for value in test.values)
    return isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Is)


def _saved(module_text: str, output: str) -> tuple[str, ...]:
    """What the autograd.Function's setup_context saves (the custom op may keep more: see its backward)."""
    (function,) = [node for node in ast.parse(module_text).body if isinstance(node, ast.ClassDef)
                   and any(ast.unparse(base) == "torch.autograd.Function" for base in node.bases)]
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "save_for_backward"]
    return tuple(output if a.id == "output" else a.id for a in calls[0].args) if calls else ()


@pytest.mark.parametrize("op_name", half_by_default(OPS))
def test_the_signature_is_what_the_module_does(op_name):
    """What the signature says the backward reads is what its code reads; the Function saves what the
    signature says, which holds every tensor the backward reads; its arguments are the backward's."""
    op = CATALOG.op(op_name)
    built = build_op(op)
    for style, signature in built.signatures.items():
        text = (GENERATED / STYLE_DIRS[style] / naming.module_file(op_name)).read_text(encoding="utf-8")
        forward_tensors = {t.name for t in op.inputs} | {op.output} | set(signature.values)
        assert set(signature.reads) == _backward_reads(text, op) & forward_tensors, style
        assert _saved(text, op.output) == signature.saved, style
        assert set(signature.reads) <= set(signature.saved) | set(signature.shaped), style
        for name in signature.shaped:      # kept as its shape: the backward's code reads nothing else of it
            absent = f"None if {name} is None else " if name in op.optional_names else ""   # or whether it is None
            assert f"ctx.{naming.shape_of(name)} = {absent}{name}.shape" in text, style
            body = text.split(f"def {naming.backward(op_name)}(", 1)[1].split("\ndef ", 1)[0].split('"""')[2]
            # (comments are no reads; a native kernel's joint call takes the shape's stand-in, a tensor of no data
            # the Function builds from the shape, for the kernel to shape grad_b like it: it reads its shape alone)
            code = [re.sub(rf"(torch\.ops\.aten\.native_\w+\(.*), {name}, \[", r"\1, [", line.split("#", 1)[0])
                    for line in body.splitlines() if naming.check_shapes(op_name) not in line]
            assert not any(re.search(rf"\b{name}\b(?!\.shape|\.numel\(\)|\.dim\(\)| is None)", line)
                           for line in code), (style, name)
        assert set().union(*(g.reads for g in signature.gradients)) == set(signature.reads), style
        arguments = [a.arg for a in next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)
                                         and node.name == naming.backward(op_name)).args.args]
        assert tuple(arguments) == signature.arguments + tuple(p.name for p in op.params), style


def _one_op_module(tmp_path, toml: str, style: str):
    """The op of a one-op spec and its generated module in `style`, under a namespace of this test's own."""
    catalog = parse_catalog(toml, "spec.toml")
    files = render_catalog(catalog, (style,), namespace=f"test_{tmp_path.name}".replace("-", "_"))
    (text,) = [t for p, t in files.items() if p.endswith(".py")]
    path = tmp_path / f"{catalog.ops[0].name}.py"
    path.write_text(text)
    return catalog.ops[0], load_module(path)


SHIFTED_MEAN = """
[ops.shifted_mean]
inputs = ["x[...]", "s[...]"]
differentiable = ["x"]
equation = "loss = mean(x[...] + s[...], ...)"
reference = "(x + s).mean()"
"""


@pytest.mark.parametrize("style", list(STYLE_DIRS))
@pytest.mark.parametrize("x_shape, s_shape", [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), (1,)), ((1,), (1,)),
                                              ((2, 1), (2, 5))])
def test_the_function_keeps_every_tensor_a_size_is_read_off(tmp_path, style, x_shape, s_shape):
    """The regression: size_batch is read off x and s (their batch dims may broadcast), and s is read for
    nothing else; the Function kept only x, and its backward failed on s = None. Now both are read for their
    shapes alone, which the Function keeps (x_shape, s_shape), and no tensor."""
    op, module = _one_op_module(tmp_path, SHIFTED_MEAN, style)
    signature = build_op(op).signatures[style]
    assert (signature.saved, signature.shaped) == ((), ("x", "s"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    s = torch.randn(s_shape, generator=generator, dtype=torch.float64)
    loss = module.shifted_mean(x, s)
    (grad_x,) = torch.autograd.grad(loss, x)
    (expected, _) = autograd_gradients(reference(op), [x, s], torch.ones(()), [True, False])
    assert grad_x.shape == x.shape
    torch.testing.assert_close(grad_x, expected)


OUTER_ADD = """
[ops.outer_add]
inputs = ["x[n]", "w[m]"]
differentiable = ["x"]
equation = "y[n, m] = x[n] + w[m]"
reference = "x[:, None] + w[None, :]"
"""


@pytest.mark.parametrize("style", list(STYLE_DIRS))
@pytest.mark.parametrize("sizes", [{"n": 3, "m": 4}, {"n": 3, "m": 3}, {"n": 1, "m": 1}])
def test_a_single_tangent_share_narrower_than_the_output_is_expanded(tmp_path, style, sizes):
    """The regression: with one differentiable input whose share lacks a dim of the result, <op>_jvp's
    one-share return was written `(share)True`, and derive refused the valid spec as an internal error."""
    op, module = _one_op_module(tmp_path, OUTER_ADD, style)
    check_tangents(op, module, sizes=sizes)
    gradcheck_op(op, module, sizes=sizes)
