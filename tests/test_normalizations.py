"""Normalizations over any set of dims, gradients computed from a multiple of another, where() branches that
share their scalars, and constants printed as float literals (issue 14, item 2). Every op here is invented."""

import re
import textwrap

import pytest
import torch

from derive.build import render_catalog
from derive.printing import render_expr
from derive.spec import parse_catalog
from derive.testing import check_gradients, gradcheck_op, load_module, make_inputs

from conftest import built, shared_builds


def modules(tmp_path, text: str, styles=("contraction", "broadcast")):
    """{(op name, style): (op, module, source)} for a catalog written in the test."""
    catalog = parse_catalog(textwrap.dedent(text), "norms.toml")
    with shared_builds():
        files = render_catalog(catalog, styles, namespace=f"norms_{tmp_path.name}".replace("-", "_"))
    found = {}
    for path, source in files.items():
        if path.endswith(".py"):
            target = tmp_path / path.replace("/", "_")
            target.write_text(source)
            style = "broadcast" if path.startswith("broadcast/") else "contraction"
            name = path.rpartition("/")[2][:-3]
            found[name, style] = (catalog.op(name), load_module(target), source)
    return found


def backward_source(source: str, name: str) -> str:
    return source.split(f"def {name}_backward(", 1)[1].split("\ndef ", 1)[0].split('"""', 2)[2]


def centered(dims: str, body: str = "x[n, c, l]") -> str:
    return f"({body} - mean({body}, {dims}))"


def norm(dims: str, extra: str = "", body: str = "x[n, c, l]") -> str:
    return f"{centered(dims, body)} / sqrt(mean({centered(dims, body)}**2, {dims}) + eps){extra}"


def ref(axes: str, extra: str = "") -> str:
    mean = f"x.mean({axes}, keepdim=True)"
    return f"(x - {mean}) / torch.sqrt(((x - {mean})**2).mean({axes}, keepdim=True) + eps){extra}"


# name: (inputs, equation's right side, reference, the kernel the contraction style calls, or None: formulas)
NORMALIZATIONS = {
    # batch-norm-like: per channel over batch and length, with and without affine terms
    "per_channel_affine": (["x[n, c, l]", "w[c]", "b[c]"], norm("n, l", " * w[c] + b[c]"),
                           ref("(0, 2)", " * w.unsqueeze(-1) + b.unsqueeze(-1)"), "native_batch_norm_backward"),
    "per_channel": (["x[n, c, l]"], norm("n, l"), ref("(0, 2)"), "native_batch_norm_backward"),
    "per_column": (["x[n, c]", "w[c]"], norm("n", " * w[c]", "x[n, c]"), ref("(0,)", " * w"),
                   "native_batch_norm_backward"),
    # layer-norm-like over two trailing dims, with a weight over both
    "trailing_two": (["x[n, c, l]", "w[c, l]", "b[c, l]"], norm("c, l", " * w[c, l] + b[c, l]"),
                     ref("(1, 2)", " * w + b"), "native_layer_norm_backward"),
    # group-norm-like: x[n, g, k, l] over (k, l), an affine term per channel (g, k)
    "per_group": (["x[n, g, k, l]", "w[g, k]", "b[g, k]"],
                  norm("k, l", " * w[g, k] + b[g, k]", "x[n, g, k, l]"),
                  "(x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), correction=0, keepdim=True) + eps)"
                  " * w.unsqueeze(-1) + b.unsqueeze(-1)", "native_group_norm_backward"),
    # over dims no native kernel normalizes: the batch alone, the middle dim with a weight over it
    "over_batch": (["x[n, c, l]"], norm("n"), ref("(0,)"), None),
    "middle_weighted": (["x[n, c, l]", "w[c]"], norm("c", " * w[c]"), ref("(1,)", " * w.unsqueeze(-1)"), None),
}
RMS = {
    "rms_last": (["x[..., d]", "w[d]"], "x[..., d] / sqrt(mean(x[..., d]**2, d) + eps) * w[d]",
                 "torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)"),
    "rms_two_dims": (["x[n, c, l]"], "x[n, c, l] / sqrt(mean(x[n, c, l]**2, c, l) + eps)",
                     "x / torch.sqrt((x**2).mean((1, 2), keepdim=True) + eps)"),
}


def table(name, inputs, right, reference) -> str:
    output = "y[..., d]" if "..." in inputs[0] else inputs[0].replace("x[", "y[")
    return (f'[ops.{name}]\ninputs = {inputs!r}\nparams = {{ eps = 1e-5 }}\nequation = "{output} = {right}"\n'
            f'reference = "{reference}"\n').replace("'", '"')


