"""Normalizations on torch's native kernels (issue 14, item 2): the outputs of a native normalization backward
that several gradients are come from one call with an output mask (d/dx, d/dw and d/db of a batch norm or a
layer norm), and a group norm, x[*lead, g, c, *rest] over (c, *rest) with a weight over (g, c), runs
native_group_norm and native_group_norm_backward, which has no derivative: a double backward takes the
formulas. Every case is checked against torch's own op (F.batch_norm in training mode, F.group_norm,
F.layer_norm): values, gradients, exact gradient shapes, gradcheck and gradgradcheck in float64."""

import re

import pytest
import torch
import torch.nn.functional as F

import derive
from conftest import generated_module

EPS = 1e-5


def normalized(x: str, dims: str) -> str:
    centered = f"({x} - mean({x}, {dims}))"
    return f"{centered} / sqrt(mean({centered}**2, {dims}) + eps)"


def spec(name: str, x: str, dims: str, weight: str | None, bias: str | None):
    """An op `name` normalizing x over `dims`, times the weight, plus the bias (each an access, or None)."""
    out = x.replace("x[", "y[", 1)
    right = normalized(x, dims) + (f" * {weight}" if weight else "") + (f" + {bias}" if bias else "")
    inputs = [x] + [a for a in (weight, bias) if a]
    return derive.op(f"{out} = {right}", inputs, {"eps": EPS}, name=name)


def batch_norm(x, w=None, b=None):
    return F.batch_norm(x, None, None, w, b, True, 0.0, EPS)


def group_norm(x, w=None, b=None, lead=1):
    """x[*lead, g, c, *rest] as torch's group norm of (N, G*C, HxW), the weight (g, c) flattened."""
    groups = x.shape[lead]
    flat = x.reshape(x.shape[:lead].numel(), groups * x.shape[lead + 1], -1)
    if w is None and b is not None:     # torch's group norm backward fails with a bias and no weight
        return F.group_norm(flat, groups, None, None, EPS).view(x.shape) + b.view(b.shape + (1,) * (x.dim() - lead - 2))
    return F.group_norm(flat, groups, None if w is None else w.flatten(), None if b is None else b.flatten(),
                        EPS).view(x.shape)


def backward_text(op) -> str:
    return op.source.split(f"def {op.name}_backward(", 1)[1].split("\ndef ", 1)[0].split('"""', 2)[2]


