"""Index positions in equations: comparisons between indices, diagonals (a repeated index) and size(d).

A generator writes the specs: every comparison operator between two indices, in both orders, along the
last and a middle dim, with the two indices of one size (a running sum: `torch.cumsum`) or of two sizes (a
mask of positions); the diagonal of a matrix, of a rank-3 tensor over two dims that are not adjacent and
of a batch; and size(d) as a number. Each is checked against an independent torch reference written beside
it (a triangular mask, torch.diagonal, torch.trace), in both styles, with distinct sizes, every size equal,
size 1 and size 0: the generated forward, backward (exact shapes) and forward mode equal autograd of the
reference. The contraction style of a running sum calls cumsum and never builds the (T, T) mask.
"""

import re
import textwrap

import pytest
import torch

from derive.build import render_catalog
from derive.naming import STYLES
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, gradcheck_op, load_module, sizes_for, verify_op

# s REL t, as the spec writes it (either order) -> the (t, s) mask that keeps s: torch.tril/triu's diagonal
RELATIONS = {"<=": ("tril", 0), "<": ("tril", -1), ">=": ("triu", 0), ">": ("triu", 1)}
MIRRORED = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}


def mask(relation: str, rows: str, columns: str, like: str) -> str:
    """torch source for the (t, s) matrix that is 1 where s `relation` t."""
    function, diagonal = RELATIONS[relation]
    return f"torch.{function}(torch.ones({rows}, {columns}, dtype={like}.dtype), {diagonal})"


def running_sums() -> dict[str, str]:
    """A sum over s of where(s REL t, ...) for each relation, written both ways round, along the last dim and
    a middle one (t ranges over s's size): op name -> spec body."""
    specs = {}
    for name, relation in zip(("le", "lt", "ge", "gt"), RELATIONS):
        for order, condition in (("st", f"s {relation} t"), ("ts", f"t {MIRRORED[relation]} s")):
            last = mask(relation, "x.shape[1]", "x.shape[1]", "x")
            specs[f"run_{name}_{order}_last"] = f'''
                inputs = ["x[b, s]"]
                equation = "y[b, t] = sum(where({condition}, x[b, s], 0), s)"
                reference = "x @ {last}.T"
            '''
            middle = mask(relation, "x.shape[1]", "x.shape[1]", "x")
            specs[f"run_{name}_{order}_middle"] = f'''
                inputs = ["x[b, s, c]", "w[c]"]
                equation = "y[b, t, c] = sum(where({condition}, 2 * x[b, s, c] * w[c], 0), s)"
                reference = "2 * ({middle} @ x) * w"
            '''
    return specs


def masks() -> dict[str, str]:
    """Comparisons of two indices of different sizes (no running sum: a mask of positions), == and !=."""
    specs = {}
    for name, relation in zip(("le", "lt", "ge", "gt"), RELATIONS):
        function, diagonal = RELATIONS[relation]
        specs[f"mask_{name}"] = f'''
            inputs = ["a[t, s]"]
            equation = "y[t] = sum(where(s {relation} t, a[t, s], 0), s)"
            reference = "torch.{function}(a, {diagonal}).sum(1)"
        '''
    specs["mask_causal"] = '''
        inputs = ["a[t, s]", "v[s, d]"]
        equation = "y[t, d] = sum(where(s <= t, a[t, s] * v[s, d], 0), s)"
        reference = "torch.tril(a) @ v"
    '''
    specs["mask_eq"] = '''
        inputs = ["a[i, j]"]
        equation = "y[i, j] = where(i == j, a[i, j], 3 * a[i, j])"
        reference = "a * (3 - 2 * torch.eye(a.shape[0], a.shape[1], dtype=a.dtype))"
    '''
    specs["mask_ne"] = '''
        inputs = ["a[i, j]"]
        equation = "y[i] = sum(where(i != j, a[i, j], 0), j)"
        reference = "(a * (1 - torch.eye(a.shape[0], a.shape[1], dtype=a.dtype))).sum(1)"
    '''
    return specs


