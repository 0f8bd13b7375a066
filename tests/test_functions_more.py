"""The functions of issue 13: atan2, atan, asin, acos, tan, sinh, cosh, asinh, acosh, atanh, sign and a power
with a tensor exponent, x[...] ** p[...].

A generator writes the specs: each function (or all of them summed, one input pair each) placed in each of
several contexts (alone, broadcast against another input, inside a contraction whose reference is a
torch.einsum, batch dims, a mean, a loss, a softmax, a where() whose reference is a comparison, composed with
other new functions), with a torch reference composed the same way. The oracle is autograd of that reference:
`verify_op` (gradcheck, float64 and float32, equal sizes, kinks, the Function, the custom op, forward mode),
then every index of size 1 and of size 0, then inputs exactly on each function's special points (sign at 0,
atan2 at (0, 0) and on its branch cut, asin/acos/atanh at ±1, acosh at 1, x ** p at x == 0 with p in
{0, 1, 2, 0.5, -1}), where the gradient must be torch's (inf or NaN where torch's is inf or NaN: an
infinite derivative reaches a sum as inf or as inf - inf, by the order of the operations). The default run checks all
functions at once in a contraction, without the double backward (seconds); `-m slow` runs verify_op on every
function in every context, and on all functions at once in every context in both styles.
"""

import inspect
import json
from dataclasses import dataclass

import pytest
import torch

import derive.build
from derive import naming
from derive.contracts import autocast_policies
from derive.derivation import derive as derive_op
from derive.naming import STYLE_DIRS
from derive.spec import parse_catalog
from derive.testing import (assert_matches, built_op, check_gradients, check_tangents, gradcheck_op, jvp_arguments, kink_inputs,
                            load_module, make_inputs, reference, sizes_for, verify_op)


@dataclass(frozen=True)
class Function:
    """One function of the spec language, in the spec and in torch ({0}, {1}: its arguments)."""

    name: str
    spec: str
    torch: str
    domain: tuple[float, float] | None = None     # where the first argument's input is drawn
    special: tuple[float, ...] = (0.0,)           # values of the first argument where torch's gradient is a
                                                  # convention or infinite (0 for the smooth ones: a plain point)
    second: tuple[float, ...] | None = None       # a second argument and its special values, for atan2 and **
    # the special values (of the first, of the second argument) where the derivative is finite, for the tangent
    # check: torch's forward mode is no oracle where it is infinite (an unselected where() branch takes a tangent
    # 0 there, where torch's backward and derive's jvp give 0 * inf; an infinite value meets a zero tangent in
    # einsum's jvp), nor at atan2's (0, 0), where its atan2_jvp is 0 / 0 (see check_atan2_tangent)
    finite: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), ())


FUNCTIONS = [
    Function("atan", "atan({0})", "torch.atan({0})"),
    Function("tan", "tan({0})", "torch.tan({0})", domain=(-1.2, 1.2)),
    Function("sinh", "sinh({0})", "torch.sinh({0})"),
    Function("cosh", "cosh({0})", "torch.cosh({0})"),
    Function("asinh", "asinh({0})", "torch.asinh({0})"),
    Function("asin", "asin({0})", "torch.asin({0})", domain=(-0.9, 0.9), special=(-1.0, 1.0), finite=((), ())),
    Function("acos", "acos({0})", "torch.acos({0})", domain=(-0.9, 0.9), special=(-1.0, 1.0), finite=((), ())),
    Function("atanh", "atanh({0})", "torch.atanh({0})", domain=(-0.9, 0.9), special=(-1.0, 1.0), finite=((), ())),
    Function("acosh", "acosh({0})", "torch.acosh({0})", domain=(1.1, 3.0), special=(1.0,), finite=((), ())),
    Function("sign", "sign({0})", "torch.sign({0})", special=(0.0, -0.0), finite=((0.0, -0.0), ())),
    Function("atan2", "atan2({0}, {1})", "torch.atan2({0}, {1})", special=(0.0, -0.0), second=(0.0, -0.0, -1.0),
             finite=((0.0, -0.0), (-1.0,))),
    Function("power", "({0} ** {1})", "torch.pow({0}, {1})", domain=(0.1, 2.0), special=(0.0,),
             second=(0.0, 1.0, 2.0, 0.5, -1.0), finite=((0.0,), (0.0, 1.0, 2.0))),
]


@dataclass(frozen=True)
class Context:
    """Where the functions' value F stands: `equation` and `torch` hold {F}. A function's first argument is the
    input x declared with `first`, its second one z declared with `second`; `first_torch` and `second_torch`
    line them up with F's dims in torch."""

    name: str
    first: str
    second: str
    equation: str
    torch: str
    first_torch: str = "{}"
    second_torch: str = "{}"
    others: tuple[str, ...] = ()      # declarations of the context's own inputs