def check(op, reference, shapes, constant=False, seed=0):
    """op against `reference` in float64: values, gradients (the backward called directly for every single
    input, exact shapes and None for the others), gradcheck and gradgradcheck; `constant`: x's first slice
    along dim 0 is one value (zero variance where a statistic covers it)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*s, dtype=torch.float64, generator=generator) for s in shapes]
    if constant:
        inputs[0][0] = 0.5
    inputs = [t.requires_grad_() for t in inputs]
    torch.testing.assert_close(op(*inputs), reference(*inputs))
    grad_y = torch.randn(reference(*inputs).shape, dtype=torch.float64, generator=generator)
    want = torch.autograd.grad(reference(*inputs), inputs, grad_y)
    saving = getattr(op.module, f"{op.name}_forward_saving", None)
    saved = saving(*inputs)[1:] if saving else ()
    with torch.no_grad():
        for wanted in [tuple(k == j for k in range(len(inputs))) for j in range(len(inputs))] + [(True,) * len(inputs)]:
            got = op.backward(grad_y, *inputs, *saved, needs_input_grad=wanted)
            for flag, g, w in zip(wanted, got, want):
                if flag:
                    assert g.shape == w.shape
                    torch.testing.assert_close(g, w)
                else:
                    assert g is None
    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


def test_the_catalog_layer_norm_computes_its_three_gradients_in_one_native_call():
    module = generated_module("layer_norm")
    source = open(module.__file__).read().split("def layer_norm_backward(", 1)[1].split("\ndef ", 1)[0]
    assert len(re.findall(r"torch.ops.aten.native_layer_norm_backward\(", source)) == 1, source
    assert ".sum" not in source
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.float64, generator=generator).requires_grad_() for s in ((2, 3), (3,), (3,)))
    x.data[0] = 0.5     # a row of zero variance
    torch.testing.assert_close(module.layer_norm(x, w, b), F.layer_norm(x, (3,), w, b, EPS))
    grad_y = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    want = torch.autograd.grad(F.layer_norm(x, (3,), w, b, EPS), (x, w, b), grad_y)
    _, *saved = module.layer_norm_forward_saving(x, w, b)
    with torch.no_grad():
        for flags in ((True, False, False), (False, True, True), (True, True, True)):
            got = module.layer_norm_backward(grad_y, x, w, b, *saved, needs_input_grad=flags)
            for flag, g, expected in zip(flags, got, want):
                assert (g is None) != flag
                if flag:
                    assert g.shape == expected.shape
                    torch.testing.assert_close(g, expected)
    assert torch.autograd.gradgradcheck(module.layer_norm, (x, w, b))


@pytest.mark.slow
def test_a_batch_norm_backward_is_one_native_call_for_all_three_gradients():
    op = spec("norm_channel", "x[n, c, l]", "n, l", "w[c]", "b[c]")
    text = backward_text(op)
    assert len(re.findall(r"torch.ops.aten.native_batch_norm_backward\(", text)) == 1, text
    assert "[needs_input_grad[0], needs_input_grad[1], needs_input_grad[2]]" in text
    assert ".sum(" not in text     # the bias's gradient too
    check(op, batch_norm, [(2, 2, 2), (2,), (2,)], constant=True)


def test_a_group_norm_runs_native_group_norm_and_falls_back_in_a_double_backward():
    op = spec("norm_group", "x[n, g, c, l]", "c, l", "w[g, c]", "b[g, c]")
    assert "torch.native_group_norm(x.flatten(1, 2), w.flatten(), b.flatten()" in op.source
    text = backward_text(op)
    native, fallback = text.split("return (grad_x, grad_w, grad_b)", 1)
    assert "if not torch.is_grad_enabled():" in native
    assert len(re.findall(r"torch.ops.aten.native_group_norm_backward\(", native)) == 1
    assert "native_group_norm_backward" not in fallback          # the formulas, which a double backward differentiates
    check(op, group_norm, [(2, 2, 2, 2), (2, 2), (2, 2)], constant=True)    # equal sizes for different indices


# Sweeps ---------------------------------------------------------------------------------------------------

AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.slow
@pytest.mark.parametrize("weight, bias", AFFINE)
def test_batch_norm_with_and_without_affine_terms(weight, bias):
    op = spec(f"bn_{weight:d}{bias:d}", "x[n, c, l]", "n, l", "w[c]" if weight else None, "b[c]" if bias else None)
    shapes = [(3, 2, 2)] + [(2,)] * (weight + bias)

    def reference(x, *affine):
        w = affine[0] if weight else None
        b = affine[-1] if bias else None
        return batch_norm(x, w, b)
    check(op, reference, shapes, constant=True)
    check(op, reference, [(2, 1, 1)] + [(1,)] * (weight + bias))      # one channel, one position


@pytest.mark.slow
@pytest.mark.parametrize("weight, bias", AFFINE)
def test_layer_norm_with_and_without_affine_terms(weight, bias):
    op = spec(f"ln_{weight:d}{bias:d}", "x[n, t, d]", "t, d", "w[t, d]" if weight else None,
              "b[t, d]" if bias else None)
    if weight and bias:
        assert len(re.findall(r"torch.ops.aten.native_layer_norm_backward\(", backward_text(op))) == 1

    def reference(x, *affine):
        w = affine[0] if weight else None
        b = affine[-1] if bias else None
        return F.layer_norm(x, x.shape[-2:], w, b, EPS)
    check(op, reference, [(2, 2, 2)] + [(2, 2)] * (weight + bias), constant=True)


@pytest.mark.slow
@pytest.mark.parametrize("weight, bias", AFFINE)
def test_group_norm_with_and_without_affine_terms(weight, bias):
    op = spec(f"gn_{weight:d}{bias:d}", "x[n, g, c, l]", "c, l", "w[g, c]" if weight else None,
              "b[g, c]" if bias else None)

    def reference(x, *affine):
        w = affine[0] if weight else None
        b = affine[-1] if bias else None
        return group_norm(x, w, b)
    for shapes in ([(2, 3, 2, 2)], [(1, 2, 1, 3)], [(2, 1, 1, 1)]):   # equal sizes; size-1 channels, groups
        check(op, reference, shapes + [shapes[0][1:3]] * (weight + bias), constant=True)


@pytest.mark.slow
@pytest.mark.parametrize("x, dims, weight, lead", [
    ("x[n, g, c]", "c", "w[g, c]", 1),                  # no spatial dims: HxW = 1
    ("x[a, n, g, c, l]", "c, l", "w[g, c]", 2),          # two leading dims
    ("x[g, c, l]", "c, l", "w[g, c]", 0),                # none
    ("x[n, g, c, h, l]", "c, h, l", "w[g, c]", 1),       # two spatial dims
])
def test_group_norm_layouts(x, dims, weight, lead):
    op = spec(f"gn_lead{lead}_{len(dims)}", x, dims, weight, weight.replace("w", "b"))
    assert "torch.native_group_norm(" in op.source
    rank = x.count(",") + 1
    shape = (2, 3, 2, 2, 3)[:rank]
    wshape = shape[lead:lead + 2]
    check(op, lambda x, w, b: group_norm(x, w, b, lead), [shape, wshape, wshape], constant=True)


@pytest.mark.slow
@pytest.mark.parametrize("x, dims, weight, axes, waxes", [
    ("x[n, c, l]", "n", "w[c, l]", (0,), None),                  # the batch alone, a weight over the rest
    ("x[n, c, l]", "c", "w[c]", (1,), (1,)),                     # a middle dim
    ("x[n, g, c, l]", "c, l", "w[c]", (2, 3), (2,)),             # a group norm with a weight per c alone
    ("x[n, g, c, l]", "g, l", "w[g, c]", (1, 3), (1, 2)),        # statistics over g and l
])
def test_other_normalizations_still_derive_right(x, dims, weight, axes, waxes):
    op = spec(f"other_{len(axes)}_{x.count(',')}_{weight.count(',')}_{dims[0]}", x, dims, weight, None)
    rank = x.count(",") + 1

    def reference(x, w):
        mean = x.mean(axes, keepdim=True)
        scale = w if waxes is None else w.reshape([x.shape[k] if k in waxes else 1 for k in range(rank)])
        return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(axes, keepdim=True) + EPS) * scale
    shape = (2, 3, 2, 2)[:rank]
    wshape = shape[1:] if waxes is None else tuple(shape[k] for k in waxes)
    check(op, reference, [shape, wshape], constant=True)


@pytest.mark.slow
def test_the_fused_style_compiles_a_group_norm_and_matches(tmp_path):
    """torch.compile's shape rules for native_group_norm want x as (N, G*C, *rest) and a flat weight."""
    from derive.build import render_catalog
    from derive.spec import parse_catalog
    from derive.testing import load_module
    right = normalized("x[n, g, c, l]", "c, l") + " * w[g, c] + b[g, c]"
    catalog = parse_catalog(f'[ops.gn_fused]\ninputs = ["x[n, g, c, l]", "w[g, c]", "b[g, c]"]\n'
                            f'params = {{ eps = 1e-5 }}\nequation = "y[n, g, c, l] = {right}"\n', "gn_fused.toml")
    modules = {}
    for path, text in render_catalog(catalog, ("contraction", "fused"), namespace="norm_native_fused", jobs=1).items():
        if path.endswith("gn_fused.py"):
            target = tmp_path / path.replace("/", "_")
            target.write_text(text)
            modules["fused" if path.startswith("fused/") else "contraction"] = load_module(target).gn_fused
    for n in (3, 5):     # another batch size: no recompilation needed, same results
        inputs = [torch.randn(*s).requires_grad_() for s in ((n, 2, 3, 4), (2, 3), (2, 3))]
        grad_y = torch.randn(n, 2, 3, 4)
        want = torch.autograd.grad(group_norm(*inputs), inputs, grad_y)
        for style, forward in modules.items():
            torch.testing.assert_close(forward(*inputs), group_norm(*inputs), rtol=1e-4, atol=1e-4)
            for got, expected in zip(torch.autograd.grad(forward(*inputs), inputs, grad_y), want):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