DIAGONALS = {
    "trace_declared_square": '''
        inputs = ["a[i, i]"]
        equation = "y = sum(a[i, i], i)"
        reference = "torch.trace(a)"
    ''',
    "trace": '''
        inputs = ["a[i, j]"]
        equation = "y = sum(a[i, i], i)"
        reference = "torch.trace(a)"
    ''',
    "diagonal": '''
        inputs = ["a[i, j]"]
        equation = "y[i] = a[i, i]"
        reference = "torch.diagonal(a)"
    ''',
    "diagonal_outer_dims": '''
        inputs = ["a[i, b, j]", "w[i]"]
        equation = "y[b, i] = a[i, b, i] * w[i]"
        reference = "torch.diagonal(a, 0, 0, 2) * w"
    ''',
    "diagonal_batched_trace": '''
        inputs = ["a[..., i, j]"]
        equation = "y[...] = sum(a[..., i, i], i)"
        reference = "torch.diagonal(a, 0, -2, -1).sum(-1)"
    ''',
    "diagonal_embedded": '''
        inputs = ["x[b, i]"]
        equation = "y[i, b, j] = where(i == j, x[b, i], 0)"
        reference = "torch.diag_embed(x, 0, 0, 2)"
    ''',
}

SIZES_AS_VALUES = {
    "centered_by_size": '''
        inputs = ["x[n, d]"]
        equation = "y[n, d] = x[n, d] - sum(x[n, d], d) / size(d)"
        reference = "x - x.mean(1, keepdim=True)"
    ''',
    "attention_scores_by_size": '''
        inputs = ["q[..., d]", "k[s, d]"]
        equation = "y[..., s] = sum(q[..., d] * k[s, d], d) / sqrt(size(d))"
        reference = "q @ k.T / k.shape[1] ** 0.5"
    ''',
}

SPECS = {name: textwrap.dedent(body) for name, body in
         {**running_sums(), **masks(), **DIAGONALS, **SIZES_AS_VALUES}.items()}