@pytest.fixture(scope="module")
def norm_modules(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            inputs, right, reference = (NORMALIZATIONS[name][:3] if name in NORMALIZATIONS else RMS[name])
            cache[name] = modules(tmp_path_factory.mktemp(name), table(name, inputs, right, reference))
        return cache[name]
    return get


def size_sets(op):
    """Every index of one size; every index of size 1 but the first."""
    sizes = sorted({size for _, size in op.index_sizes})
    return [{size: 3 for size in sizes}, {size: (2 if k == 0 else 1) for k, size in enumerate(sizes)}]


# Deriving a normalization over several dims takes seconds: the whole family runs under -m slow (the default
# run meets a batch-norm-like and a two-trailing-dims one in test_printing_trust.py).
@pytest.mark.slow
@pytest.mark.parametrize("name", NORMALIZATIONS)
def test_a_normalization_saves_its_statistics_and_matches_autograd(norm_modules, name):
    found = norm_modules(name)
    kernel = NORMALIZATIONS[name][3]
    op, module, source = found[name, "contraction"]
    result = built(op)
    assert [v.name for v in result.lowered["contraction"].plan.saved] == ["saved_mean", "saved_rstd"]
    backward = backward_source(source, name)
    if kernel is not None:
        assert f"torch.ops.aten.{kernel}(" in backward
    else:
        # the centered input is computed once, and no term sums it over the normalized dims (identically 0)
        assert len(re.findall(r"x - saved_mean", backward)) == 1, backward
        grad_x = result.lowered["contraction"].gradients[0]
        assert len(grad_x.terms) <= 3, render_expr(grad_x)
    for style in ("contraction", "broadcast"):
        op, module, _ = found[name, style]
        for sizes in size_sets(op):
            check_gradients(op, module, sizes=sizes)
        gradcheck_op(op, module, sizes=size_sets(op)[0])
    op, module, _ = found[name, "contraction"]
    inputs = [t.requires_grad_() for t in make_inputs(op, size_sets(op)[0], torch.float64)]
    assert torch.autograd.gradgradcheck(getattr(module, name), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", RMS)
def test_an_rms_norm_saves_rstd_alone(norm_modules, name):
    found = norm_modules(name)
    op, module, source = found[name, "contraction"]
    assert [v.name for v in built(op).lowered["contraction"].plan.saved] == ["saved_rstd"]
    assert "saved_rstd = torch.rsqrt(" in source
    for style in ("contraction", "broadcast"):
        op, module, _ = found[name, style]
        sizes = {size: 3 for _, size in op.index_sizes}
        check_gradients(op, module, sizes=sizes)
        gradcheck_op(op, module, sizes=sizes)


# --- gradients that are a multiple of another --------------------------------------------------------

LOSSES = '''
[ops.huber_like]
inputs = ["pred[n]", "target[n]"]
params = { delta = 1.0 }
equation = "loss = mean(where(Abs(pred[n] - target[n]) < delta, 0.5 * (pred[n] - target[n])**2, delta * (Abs(pred[n] - target[n]) - 0.5 * delta)), n)"
reference = "torch.nn.functional.huber_loss(pred, target, delta=delta)"

[ops.twice_target]
inputs = ["a[n, k]", "b[n, k]"]
equation = "loss = sum((a[n, k] - 2 * b[n, k])**2, n, k)"
reference = "((a - 2 * b)**2).sum()"

[ops.asymmetric_gap]
inputs = ["a[n]", "b[n]"]
equation = "loss = sum(where(a[n] > b[n], 2 * (a[n] - b[n]), 0.5 * (b[n] - a[n])), n)"
reference = "torch.where(a > b, 2 * (a - b), 0.5 * (b - a)).sum()"

[ops.product_loss]
inputs = ["a[n]", "b[n]"]
equation = "loss = sum(a[n] * b[n], n)"
reference = "(a * b).sum()"
'''


def lazy(tmp_path_factory, text: str):
    """(name, style) -> (op, module, source), each op and style generated when first asked for."""
    tables = {re.match(r"\[ops\.(\w+)\]", t).group(1): t for t in re.split(r"(?m)^(?=\[ops\.)", text) if t.strip()}
    cache = {}

    def get(name, style):
        if (name, style) not in cache:
            cache.update(modules(tmp_path_factory.mktemp(f"{name}_{style}"), tables[name], (style,)))
        return cache[name, style]
    return get


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    return lazy(tmp_path_factory, LOSSES)


# the contraction style (which these rules change) by default; -m slow (CI) checks the broadcast style too
STYLES = ["contraction", pytest.param("broadcast", marks=pytest.mark.slow)]


def gradient_lines(source: str, name: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(grad_\w+) = (?!None)(.+)$", backward_source(source, name), re.M))


# (deriving the Huber loss takes seconds: it runs under -m slow)
MULTIPLES = [pytest.param("huber_like", "grad_pred", "grad_target", "-", marks=pytest.mark.slow),
             ("asymmetric_gap", "grad_a", "grad_b", "-"), ("twice_target", "grad_a", "grad_b", "-2 * ")]


@pytest.mark.parametrize("name, first, second, k", MULTIPLES)
def test_a_gradient_that_is_a_multiple_of_another_is_computed_from_it(losses, name, first, second, k):
    op, module, source = losses(name, "contraction")
    lines = gradient_lines(source, name)
    shared = re.fullmatch(r"shared_\d+", lines[first])
    assert shared, lines
    assert lines[second] == f"{k}{lines[first]}", lines
    backward = backward_source(source, name)
    assert backward.count("torch.where(") <= 1 and backward.count("torch.abs(") <= 1, backward


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", [pytest.param("huber_like", marks=pytest.mark.slow), "asymmetric_gap", "twice_target"])
def test_gradients_computed_from_a_multiple_match_autograd(losses, name, style):
    op, module, _ = losses(name, style)
    check_gradients(op, module)
    # each gradient alone: the value it is a multiple of is computed for it too
    inputs = make_inputs(op)
    grad = torch.tensor(1.5, dtype=torch.float64)
    both = getattr(module, f"{name}_backward")(grad, *inputs)
    for alone in range(2):
        flags = tuple(position == alone for position in range(2))
        got = getattr(module, f"{name}_backward")(grad, *inputs, needs_input_grad=flags)
        torch.testing.assert_close(got[alone], both[alone])
        assert got[1 - alone] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["huber_like", "asymmetric_gap", "twice_target"])
def test_gradients_computed_from_a_multiple_pass_gradcheck_and_kinks(losses, name):
    op, module, _ = losses(name, "contraction")
    gradcheck_op(op, module)
    check_gradients(op, module, kinks=True)


def test_gradients_that_are_no_multiple_stay_apart(losses):
    op, module, source = losses("product_loss", "contraction")
    lines = gradient_lines(source, "product_loss")
    assert "b" in lines["grad_a"] and "a" in lines["grad_b"] and "shared" not in " ".join(lines.values()), lines
    check_gradients(op, module)


@pytest.mark.slow
def test_scalars_every_branch_of_a_where_shares_scale_it_once(losses):
    """grad_loss / size_n multiplies the where() once, not each branch."""
    op, module, source = losses("huber_like", "contraction")
    (where,) = re.findall(r"torch\.where\(.*\)", backward_source(source, "huber_like"))
    assert "grad_loss" not in where and "size_n" not in where, where
    assert "grad_loss / size_n * torch.where(" in backward_source(source, "huber_like")


# --- constants -------------------------------------------------------------------------------------

CONSTANTS = '''
[ops.gelu_tanh_like]
inputs = ["x[i]"]
equation = "y[i] = 0.5 * x[i] * (1 + tanh(0.7978845608028654 * (x[i] + 0.044715 * x[i]**3)))"
reference = "torch.nn.functional.gelu(x, approximate='tanh')"

[ops.decimal_scale]
inputs = ["x[i]"]
params = { a = 0.1 }
equation = "y[i] = 0.7978845608028654 * x[i] + 0.044715 * x[i]**3 + a * x[i]**2 / 3"
reference = "0.7978845608028654 * x + 0.044715 * x**3 + a * x**2 / 3"
'''


@pytest.fixture(scope="module")
def constant_modules(tmp_path_factory):
    return lazy(tmp_path_factory, CONSTANTS)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name, literals", [
    pytest.param("gelu_tanh_like", ["0.7978845608028654", "0.035677408136300125"], marks=pytest.mark.slow),
    ("decimal_scale", ["0.7978845608028654", "0.044715", "0.134145"]),
])
def test_decimal_constants_print_as_float_literals(constant_modules, name, literals, style):
    op, module, source = constant_modules(name, style)
    body = source.split(f"def {name}_forward(", 1)[1].split("\nclass ", 1)[0]
    assert not re.search(r"(?<![.\d])\d{10,}(?![.\d])", body), body
    for literal in literals:
        assert literal in body
    check_gradients(op, module)


def test_small_fractions_stay_exact(constant_modules):
    """x**2 / 3 is not 0.3333333333333333 * x**2."""
    op, module, source = constant_modules("decimal_scale", "contraction")
    forward = source.split("def decimal_scale_forward(", 1)[1].split("\ndef ", 1)[0]
    assert re.search(r"/ 3\b", forward.split('"""', 2)[2]), forward
