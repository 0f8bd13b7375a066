"""Max and min reductions, three mechanisms (issue 13, item 3):

- a value that recurs under other index names (the tie mask of a max, in the count that divides it and beside
  it) is one shared value (lower._renamed_repeats, seeded before cse): the backward builds it once;
- a window max with tie="first" over a whole read of an input computes its maxima and first positions in one
  torch.max_pool1d_with_indices call (kernels.NativePool), with F.max_pool1d's values, positions and gradient,
  ties, padding and NaN included;
- max and min over the batch dims `...`, with other indices or alone, both tie conventions, against
  torch.amax / torch.max of the flattened batch, for batch dims of every count (none, one of size 1, two),
  an empty batch refused naming the op.

Each is checked in both styles, on inputs with exact ties (whole numbers from a small range), against autograd
of the torch reference, with float64 gradcheck and gradgradcheck through the generated Function.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from derive.testing import autograd_gradients, gradcheck_op, load_module, reference

from conftest import written_specs

STYLES = ("contraction", "broadcast")
FIRST = ', tie=\\"first\\"'


def spec(inputs, equation, ref, **extra) -> str:
    lines = [f"inputs = {inputs!r}".replace("'", '"'), f'equation = "{equation}"', f'reference = "{ref}"']
    return "\n".join(lines + [f"{key} = {value}" for key, value in extra.items()]) + "\n"


# the same mask under two index namings: d max / dx = mask / count(mask)
SHARED = {
    "max_split": spec(["x[n, c]"], "y[n] = max(x[n, c], c)", "torch.amax(x, 1)"),
    "min_split": spec(["x[n, c]"], "y[n] = min(x[n, c], c)", "torch.amin(x, 1)"),
    "max_of_exp": spec(["x[n, c]"], "y[n] = max(exp(x[n, c]), c)", "torch.amax(torch.exp(x), 1)"),
    "max_two_dims": spec(["x[n, c, k]"], "y[n] = max(x[n, c, k], c, k)", "torch.amax(x, (1, 2))"),
    "centered_min": spec(["x[n, c]"], "y[n, c] = x[n, c] - min(x[n, c], c)", "x - torch.amin(x, 1, keepdim=True)"),
}
POOLS = {
    "pool_first": spec(["x[n, c, l]"], f"y[n, c, t] = max(x[n, c, 2*t + k], k{FIRST})",
                       "torch.nn.functional.max_pool1d(x, 2)", sizes="{ k = 2 }"),
    "pool_k3_s1_rows": spec(["x[n, l]"], f"y[n, t] = max(x[n, t + k], k{FIRST})",
                            "torch.nn.functional.max_pool1d(x.unsqueeze(1), 3, 1).squeeze(1)", sizes="{ k = 3 }"),
    "pool_padded": spec(["x[n, c, l]"], f"y[n, c, t] = max(x[n, c, 2*t + k - 1], k{FIRST})",
                        "torch.nn.functional.max_pool1d(x, 3, 2, padding=1)", sizes="{ k = 3 }",
                        pad="{ x = { l = 1 } }", pad_value="{ x = -inf }"),
    "pool_four_dims": spec(["x[a, b, c, l]"], f"y[a, b, c, t] = max(x[a, b, c, 2*t + k], k{FIRST})",
                           "torch.nn.functional.max_pool1d(x.flatten(0, 1), 2).unflatten(0, x.shape[:2])",
                           sizes="{ k = 2 }"),
}
# window maxima torch's pooling kernel does not compute as written: they keep their formulas
NOT_POOLS = {
    "pool_dilated": spec(["x[n, c, l]"], f"y[n, c, t] = max(x[n, c, t + 2*k], k{FIRST})",
                         "torch.nn.functional.max_pool1d(x, 2, 1, dilation=2)", sizes="{ k = 2 }"),
    "pool_min": spec(["x[n, c, l]"], f"y[n, c, t] = min(x[n, c, 2*t + k], k{FIRST})",
                     "-torch.nn.functional.max_pool1d(-x, 2)", sizes="{ k = 2 }"),
    "pool_split": spec(["x[n, c, l]"], "y[n, c, t] = max(x[n, c, 2*t + k], k)",
                       "x.unfold(2, 2, 2).amax(-1)", sizes="{ k = 2 }"),
    "pool_zero_padded": spec(["x[n, c, l]"], f"y[n, c, t] = max(x[n, c, 2*t + k - 1], k{FIRST})",
                             "torch.nn.functional.pad(x, (1, 1)).unfold(2, 3, 2).max(-1)[0]", sizes="{ k = 3 }",
                             pad="{ x = { l = 1 } }"),
}
BATCH = {
    "batch_max": spec(["x[..., c]"], "y[c] = max(x[..., c], ...)", "x.reshape(-1, x.shape[-1]).amax(0)"),
    "batch_min_first": spec(["x[..., c]"], f"y[c] = min(x[..., c], ...{FIRST})", "x.reshape(-1, x.shape[-1]).min(0)[0]"),
    "batch_whole_max": spec(["x[...]"], "y = max(x[...], ...)", "torch.amax(x)"),
    "batch_whole_first": spec(["x[...]"], f"y = max(x[...], ...{FIRST})", "x.flatten().max(0)[0]"),
    "batch_and_index_min": spec(["x[..., c]"], "y = min(x[..., c], ..., c)", "torch.amin(x)"),
    "batch_of_product": spec(["a[..., c]", "b[c]"], "y[c] = max(a[..., c] * b[c], ...)",
                             "(a * b).reshape(-1, b.shape[-1]).amax(0)"),
    "batch_in_softmax": spec(["x[..., c]"], "y[..., c] = exp(x[..., c] - max(x[..., c], ...))",
                             "torch.exp(x - x.reshape(-1, x.shape[-1]).amax(0))"),
    "batch_then_index_first": spec(["x[..., c]"], f"y = max(x[..., c], ..., c{FIRST})", "x.flatten().max(0)[0]"),
}
SPECS = SHARED | POOLS | NOT_POOLS | BATCH
# the default run derives one spec and reads the catalog's generated amax and max_pool1d; -m slow every one
QUICK = {"batch_in_softmax"}
GENERATED = Path(__file__).parent.parent / "generated"


def params(names):
    return [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    written = written_specs(tmp_path_factory.mktemp("maxred"), SPECS, "maxred")
    return lambda name, style="contraction": written(name, style)


def tied(*shape, seed=0, dtype=torch.float64):
    """Whole numbers from a small range: most rows and windows hold several equal extrema."""
    return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def agrees(op, module, inputs, seed=0):
    """Forward and every gradient (exact shapes) of the generated Function equal autograd of the reference."""
    agree(getattr(module, op.name), reference(op), inputs, seed)


def agree(function, want, inputs, seed=0):
    expected = want(*inputs)
    torch.testing.assert_close(function(*inputs), expected, equal_nan=True)
    grad_y = torch.randn(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(seed))
    flags = [True] * len(inputs)
    for own, theirs, x in zip(autograd_gradients(function, inputs, grad_y, flags),
                              autograd_gradients(want, inputs, grad_y, flags), inputs):
        assert own.shape == x.shape
        torch.testing.assert_close(own, theirs, equal_nan=True)


def backward_source(path, op) -> str:
    text = path.read_text()
    start = text.index(f"def {op.name}_backward(")
    return text[start:text.index("\ndef ", start + 1)]


# --- the tie mask, built once ----------------------------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
def test_the_catalog_amax_builds_its_tie_mask_once(style):
    path = GENERATED / ("amax.py" if style == "contraction" else "broadcast/amax.py")
    module = load_module(path)
    text = path.read_text()
    body = text[text.index("def amax_backward("):text.index("\ndef ", text.index("def amax_backward("))]
    assert body.count(" == ") == 1, body
    agree(module.amax, lambda x: torch.amax(x, 1), [tied(5, 4)])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", params(SHARED))
def test_the_tie_mask_is_built_once_and_the_gradient_is_right(generated, name, style):
    op, module, path = generated(name, style)
    body = backward_source(path, op)
    assert body.count(" == ") == 1, body          # one comparison: the mask, shared by its count
    assert body.count("torch.exp(") <= 1, body    # max(exp(x), c): exp(x) once, in the mask and beside it
    shape = (4, 3, 3) if "two_dims" in name else (5, 4)
    agrees(op, module, [tied(*shape)])


# --- max pooling through torch's kernel --------------------------------------------------------------------

def test_the_catalog_max_pool1d_is_one_pooling_call_with_torchs_positions_and_nan():
    """torch's kernel computes the maxima and the first positions: on exact ties, with NaNs in windows (the
    gradient goes where F.max_pool1d's does: the NaN it meets last, with two), and with an empty batch or channel
    dim (which torch's kernel refuses as given: each row of x is one batch entry)."""
    path = GENERATED / "max_pool1d.py"
    module, text = load_module(path), path.read_text()
    saving = text[text.index("def max_pool1d_forward_saving("):text.index("def max_pool1d_backward(")]
    assert "torch.max_pool1d_with_indices(x.flatten(0, -2).unsqueeze(1), 2, 2)" in saving and ".argmax(" not in saving
    x = tied(2, 3, 9)
    _, positions = module.max_pool1d_forward_saving(x)
    assert torch.equal(positions, torch.nn.functional.max_pool1d(x, 2, return_indices=True)[1])
    nan = float("nan")
    for x in (x, torch.tensor([[[nan, nan, 1.0, nan, 2.0, 2.0, 3.0, 1.0, nan]]], dtype=torch.float64)):
        agree(module.max_pool1d, lambda x: torch.nn.functional.max_pool1d(x, 2), [x])
    for shape in [(0, 3, 7), (2, 0, 7)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = module.max_pool1d(x)
        y.sum().backward()
        assert y.shape == (*shape[:2], 3) and x.grad.shape == x.shape


POOL_SHAPES = {"pool_k3_s1_rows": (3, 9), "pool_four_dims": (2, 2, 3, 7)}


def pool_input(name, seed=0):
    return tied(*POOL_SHAPES.get(name, (2, 3, 9)), seed=seed)


@pytest.mark.parametrize("name", params(POOLS))
def test_a_first_window_max_is_one_pooling_call(generated, name):
    op, module, path = generated(name)
    text = path.read_text()
    saving = text[text.index(f"def {op.name}_forward_saving("):text.index(f"def {op.name}_backward(")]
    assert "torch.max_pool1d_with_indices(x.flatten(0, -2).unsqueeze(1)" in saving and ".argmax(" not in saving
    x = pool_input(name)
    agrees(op, module, [x])
    # the positions saved are torch's own
    _, positions = module.__dict__[f"{op.name}_forward_saving"](x)
    stride, size, padding = {"pool_padded": (2, 3, 1), "pool_k3_s1_rows": (1, 3, 0)}.get(name, (2, 2, 0))
    rows = x.flatten(0, -2).unsqueeze(1)
    want = torch.nn.functional.max_pool1d(rows, size, stride, padding, return_indices=True)[1]
    assert torch.equal(positions, want.view(positions.shape))
    for style in STYLES:
        op, module, _ = generated(name, style)
        gradcheck_op(op, module)
        assert torch.autograd.gradgradcheck(getattr(module, op.name), [pool_input(name).normal_().requires_grad_()])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", list(POOLS) + list(NOT_POOLS))
def test_pools_on_many_tied_inputs(generated, name, seed):
    """Every window max agrees with its reference on tied inputs; those torch's kernel does not compute as
    written (dilated, a min, split ties, zero padding) keep their formulas."""
    op, module, path = generated(name)
    assert ("max_pool1d_with_indices" in path.read_text()) == (name in POOLS)
    agrees(op, module, [pool_input(name, seed)], seed)
    agrees(op, module, [pool_input(name, seed).neg()], seed)


# --- max and min over the batch dims `...` --------------------------------------------------------------------

BATCH_SHAPES = [(), (1,), (4,), (2, 3), (3, 3)]


def batch_inputs(op, batch, seed=0):
    named = {"c": 3}
    return [tied(*(batch if "..." in t.indices else ()), *[named[i] for i in t.indices if i != "..."], seed=seed + k)
            for k, t in enumerate(op.inputs)]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", params(BATCH))
def test_max_over_the_batch_dims_against_torch(generated, name, style):
    op, module, _ = generated(name, style)
    for batch in BATCH_SHAPES:
        if not batch and "whole" in name:
            continue     # (x[...] with no dims: a 0-d input is its own max)
        agrees(op, module, batch_inputs(op, batch))
    function = getattr(module, op.name)
    inputs = [t.normal_().requires_grad_() for t in batch_inputs(op, (2, 3))]
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_an_empty_batch_is_refused_naming_the_op(generated):
    op, module, _ = generated("batch_in_softmax")
    with pytest.raises(RuntimeError, match=re.escape("batch_in_softmax: x has batch dims (2, 0) (index ...), with no "
                                                     "entries, which a max or min reduces over")):
        getattr(module, op.name)(torch.randn(2, 0, 3))
    with pytest.raises(IndexError):     # torch's own amax raises as well
        torch.amax(torch.randn(2, 0, 3), (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", BATCH)
def test_every_batch_form_on_more_tied_inputs(generated, name, style):
    op, module, _ = generated(name, style)
    for batch in BATCH_SHAPES:
        for seed in range(1, 4):
            if batch or "whole" not in name:
                agrees(op, module, batch_inputs(op, batch, seed), seed)