# the default run checks a few of each kind (a running sum each way round and along each dim, a mask, a
# diagonal, a size), the rest under -m slow
FAST = ["run_le_st_last", "run_gt_ts_middle", "mask_lt", "mask_eq", "trace_declared_square", "diagonal_outer_dims",
        "attention_scores_by_size"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (spec path, op, module), each spec derived and written once."""
    directory = tmp_path_factory.mktemp("index_conditions")
    made = {}

    def op_and_module(name, style):
        if name not in made:
            spec = directory / f"{name}.toml"
            spec.write_text(f"[ops.{name}]{SPECS[name]}")
            catalog = parse_catalog(spec.read_text(), str(spec))
            for path, source in render_catalog(catalog, STYLES, namespace=f"index_{name}").items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(source)
            made[name] = spec, catalog.op(name)
        spec, op = made[name]
        return spec, op, load_module(directory / ("broadcast/" if style == "broadcast" else "") / f"{name}.py")
    return op_and_module


def size_cases(op, every: bool = True) -> dict[str, dict[str, int]]:
    """Distinct sizes, every size equal, every size 1, and each size 0 in turn (the others 2); without
    `every`, distinct, equal and the last index's size 0."""
    representatives = sorted(sizes_for(op))
    cases = {"distinct": dict(zip(representatives, (2, 4, 3, 5))), "equal": dict.fromkeys(representatives, 3)}
    if every:
        cases["one"] = dict.fromkeys(representatives, 1)
    for empty in representatives if every else representatives[-1:]:
        cases[f"{empty}=0"] = {size: 0 if size == empty else 2 for size in representatives}
    return cases


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", FAST)
def test_matches_the_reference_at_every_size(generated, name, style, every=False):
    _, op, module = generated(name, style)
    gradcheck_op(op, module)
    for case, sizes in size_cases(op, every).items():
        empty = 0 in sizes.values()     # a division by size(d) = 0 is NaN, in the reference too
        check_gradients(op, module, sizes=sizes, equal_nan=empty)
        check_tangents(op, module, sizes=sizes, equal_nan=empty)


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", SPECS)
def test_matches_the_reference_at_every_size_slow(generated, name, style):
    test_matches_the_reference_at_every_size(generated, name, style, every=True)


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", SPECS)
def test_verify_op(generated, name, style):
    """Everything derive checks on its own catalog: float32, the Function's double backward, the custom op."""
    spec, _, module = generated(name, style)
    verify_op(spec, name, module.__file__)


def code_of(module, function: str) -> str:
    """The body of one generated function, docstring left out."""
    source = open(module.__file__).read()
    body = source.split(f"def {function}(", 1)[1].split("\ndef ", 1)[0].split("\nclass ", 1)[0]
    return re.sub(r'""".*?"""', "", body, flags=re.S)


@pytest.mark.parametrize("name", ["run_le_st_last", "run_gt_ts_middle",
                                  pytest.param("run_lt_ts_last", marks=pytest.mark.slow),
                                  pytest.param("run_ge_st_middle", marks=pytest.mark.slow)])
def test_a_running_sum_is_cumsum_without_a_mask(generated, name):
    """Contraction style: the forward, the backward (a reversed cumsum: flip, cumsum, flip) and the jvp call
    cumsum; none builds the (T, T) mask of positions (an arange) or a matrix product with one."""
    _, op, module = generated(name, "contraction")
    for function in (f"{name}_forward", f"{name}_backward", f"{name}_jvp"):
        code = code_of(module, function)
        assert "cumsum(" in code, code
        assert "arange" not in code and "torch.where" not in code and "@" not in code, code
    # y[t] sums x[s] over s <= t (or <): grad_x[s] sums grad_y[t] over t >= s, a reversed running sum
    grad_x = next(line for line in code_of(module, f"{name}_backward").splitlines() if "grad_x = " in line
                  and "None" not in line)
    assert (".flip(" in grad_x) == (name.split("_")[1] in ("le", "lt")), grad_x


def test_a_diagonal_gradient_is_diag_embed(generated):
    """Contraction style: reading a[i, i] is a.diagonal(...), its gradient torch.diag_embed, with no mask."""
    _, _, module = generated("diagonal", "contraction")
    assert "a.diagonal(0, 0, -1)" in code_of(module, "diagonal_forward")
    backward = code_of(module, "diagonal_backward")
    assert "torch.diag_embed(grad_y" in backward and "arange" not in backward, backward


def test_a_diagonal_needs_a_square_input(generated):
    """The dims a diagonal reads must have one size: a shape contract says so, naming both."""
    _, _, module = generated("trace", "contraction")
    with pytest.raises(RuntimeError, match=r"trace: a has size 4 at dim 1 \(index j\) but 3 at dim 0 \(index i\)"):
        module.trace_forward(torch.randn(3, 4, dtype=torch.float64))


def test_masks_of_indices_of_two_sizes(generated):
    """An index that only the result and a condition have (t) takes the size of the index it is compared
    with; two declared indices of different sizes (t over 3, s over 5) give a mask, not a running sum."""
    _, op, module = generated("mask_le", "contraction")
    assert dict(op.index_sizes) == {"s": "s", "t": "t"}
    assert "cumsum" not in code_of(module, "mask_le_backward")
    _, op, _ = generated("run_le_st_last", "contraction")
    assert dict(op.index_sizes)["t"] == "s"


@pytest.mark.parametrize("style", STYLES)
def test_dividing_by_a_size_that_is_zero_is_nan_as_in_torch(generated, style):
    """`/ sqrt(size(d))` with d of size 0 divides a tensor (NaN, as the reference), not a Python number (which
    raised ZeroDivisionError: `size_d**-0.5`)."""
    _, op, module = generated("attention_scores_by_size", style)
    sizes = {size: 0 if size == "d" else 2 for size in sizes_for(op)}
    check_gradients(op, module, sizes=sizes, equal_nan=True)
    check_tangents(op, module, sizes=sizes, equal_nan=True)
