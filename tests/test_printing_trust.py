"""Generated code that means what the spec says: operator precedence, Python numbers as arguments,
torch's derivative of a power, and valid specs that used to break (issue 11, points 1, 3, 4 and 8).

Every op here is invented for the test, and each runs with all index sizes equal, so that a transposed
or wrongly grouped product gives a wrong number instead of a shape error."""

import ast
import re
import textwrap

import pytest
import torch

from derive import naming
from derive.build import render_catalog
from derive.lower import MatMul, Product, children, walk
from derive.model import SpecError
from derive.printing import Code, _arranged, _render_in, align, render
from derive.spec import parse_catalog
from derive.testing import autograd_gradients, call_backward, check_gradients, load_module, make_inputs

from conftest import CATALOG, built, first_by_default, shared_builds

SIZE = 4    # every index: a wrong grouping of `*` and `@` computes a wrong value, it does not crash


def modules(tmp_path, text: str, styles=("contraction",)):
    """{op name: (op, generated module)} for a catalog written in the test."""
    catalog = parse_catalog(textwrap.dedent(text), "trust.toml")
    namespace = f"trust_{tmp_path.name}".replace("-", "_")
    loaded = {}
    with shared_builds():     # test_every_printed_operand_is_one_python_operand reads the same builds
        files = render_catalog(catalog, styles, namespace=namespace)
    for path, source in files.items():
        if path.endswith(".py"):
            target = tmp_path / path.replace("/", "_")
            target.write_text(source)
            loaded[path.rpartition("/")[2][:-3]] = load_module(target)
    return {op.name: (op, loaded[op.name]) for op in catalog.ops}


class Lazy(dict):
    """Ops of a catalog text, each generated and loaded when a test first asks for it (so that one op
    that fails to generate fails its own test only)."""

    def __init__(self, tmp_path_factory, text: str, styles=("contraction",)):
        super().__init__()
        self.factory, self.styles = tmp_path_factory, styles
        self.tables = {re.match(r"\[ops\.(\w+)\]", t).group(1): t for t in re.split(r"(?m)^(?=\[ops\.)", text) if t}

    def __missing__(self, name):
        self[name] = modules(self.factory.mktemp(name), self.tables[name], self.styles)[name]
        return self[name]


def equal_sizes(op):
    return {size: SIZE for _, size in op.index_sizes}


def op_table(name: str, inputs: list[str], equation: str, reference: str, params: str = "") -> str:
    return (f'[ops.{name}]\ninputs = {inputs!r}\nequation = "{equation}"\nreference = "{reference}"\n'.replace("'", '"')
            + (f"params = {{ {params} }}\n" if params else ""))


def backward_matches_autograd_of_forward(op, module, inputs, params=None, equal_nan=False):
    """The generated backward equals torch.autograd through the generated forward, shapes included."""
    params = params or {}
    forward = getattr(module, naming.forward(op.name))
    output = forward(*inputs, **params)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(7), dtype=output.dtype)
    flags = [t.differentiable for t in op.inputs]
    expected = autograd_gradients(lambda *xs: forward(*xs, **params), inputs, grad_output, flags)
    actual = call_backward(op, module, grad_output, inputs, output, **params)
    for tensor, got, want in zip(op.inputs, actual, expected):
        if want is not None:
            assert got.shape == want.shape, f"{op.name}: grad_{tensor.name} {tuple(got.shape)}"
            torch.testing.assert_close(got, want, equal_nan=equal_nan,
                                       msg=lambda m: f"{op.name}: grad_{tensor.name}: {m}")


# --- 1. operator precedence ---------------------------------------------------------------------

# (equation part, reference part): activations of x, then of w, then what is done with the contraction
LEFT = [("tanh(x[n, k])", "torch.tanh(x)"), ("x[n, k]", "x"), ("a * x[n, k]", "a * x"),
        ("u[n] * x[n, k]", "u.unsqueeze(1) * x"), ("x[n, k]**2", "x**2"), ("x[n, k] / (2 + u[n])", "x / (2 + u.unsqueeze(1))")]