CONTEXTS = [
    Context("alone", "[n, k]", "[n, k]", "y[n, k] = {F}", "{F}"),
    Context("broadcast", "[n]", "[k]", "y[n, k] = {F} * w[k] + w[k]", "{F} * w + w",
            first_torch="{}.unsqueeze(1)", others=("w[k]",)),
    Context("contraction", "[n, k]", "[k]", "y[n, m] = sum({F} * w[k, m], k)",
            'torch.einsum("nk,km->nm", {F}, w)', others=("w[k, m]",)),
    Context("batch", "[..., k]", "[k]", "y[..., k] = {F} + {F}**2", "{F} + ({F}) ** 2"),
    Context("mean", "[n, k]", "[n]", "y[k] = mean({F}, n)", "({F}).mean(0)", second_torch="{}.unsqueeze(1)"),
    Context("loss", "[n]", "[n]", "loss = sum(({F} - t[n])**2, n)", "(({F} - t) ** 2).sum()", others=("t[n]",)),
    Context("softmax", "[n, k]", "[k]", "y[n, k] = softmax({F}, k)", "torch.softmax({F}, 1)"),
    Context("where", "[n, k]", "[n, k]", "y[n, k] = where(w[n, k] > 0, {F} * w[n, k], 0)", "torch.where(w > 0, ({F}) * w, 0)",
            others=("w[n, k]",)),
    Context("composed", "[n, k]", "[k]", "y[n, k] = atan({F}) + {F} * asinh(w[k])",
            "torch.atan({F}) + ({F}) * torch.asinh(w)", others=("w[k]",)),
]


@dataclass(frozen=True)
class Case:
    """A generated spec: one op, and which of its inputs are the functions' arguments."""

    name: str
    toml: str
    arguments: tuple[tuple[Function, str, str | None], ...]   # (function, first input, second input or None)


def case(functions: list[Function], context: Context, name: str) -> Case:
    """The op F = the sum of `functions` in `context`, each function with inputs of its own when there are
    several (x_<function>, z_<function>)."""
    inputs, ranges, terms, torch_terms, arguments = [], {}, [], [], []
    for function in functions:
        suffix = f"_{function.name}" if len(functions) > 1 else ""
        first, second = f"x{suffix}", f"z{suffix}" if function.second is not None else None
        inputs.append(first + context.first)
        if function.domain is not None:
            ranges[first] = list(function.domain)
        names = [first]
        if second is not None:
            inputs.append(second + context.second)
            names.append(second)
        terms.append(function.spec.format(*(n + context.first if n == first else n + context.second for n in names)))
        aligned = [context.first_torch.format(first)] + [context.second_torch.format(second)] * (second is not None)
        torch_terms.append(function.torch.format(*aligned))
        arguments.append((function, first, second))
    inputs += list(context.others)
    spec_value = "(" + " + ".join(terms) + ")" if len(terms) > 1 else terms[0]
    torch_value = "(" + " + ".join(torch_terms) + ")" if len(torch_terms) > 1 else torch_terms[0]
    lines = [f"[ops.{name}]", f"inputs = {json.dumps(inputs)}",
             f"equation = {json.dumps(context.equation.format(F=spec_value))}",
             f"reference = {json.dumps(context.torch.format(F=torch_value))}"]
    if ranges:
        lines.append("ranges = { " + ", ".join(f"{k} = {v}" for k, v in ranges.items()) + " }")
    return Case(name, "\n".join(lines) + "\n", tuple(arguments))


