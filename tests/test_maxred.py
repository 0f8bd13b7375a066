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

import pytest
import torch

from derive.testing import autograd_gradients, call_backward, gradcheck_op, reference

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
POOL = 'sizes = { k = 2 }'
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


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    written = written_specs(tmp_path_factory.mktemp("maxred"), SPECS, "maxred")
    return lambda name, style="contraction": written(name, style)


def tied(*shape, seed=0, dtype=torch.float64):
    """Whole numbers from a small range: most rows and windows hold several equal extrema."""
    return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def agrees(op, module, inputs, seed=0):
    """Forward and every gradient (exact shapes) of the generated Function equal autograd of the reference."""
    function, want = getattr(module, op.name), reference(op)
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
@pytest.mark.parametrize("name", SHARED)
def test_the_tie_mask_is_built_once_and_the_gradient_is_right(generated, name, style):
    op, module, path = generated(name, style)
    body = backward_source(path, op)
    assert body.count(" == ") == 1, body          # one comparison: the mask, shared by its count
    assert body.count("torch.exp(") <= 1, body    # max(exp(x), c): exp(x) once, in the mask and beside it
    shape = (4, 3, 3) if "two_dims" in name else (5, 4)
    agrees(op, module, [tied(*shape)])


# --- max pooling through torch's kernel --------------------------------------------------------------------

POOL_SHAPES = {"pool_k3_s1_rows": (3, 9), "pool_four_dims": (2, 2, 3, 7)}


def pool_input(name, seed=0):
    return tied(*POOL_SHAPES.get(name, (2, 3, 9)), seed=seed)


@pytest.mark.parametrize("name", POOLS)
def test_a_first_window_max_is_one_pooling_call(generated, name):
    op, module, path = generated(name)
    text = path.read_text()
    saving = text[text.index(f"def {op.name}_forward_saving("):text.index(f"def {op.name}_backward(")]
    assert "torch.max_pool1d_with_indices(x.flatten(0, -2).unsqueeze(1)" in saving and ".argmax(" not in saving
    x = pool_input(name)
    agrees(op, module, [x])
    if name == "pool_first":     # the positions saved are torch's own
        _, positions = module.__dict__[f"{op.name}_forward_saving"](x)
        assert torch.equal(positions, torch.nn.functional.max_pool1d(x, 2, return_indices=True)[1])


@pytest.mark.parametrize("name", NOT_POOLS)
def test_other_window_maxima_keep_their_formulas(generated, name):
    op, module, path = generated(name)
    assert "max_pool1d_with_indices" not in path.read_text()
    agrees(op, module, [pool_input(name)])


@pytest.mark.parametrize("style", STYLES)
def test_pooling_gradcheck_and_double_backward(generated, style):
    op, module, _ = generated("pool_padded", style)
    gradcheck_op(op, module)
    x = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(getattr(module, op.name), [x])


def test_nan_windows_and_empty_dims_as_max_pool1d(generated):
    """A window with NaNs is NaN and its gradient goes where F.max_pool1d's does (the NaN it meets last, with
    two); an empty batch or channel dim gives empty results, as torch's kernel refuses only when given as is."""
    op, module, _ = generated("pool_first")
    nan = float("nan")
    x = torch.tensor([[[nan, nan, 1.0, nan, 2.0, 2.0, 3.0, 1.0]]], dtype=torch.float64)
    agrees(op, module, [x])
    for shape in [(0, 3, 6), (2, 0, 6)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = getattr(module, op.name)(x)
        y.sum().backward()
        assert y.shape == (*shape[:2], 3) and x.grad.shape == x.shape


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", list(POOLS) + list(NOT_POOLS))
def test_pools_on_many_tied_inputs(generated, name, seed):
    op, module, _ = generated(name)
    agrees(op, module, [pool_input(name, seed)], seed)
    agrees(op, module, [pool_input(name, seed).neg()], seed)


# --- max and min over the batch dims `...` --------------------------------------------------------------------

BATCH_SHAPES = [(), (1,), (4,), (2, 3), (3, 3)]


def batch_inputs(op, batch, seed=0):
    named = {"c": 3}
    return [tied(*(batch if "..." in t.indices else ()), *[named[i] for i in t.indices if i != "..."], seed=seed + k)
            for k, t in enumerate(op.inputs)]


QUICK_BATCH = [("batch_max", "contraction"), ("batch_min_first", "broadcast"), ("batch_whole_first", "contraction"),
               ("batch_of_product", "broadcast"), ("batch_in_softmax", "contraction")]


@pytest.mark.parametrize("name, style", QUICK_BATCH)
def test_max_over_the_batch_dims_against_torch(generated, name, style):
    op, module, _ = generated(name, style)
    for batch in BATCH_SHAPES:
        if not batch and "whole" in name:
            continue     # (x[...] with no dims: a 0-d input is its own max)
        agrees(op, module, batch_inputs(op, batch))


@pytest.mark.parametrize("name", ["batch_max", "batch_whole_first"])
def test_max_over_the_batch_dims_gradcheck_and_double_backward(generated, name):
    op, module, _ = generated(name)
    function = getattr(module, op.name)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(function, [x])
    assert torch.autograd.gradgradcheck(function, [x])


def test_an_empty_batch_is_refused_naming_the_op(generated):
    op, module, _ = generated("batch_max")
    with pytest.raises(RuntimeError, match=re.escape("batch_max: x has batch dims (2, 0) (index ...), with no "
                                                     "entries, which a max or min reduces over")):
        getattr(module, op.name)(torch.randn(2, 0, 3))
    with pytest.raises(IndexError):     # torch's own amax raises as well
        torch.amax(torch.randn(2, 0, 3), (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", BATCH)
def test_every_batch_form_in_both_styles(generated, name, style):
    op, module, _ = generated(name, style)
    for batch in BATCH_SHAPES:
        for seed in range(3):
            if batch or "whole" not in name:
                agrees(op, module, batch_inputs(op, batch, seed), seed)
    gradcheck_op(op, module)