RIGHT = [("w[k, m]", "w"), ("exp(w[k, m])", "torch.exp(w)"), ("v[m] * w[k, m]", "v * w"), ("w[k, m] / a", "w / a"),
         ("(1 - w[k, m]**2)", "(1 - w**2)")]
OUTER = [("{}", "{}"), ("tanh({})", "torch.tanh({})"), ("u[n] * {}", "u.unsqueeze(1) * ({})"),
         ("{} * v[m]", "({}) * v"), ("a * {}", "a * ({})"), ("{} / (2 + v[m]**2)", "({}) / (2 + v**2)"),
         ("{} * sum(x[n, j] * z[j, m], j)", "({}) * (x @ z)"), ("{} - sum(x[n, j] * z[j, m], j) * u[n]",
                                                              "({}) - (x @ z) * u.unsqueeze(1)")]


def precedence_specs():
    """Each outer shape with three activations of x in turn (each activation four times), and the
    activations of w in turn."""
    for position, (outer, outer_ref) in enumerate(OUTER * 3):
        left, left_ref = LEFT[(position + position // len(OUTER)) % len(LEFT)]
        right, right_ref = RIGHT[position % len(RIGHT)]
        equation = "y[n, m] = " + outer.format(f"sum({left} * {right}, k)")
        reference = outer_ref.format(f"({left_ref}) @ ({right_ref})")
        used = set(re.findall(r"\b([xwzuv])\[", equation))
        inputs = [i for i in ["x[n, k]", "w[k, m]", "z[k, m]", "u[n]", "v[m]"] if i[0] in used]
        yield f"p{position}", inputs, equation, reference


PRECEDENCE_TEXT = "".join(op_table(name, inputs, equation, reference, "a = 0.5")
                          for name, inputs, equation, reference in precedence_specs())


@pytest.fixture(scope="module")
def precedence_modules(tmp_path_factory):
    return Lazy(tmp_path_factory, PRECEDENCE_TEXT)


# The first eight take each outer shape once; `-m slow` (CI) takes the other activations in every shape.
@pytest.mark.parametrize("name", first_by_default([name for name, *_ in precedence_specs()], len(OUTER)))
def test_activation_contraction_scaling_with_equal_sizes(precedence_modules, name):
    """Each shape's forward and backward against autograd of a reference written with `@`, all sizes equal."""
    op, module = precedence_modules[name]
    check_gradients(op, module, sizes=equal_sizes(op))
    check_gradients(op, module, sizes=equal_sizes(op), params={"a": -1.25})


def test_an_activation_before_a_linear_layer(tmp_path):
    """The issue's case: `(1 - tanh**2) * grad_y @ w.T` multiplied before it transposed."""
    (op, module), = modules(tmp_path, op_table("act", ["x[n, k]", "w[k, m]"], "y[n, m] = sum(tanh(x[n, k]) * w[k, m], k)",
                                              "torch.tanh(x) @ w")).values()
    check_gradients(op, module, sizes=equal_sizes(op))


def flat(node: ast.AST):
    """An AST as nested tuples, with a chain of `*` and `/` flattened to one tuple of (operator, operand):
    elementwise products associate, so `c * (a * b)` may be printed `c * a * b`; `@` is kept binary."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        return ("chain",) + chain(node)
    if isinstance(node, ast.AST):
        return (type(node).__name__,) + tuple(flat(value) for _, value in ast.iter_fields(node))
    if isinstance(node, list):
        return tuple(flat(item) for item in node)
    return node


def chain(node: ast.AST) -> tuple:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        return chain(node.left) + ((type(node.op).__name__, flat(node.right)),)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return (("Sign", "-"),) + chain(node.operand)     # -a * b is (-a) * b: a sign on the whole run
    return (("Mult", flat(node)),)


def holds(tree, part) -> bool:
    """Whether `part` is a subtree of `tree`, or (a product) a run of one of its products."""
    if tree == part:
        return True
    if not isinstance(tree, tuple):
        return False
    if part[:1] == ("chain",) == tree[:1]:
        items, run = tree[1:], part[1:]
        for start in range(len(items) - len(run) + 1):
            window = items[start:start + len(run)]
            # the run's first operand may follow a `*` (written bare) but never a `/`
            if window[1:] == run[1:] and window[0][1] == run[0][1] and window[0][0] == "Mult":
                return True
    return any(holds(item, part) for item in tree)


def parsed(code: str):
    return flat(ast.parse(code, mode="eval").body)


def printed_children(node):
    """The code of each child as its parent lines it up before printing it in."""
    if isinstance(node, Product):
        return [align(_render_in(f, node.indices), node.indices) for f in node.factors]
    if isinstance(node, MatMul):
        return [_arranged(_render_in(node.left, node.left_layout), node.left_layout),
                _arranged(_render_in(node.right, node.right_layout), node.right_layout)]
    return [render(child) for child in children(node)]


def grouping_problems(op) -> list[str]:
    """Nodes of the op's lowered trees whose printed child Python would not read as one operand."""
    problems = []
    lowered = built(op).lowered["contraction"]
    for expr in lowered.gradients + (lowered.forward,):
        for term in expr.terms:
            for node in walk(term):
                whole = parsed(render(node).text)
                for child in printed_children(node):
                    if not holds(whole, parsed(child.text)):
                        problems.append(f"{op.name}: {child.text!r} is not one operand of {render(node).text!r}")
                if isinstance(node, MatMul):
                    assert whole[:2] == ("BinOp", parsed(printed_children(node)[0].text)), render(node).text
    return problems


def test_every_printed_operand_is_one_python_operand():
    """Parse every printed node with `ast`: each child's code is a subtree of its parent's (a run of a
    product, for an elementwise factor), so Python groups what the tree groups."""
    catalog = parse_catalog(PRECEDENCE_TEXT, "trust.toml")
    ops = list(catalog.ops) + [CATALOG.op(name) for name in ("linear", "bmm", "cross_entropy", "layer_norm")]
    assert [p for op in ops for p in grouping_problems(op)] == []


@pytest.mark.parametrize("parent, side, child, bare", [
    ("*", "right", Code("a @ b", (), 49), False),      # the issue: a * b @ c is (a * b) @ c
    ("*", "left", Code("a @ b", (), 49), False),
    ("@", "left", Code("a * b", (), 50), False),       # legal Python, but the reader should not have to know
    ("@", "left", Code("a @ b", (), 49), True),        # a @ b @ c is (a @ b) @ c
    ("@", "right", Code("a @ b", (), 49), False),
    ("@", "right", Code("a * b", (), 50), False),
    ("*", "right", Code("a * b", (), 50), True),       # elementwise products associate
    ("/", "right", Code("a * b", (), 50), False),
    ("-", "right", Code("a - b", (), 40), False),
    ("@", "right", Code("x**2", (), 60), True),
    (".", "left", Code("a @ b", (), 49), False),
])
def test_parenthesization_rule(parent, side, child, bare):
    assert (child.operand(parent, side) == child.text) is bare


# --- 3. Python numbers as arguments of torch functions ------------------------------------------

SCALAR_ARGUMENTS = [
    ("max_right", "y[i] = Max(x[i], lo)", "torch.clamp_min(x, lo)"),
    ("max_left", "y[i] = Max(lo, x[i])", "torch.clamp_min(x, lo)"),
    ("min_right", "y[i] = Min(x[i], hi)", "torch.clamp_max(x, hi)"),
    ("min_left", "y[i] = Min(hi, x[i])", "torch.clamp_max(x, hi)"),
    ("clamp", "y[i] = Min(hi, Max(lo, x[i]))", "torch.clamp(x, lo, hi)"),
    ("max_three", "y[i] = Max(lo, x[i], 0)", "torch.clamp_min(torch.clamp_min(x, lo), 0)"),
    ("max_tensors", "y[i] = Max(x[i], z[i], lo)", "torch.clamp_min(torch.maximum(x, z), lo)"),
    ("max_of_params", "y[i] = x[i] * Max(lo, hi)", "x * torch.clamp_min(torch.tensor(lo, dtype=torch.float64), hi)"),
    ("functions_of_params", "y[i] = x[i] * exp(lo) + sigmoid(hi) * x[i] + softplus(lo) + Abs(lo) * log(hi)",
     "x * torch.exp(torch.tensor(lo, dtype=torch.float64)) + torch.sigmoid(torch.tensor(hi, dtype=torch.float64)) * x"
     " + torch.nn.functional.softplus(torch.tensor(lo, dtype=torch.float64)) + torch.tensor(lo, dtype=torch.float64).abs() * torch.log(torch.tensor(hi, dtype=torch.float64))"),
    ("trig_of_params", "y[i] = x[i] * sin(lo) * cos(hi) + erf(lo) * sqrt(hi)",
     "x * torch.sin(torch.tensor(lo, dtype=torch.float64)) * torch.cos(torch.tensor(hi, dtype=torch.float64))"
     " + torch.erf(torch.tensor(lo, dtype=torch.float64)) * hi**0.5"),
    ("where_of_params", "y[i] = where(x[i] > 0, hi * 1000 / 7, lo) + x[i]",
     "torch.where(torch.gt(x, 0), torch.tensor(hi * 1000 / 7, dtype=x.dtype), lo) + x"),
    ("loss_scaled_by_a_function_of_params", "loss = exp(lo) * sum(x[i] * z[i], i)",
     "torch.exp(torch.tensor(lo, dtype=x.dtype)) * (x * z).sum()"),
]


@pytest.fixture(scope="module")
def scalar_modules(tmp_path_factory):
    text = "".join(op_table(name, [i for i in ["x[i]", "z[i]"] if i[0] in equation.split("=", 1)[1]],
                            equation, reference, "lo = 0.5, hi = 1.5") for name, equation, reference in SCALAR_ARGUMENTS)
    return Lazy(tmp_path_factory, text)


@pytest.mark.parametrize("name", [name for name, _, _ in SCALAR_ARGUMENTS])
def test_params_in_every_argument_position(scalar_modules, name):
    """Params are Python numbers: each function prints a call torch (or Python) accepts, in each
    position, at the defaults and at other values, and the result keeps the inputs' dtype."""
    op, module = scalar_modules[name]
    for params in ({}, {"lo": -0.25, "hi": 0.75}):
        check_gradients(op, module, params=params)
        check_gradients(op, module, dtype=torch.float32, params=params)
    backward_matches_autograd_of_forward(op, module, make_inputs(op))


# --- 4. powers: torch's derivative, no NaN at a zero base ----------------------------------------

@pytest.fixture(scope="module")
def power_modules(tmp_path_factory):
    text = (op_table("power", ["x[i]"], "y[i] = x[i] ** a", "x ** a", "a = 2.5")
            + op_table("focal", ["p[i]"], "y[i] = (1 - p[i]) ** gamma * log(p[i])",
                       "(1 - p) ** gamma * torch.log(p)", "gamma = 2.0")
            + op_table("focal_loss", ["p[n, c]", "t[n, c]"],
                       "loss = -mean(sum(t[n, c] * (1 - p[n, c]) ** gamma * log(p[n, c]), c), n)",
                       "-(t * (1 - p) ** gamma * torch.log(p)).sum(1).mean()", "gamma = 2.0")
            + op_table("tensor_exponent", ["x[i]", "s"], "y[i] = x[i] ** s", "x ** s")
            + op_table("tensor_exponent_param_base", ["x[i]", "s"], "y[i] = x[i] * b ** s", "x * b ** s", "b = 0.0")
            + "".join(op_table(f"literal_{k}", ["x[i]"], f"y[i] = x[i] ** {e}", f"x ** {e}")
                      for k, e in enumerate([2, 3, 0.5, 1, 4, -1, 2.5])))
    return Lazy(tmp_path_factory, text)


ZERO_BASE = torch.tensor([0.0, 0.0, 1.5, 2.0, 0.25, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, 1.0, 0.0, 2.5, -1.0])
def test_symbolic_power_at_zero(power_modules, exponent):
    op, module = power_modules["power"]
    check_gradients(op, module, inputs=[ZERO_BASE.clone()], params={"a": exponent}, equal_nan=True)
    check_gradients(op, module, inputs=[-ZERO_BASE], params={"a": exponent}, equal_nan=True)


@pytest.mark.parametrize("k", range(7))
def test_literal_power_at_zero(power_modules, k):
    op, module = power_modules[f"literal_{k}"]
    check_gradients(op, module, inputs=[ZERO_BASE.clone()], equal_nan=True)


@pytest.mark.parametrize("gamma", [2.0, 0.5, 1.0, 0.0])
def test_focal_shaped_losses_at_p_one(power_modules, gamma):
    op, module = power_modules["focal"]
    p = torch.tensor([1.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    check_gradients(op, module, inputs=[p], params={"gamma": gamma}, equal_nan=True)
    op, module = power_modules["focal_loss"]
    p = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.9]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    check_gradients(op, module, inputs=[p, t], params={"gamma": gamma}, equal_nan=True)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0, 0.5, -1.0])
def test_tensor_exponent_follows_torch_pow_backward(power_modules, s):
    """d/ds x**s is 0 at x = 0 with s >= 0, d/dx is 0 where s = 0: torch's conventions, not NaN."""
    op, module = power_modules["tensor_exponent"]
    x = torch.tensor([0.0, 0.0, 1.5, 2.0], dtype=torch.float64)
    check_gradients(op, module, inputs=[x, torch.tensor(s, dtype=torch.float64)], equal_nan=True)
    op, module = power_modules["tensor_exponent_param_base"]
    for base in (0.5, 2.0):       # (math.log(0) raises: a param base of 0 is refused at run time)
        check_gradients(op, module, inputs=[x, torch.tensor(s, dtype=torch.float64)], params={"b": base},
                        equal_nan=True)


# --- 8a. normalizations over any dims, with and without weight and bias ---------------------------

def normalization(dims: str, keep: str, extra: str, extra_ref: str):
    """(x - mean(x, dims)) / sqrt(var(x, dims) + eps), then `extra`; the reference with keepdim means."""
    centered = f"(x[n, c, l] - mean(x[n, c, l], {dims}))"
    equation = f"y[n, c, l] = {centered} / sqrt(mean({centered}**2, {dims}) + eps){extra}"
    axes = "(" + ", ".join(str("ncl".index(d)) for d in dims.split(", ")) + ",)"
    mean = f"x.mean({axes}, keepdim=True)"
    reference = f"(x - {mean}) / torch.sqrt(((x - {mean})**2).mean({axes}, keepdim=True) + eps){extra_ref}"
    return equation, reference


NORMALIZATIONS = {
    "over_n_l_weight": (["x[n, c, l]", "w[c]"], *normalization("n, l", "c", " * w[c]", " * w.unsqueeze(-1)")),
    "over_n_l_weight_bias": (["x[n, c, l]", "w[c]", "b[c]"],
                             *normalization("n, l", "c", " * w[c] + b[c]", " * w.unsqueeze(-1) + b.unsqueeze(-1)")),
    "over_n_l": (["x[n, c, l]"], *normalization("n, l", "c", "", "")),
    "over_l_weight_bias": (["x[n, c, l]", "w[l]", "b[l]"], *normalization("l", "n, c", " * w[l] + b[l]", " * w + b")),
    "over_l_channel_weight": (["x[n, c, l]", "w[c]"], *normalization("l", "n, c", " * w[c]", " * w.unsqueeze(-1)")),
    "over_l": (["x[n, c, l]"], *normalization("l", "n, c", "", "")),
    "over_c_l_weight": (["x[n, c, l]", "w[c, l]"], *normalization("c, l", "n", " * w[c, l]", " * w")),
    "over_n_weight": (["x[n, c, l]", "w[c, l]"], *normalization("n", "c, l", " * w[c, l]", " * w")),
}


@pytest.fixture(scope="module")
def normalization_modules(tmp_path_factory):
    text = "".join(op_table(name, inputs, equation, reference, "eps = 1e-5")
                   for name, (inputs, equation, reference) in NORMALIZATIONS.items())
    return Lazy(tmp_path_factory, text, styles=("contraction", "broadcast"))


# The default run takes a normalization over the batch and length (batch-norm-like, weight and bias; the
# catalog's layer_norm and tests/test_normalizations.py take the trailing dims); `-m slow` (CI) takes every set
# of dims, with and without affine terms.
DEFAULT_NORMALIZATIONS = ("over_n_l_weight_bias",)


@pytest.mark.parametrize("name", [name if name in DEFAULT_NORMALIZATIONS else pytest.param(name, marks=pytest.mark.slow)
                                  for name in NORMALIZATIONS])
def test_normalizations_over_any_dims(normalization_modules, name):
    op, module = normalization_modules[name]
    check_gradients(op, module, sizes=equal_sizes(op))
    check_gradients(op, module)
    backward_matches_autograd_of_forward(op, module, make_inputs(op, equal_sizes(op)), {"eps": 1e-5})


# --- 8b. names SymPy knows are still the spec's names ----------------------------------------------

SYMPY_NAMES = ["pi", "E", "I", "oo", "N", "nan"]


@pytest.fixture(scope="module")
def named_modules(tmp_path_factory):
    text = "".join(op_table(f"named_{name}", ["x[i]", name, f"{name}v[i]"],
                            f"y[i] = x[i] * {name}v[i] + {name} * x[i] + p{name}", f"x * {name}v + {name} * x + p{name}",
                            f"p{name} = 0.5") for name in SYMPY_NAMES)
    return Lazy(tmp_path_factory, text)


@pytest.mark.parametrize("name", SYMPY_NAMES)
def test_an_input_named_like_a_sympy_constant_is_the_input(named_modules, name):
    op, module = named_modules[f"named_{name}"]
    check_gradients(op, module, params={f"p{name}": 2.0})


def test_pi_is_the_constant_only_when_nothing_is_named_pi(tmp_path):
    (op, module), = modules(tmp_path, op_table("circle", ["x[i]"], "y[i] = pi * x[i]", "torch.pi * x")).values()
    check_gradients(op, module)


# --- 8c. constants generated code cannot hold ------------------------------------------------------

@pytest.mark.parametrize("expression, shown", [
    ("x[i] * exp(1000)", "exp(1000)"), ("x[i] * 10 ** 400", "1.00e+400"), ("x[i] / 5e-324", "in x[i] / 5e-324"),
    ("x[i] * 1e308 * 10", "1.00e+309"), ("x[i] * log(-1)", "I*pi"), ("x[i] + exp(exp(10))", "exp(exp(10))"),
    (f"x[i] * {2 ** 1024}", "too large for a float"), (f"x[i] * {2 ** 5000}", "too large for a float"),
])
def test_a_constant_beyond_float64_is_a_spec_error(expression, shown):
    with pytest.raises(SpecError) as error:
        parse_catalog(op_table("big", ["x[i]"], f"y[i] = {expression}", "x"), "trust.toml")
    message = str(error.value)
    assert message.startswith("trust.toml:") and "op 'big'" in message and "\n" not in message, message
    assert shown in message, message


def test_large_finite_constants_still_generate(tmp_path):
    (op, module), = modules(tmp_path, op_table("large", ["x[i]"], "y[i] = x[i] * exp(700) / 1e300 + x[i] * 1e-300 + x[i] * 5e-324",
                                               "x * torch.exp(torch.tensor(700.0, dtype=torch.float64)) / 1e300 + x * 1e-300 + x * 5e-324")).values()
    check_gradients(op, module)