# the default run: every function at once, in a contraction; -m slow: each function in each context (and every
# function at once in each context, in both styles) through verify_op
DEFAULT = case(FUNCTIONS, CONTEXTS[2], "all_contraction")
SWEEP = {f"{f.name}_{c.name}": case([f], c, f"{f.name}_{c.name}") for f in FUNCTIONS for c in CONTEXTS}
# all at once only where the result is linear in F: where it is not (F + F**2, a loss, softmax, atan(F)), one
# function's infinite value at its special point makes the others' upstream gradient infinite, and there torch's
# pow backward gives 0 at p == 0 whatever the upstream (its where() wraps the product with it) where derive's
# multiplies 0 by it (NaN); each function alone in those contexts is in SWEEP
LINEAR = ("alone", "broadcast", "contraction", "mean", "where")
COMBINED = {f"all_{c.name}": case(FUNCTIONS, c, f"all_{c.name}") for c in CONTEXTS if c.name in LINEAR}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(case, style) -> (spec path, op, module), each spec derived once (shared with derive.testing's
    checks, which read the op's signature) and written once per style."""
    directory = tmp_path_factory.mktemp("functions_more")
    made = {}

    def spec_op_and_module(item: Case, style: str):
        if (item.name, style) not in made:
            spec = directory / f"{item.name}.toml"
            spec.write_text(item.toml)
            catalog = parse_catalog(item.toml, str(spec))
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(derive.build, "build_op", lambda op, *args: built_op(op))
                files = derive.build.render_catalog(catalog, (style,), namespace=f"more_{item.name}_{style}")
            for path, source in files.items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(source)
            module = load_module(directory / STYLE_DIRS[style] / f"{item.name}.py")
            made[item.name, style] = spec, catalog.op(item.name), module
        return made[item.name, style]
    return spec_op_and_module


def on_special_points(item: Case, op, seed: int, forward_mode: bool = False) -> list[torch.Tensor]:
    """Random inputs with each argument's entries moved onto its function's special values, each value once and
    then about half of the other entries (a first and a second argument independently: broadcasting pairs them
    all, as atan2's (0, 0)). For `forward_mode`, only those where the derivative is finite, and the second
    argument's in every entry (x ** p at x == 0 has an infinite derivative for a random p < 1)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(zip((t.name for t in op.inputs), make_inputs(op, seed=seed)))
    for function, first, second in item.arguments:
        for name, values, finite in ((first, function.special, function.finite[0]),
                                     (second, function.second, function.finite[1])):
            values = finite if forward_mode else values
            if name is None or not values:
                continue
            value = inputs[name]
            # every special value once (as far as there are entries), then about half of the others
            order = torch.randperm(value.numel(), generator=generator).reshape(value.shape)
            chosen = torch.tensor(values, dtype=value.dtype)[order % len(values)]
            placed = (order < len(values)) | (torch.rand(value.shape, generator=generator) < 0.5)
            if forward_mode and name == second:     # every entry: a first argument at 0 meets only these
                placed = torch.ones_like(placed)
            inputs[name] = torch.where(placed, chosen, value)
    return list(inputs.values())


def check_atan2_tangent(op, module, item: Case, inputs: list[torch.Tensor], seed: int) -> None:
    """atan2's share of the tangent at (0, 0) is 0, as torch's gradient there, where torch's own forward mode
    is NaN (atan2_jvp does not mask the 0 / 0 that atan2_backward masks): derive's jvp and backward agree.
    The oracle is the Jacobian of the reference in atan2's two inputs, row by row from its backward."""
    names = [t.name for t in op.inputs]
    generator = torch.Generator().manual_seed(seed)
    for function, first, second in item.arguments:
        if function.name != "atan2":
            continue
        positions = (names.index(first), names.index(second))

        def of_arguments(a, b):
            arguments = list(inputs)
            arguments[positions[0]], arguments[positions[1]] = a, b
            return reference(op)(*arguments)

        pair = tuple(inputs[p] for p in positions)
        assert all((value == 0).any() for value in pair), "no entries at 0"
        tangents = [torch.randn(inputs[p].shape, generator=generator, dtype=inputs[p].dtype)
                    if p in positions else None for p in range(len(inputs))]
        jacobians = torch.autograd.functional.jacobian(of_arguments, pair)
        expected = sum(torch.tensordot(jacobian, tangents[p], dims=tangents[p].dim())
                       for jacobian, p in zip(jacobians, positions))
        share = getattr(module, naming.jvp(op.name))(**jvp_arguments(op, module, inputs, tangents))
        assert_matches(share, expected, infinite=True, msg=lambda m: f"{op.name}: atan2's share: {m}")


def check_special_points(op, module, item: Case, seeds: int = 2) -> None:
    """Every index of size 1 and of size 0, then inputs on the special points: gradients, tangents."""
    for size in (1, 0):
        check_gradients(op, module, sizes=dict.fromkeys(sizes_for(op), size), equal_nan=size == 0)
    for seed in range(seeds):
        placed = on_special_points(item, op, seed)
        check_gradients(op, module, inputs=placed, infinite=True)
        check_atan2_tangent(op, module, item, placed, seed)
        check_tangents(op, module, inputs=on_special_points(item, op, seed, forward_mode=True), kinks=True,
                       infinite=True)


def test_every_function_matches_autograd_of_the_reference(generated):
    """All functions in one contraction: what verify_op checks but the double backward and the custom op (the
    sweep below runs verify_op itself), then sizes 1 and 0 and the special points."""
    spec, op, module = generated(DEFAULT, "contraction")
    gradcheck_op(op, module)
    for dtype in (torch.float64, torch.float32):
        check_gradients(op, module, dtype)
    check_gradients(op, module, torch.float64, kinks=True, infinite=True)
    placed, placements = kink_inputs(op, make_inputs(op))
    assert {p.kink.function for p in placements} == {"sign", "atan2"}, placements
    check_gradients(op, module, inputs=placed)
    check_gradients(op, module, sizes=dict.fromkeys(sizes_for(op), 3))
    check_special_points(op, module, DEFAULT, seeds=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_each_function_in_each_context(generated, name):
    spec, op, module = generated(SWEEP[name], "contraction")
    verify_op(spec, name, spec.parent / f"{name}.py")
    check_special_points(op, module, SWEEP[name])


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLE_DIRS)
@pytest.mark.parametrize("name", COMBINED)
def test_every_function_in_each_context(generated, name, style):
    spec, op, module = generated(COMBINED[name], style)
    verify_op(spec, name, spec.parent / STYLE_DIRS[style] / f"{name}.py")
    check_special_points(op, module, COMBINED[name])


@pytest.mark.parametrize("reference_text, equation, expected", [
    ("(x > 0) * x", "y[n, k] = where(x[n, k] > 0, x[n, k], 0)", lambda x, w: torch.relu(x)),
    ("torch.where(x <= 0.5, x, 0.5 * w.sum())", "y[n, k] = where(x[n, k] <= 0.5, x[n, k], 0.5 * sum(w[k, m], k, m))",
     lambda x, w: torch.clamp_max(x, 0.5) * (x <= 0.5) + (x > 0.5) * 0.5 * w.sum()),
    ('torch.einsum("nk,km->nm", x, w)', "y[n, m] = sum(x[n, k] * w[k, m], k)", lambda x, w: x @ w),
    ("torch.einsum('nk, km -> n', x, w)", "y[n] = sum(x[n, k] * w[k, m], k, m)", lambda x, w: (x @ w).sum(1)),
])
def test_references_with_comparisons_and_einsum_evaluate(reference_text, equation, expected):
    """A reference may compare tensors and give torch.einsum its equation; it evaluates to the torch value."""
    text = (f"[ops.ref]\ninputs = [\"x[n, k]\", \"w[k, m]\"]\ndifferentiable = [\"x\"]\n"
            f"equation = \"{equation}\"\nreference = {json.dumps(reference_text)}\n")
    op = parse_catalog(text, "ref.toml").op("ref")
    x, w = make_inputs(op)
    torch.testing.assert_close(reference(op)(x, w), expected(x, w))


@pytest.mark.parametrize("name", ["sign_alone", "sign_broadcast"])
def test_a_tangent_that_adds_nothing_has_no_share(generated, name):
    """sign(x) has derivative 0: x's tangent adds nothing to the result's (the jvp printed
    `torch.zeros_like(None)` for it), and without it no list of shares is needed."""
    spec, op, module = generated(SWEEP[name], "contraction")
    source = inspect.getsource(getattr(module, naming.jvp(op.name)))
    assert "share of tangent_x: none" in source and "tangent_x is not None" not in source, source
    assert "shares" not in source, source     # one share left is returned as it is; none: zeros
    check_gradients(op, module)
    check_tangents(op, module)


def test_an_infinite_gradient_may_reach_a_sum_as_inf_or_nan():
    """assert_matches(infinite=True): inf or NaN where the expected value is inf, anything where it is NaN (a
    where() branch not taken: torch's 0 * inf), close elsewhere."""
    expected = torch.tensor([float("inf"), float("nan"), 1.0])
    assert_matches(torch.tensor([float("nan"), float("-inf"), 1.0]), expected, infinite=True)
    assert_matches(torch.tensor([float("-inf"), 0.0, 1.0]), expected, infinite=True)
    for wrong in ([1.0, float("nan"), 1.0], [float("inf"), float("nan"), float("nan")],
                  [float("inf"), float("nan"), 2.0]):
        with pytest.raises(AssertionError):
            assert_matches(torch.tensor(wrong), expected, infinite=True)


@pytest.mark.parametrize("equation, cuda", [
    ("y[n] = asin(x[n]) * p[n]", "float32"), ("y[n] = cosh(x[n]) + p[n]", "float32"),
    ("y[n] = x[n] ** p[n]", "float32"), ("y[n] = 2 ** x[n] + p[n]", "float32"),
    ("y[n] = atan2(x[n], p[n])", "promote"), ("y[n] = sign(x[n]) * x[n] ** 2 + p[n]", "promote"),
])
def test_autocast_follows_cuda_float32_list(equation, cuda):
    """CUDA autocast runs asin, acos, sinh, cosh, tan and pow in float32 (atan2 promotes, sign keeps the
    dtype); on the CPU none of them is listed."""
    text = f'[ops.cast]\ninputs = ["x[n]", "p[n]"]\nequation = "{equation}"\nreference = "x"\n'
    policies = {a.device: a.policy for a in autocast_policies(derive_op(parse_catalog(text, "cast.toml").op("cast")))}
    assert policies == {"cpu": "promote", "cuda": cuda}
