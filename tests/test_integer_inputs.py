"""Integer and bool inputs read as values, and gathers along any dim (issue 13, items 7 and 8).

The specs are generated: a mask in each role it can play (a factor, a where() condition compared or bare,
a complement, inside a function, a sum and a contraction, compared with a float), over dims with and
without `...`; and a gather of each kind (torch.gather with the index over every other dim, over some of
them, or none beside its own; advanced indexing with one or two index dims) along each dim of rank-2
and rank-3 inputs. Each is derived, generated in both styles and checked by `verify_op` against
autograd of its torch reference; the masks again with bool tensors, the gathers with repeated indices
(the gradient must accumulate) and with sizes 1 and 0. The default run takes a slice; `-m slow` all.
"""

import itertools
import textwrap

import pytest
import torch

from conftest import GENERATED, STYLES, shared_builds
from derive.build import STYLE_DIRS, render_catalog
from derive.errors import SpecError
from derive.spec import parse_catalog
from derive.testing import (call_backward, check_gradients, gradcheck_op, load_module, make_inputs, sizes_for,
                            verify_op)


# --- generated specs ------------------------------------------------------------------------------

def _access(name: str, dims: tuple[str, ...]) -> str:
    return f"{name}[{', '.join(dims)}]" if dims else name


# role -> (inputs besides mask, equation right-hand side, result dims, reference), for the mask's dims D;
# the last dim of D is the one summed where a role sums
def _mask_role(role: str, dims: tuple[str, ...]):
    m, x, a, b = (_access(n, dims) for n in ("mask", "x", "a", "b"))
    last, rest = dims[-1], dims[:-1]
    return {
        "factor": (["x"], f"{m} * {x}", dims, "mask * x"),
        "where_compared": (["a", "b"], f"where({m} > 0, {a}, {b})", dims, "torch.where(mask.gt(0), a, b)"),
        "where_bare": (["a", "b"], f"where({m}, {a}, {b})", dims, "torch.where(mask.bool(), a, b)"),
        "complement": (["x"], f"(1 - {m}) * {x}", dims, "(1 - mask.long()) * x"),
        "function": (["x"], f"exp({m}) * {x} + {m} / 2", dims,
                     "torch.exp(mask.double()).to(x.dtype) * x + mask / 2"),
        "compared_with_float": (["x"], f"where({x} > {m}, {x}, 0)", dims, "torch.where(x.gt(mask), x, 0)"),
        "sum": (["x"], f"sum({m} * {x}, {last})", rest, f"(mask * x).sum({len(dims) - 1})"),
        "count": (["x"], f"sum({m}, {last}) * {_access('w', rest)}", rest, f"mask.sum({len(dims) - 1}) * w"),
        # a number beside the mask takes the float inputs' dtype, not the mask's (found by the fuzzer)
        "bounded": (["x"], f"Max({m}, 0.5) * {x}", dims, "torch.clamp_min(mask.to(x.dtype), 0.5) * x"),
        # arithmetic on a mask inside a comparison is cast as well: a bool mask does not subtract
        "compared_arithmetic": (["x"], f"where({x} > 1 - {m}, {x}, 0)", dims,
                                "torch.where(x.gt(1 - mask.long()), x, 0)"),
        "numbers": (["x"], f"where({m} > 0, 2.5, -1) * {x}", dims, "torch.where(mask.gt(0), 2.5, -1.0).to(x.dtype) * x"),
    }[role]


MASK_ROLES = ["factor", "where_compared", "where_bare", "complement", "function", "compared_with_float", "sum",
              "count", "bounded", "numbers", "compared_arithmetic"]
MASK_DIMS = [("i",), ("n", "k"), ("...",)]


def mask_spec(role: str, dims: tuple[str, ...]) -> str:
    others, rhs, result, reference = _mask_role(role, dims)
    inputs = [_access("mask", dims)] + [_access(n, dims) if n != "w" else _access(n, dims[:-1]) for n in others]
    if role == "count":
        inputs = [_access("mask", dims), _access("w", dims[:-1])]
    left = _access("y", result) if result else "y"
    return textwrap.dedent(f'''
        [ops.mask_{role}]
        inputs = {inputs!r}
        integer = ["mask"]
        equation = "{left} = {rhs}"
        reference = "{reference}"
    ''').replace("'", '"')


def mask_cases():
    for role, dims in itertools.product(MASK_ROLES, MASK_DIMS):
        if role in ("sum", "count") and dims[-1] == "...":
            continue
        yield role, dims


def gather_spec(kind: str, rank: int, dim: int) -> tuple[str, str]:
    """(spec, op name) of x with `rank` dims read at dim `dim` through idx, of one kind:

    - "gather": idx has x's other dims and one of its own (torch.gather);
    - "pick": idx has exactly x's other dims (torch.gather of one entry, squeezed);
    - "expand": idx has one of x's other dims fewer (rank 3; torch.gather of an expanded index);
    - "select": idx has one dim of its own and none of x's (index_select);
    - "select2": idx has two dims of its own (advanced indexing, idx[j, k])."""
    names = ("a", "b", "c")[:rank]
    others = tuple(n for p, n in enumerate(names) if p != dim)
    x_dims = tuple(n if p != dim else "v" for p, n in enumerate(names))
    if kind == "gather":
        idx = names[:dim] + ("j",) + names[dim + 1:]
        reference = f"torch.gather(x, {dim}, idx)"
        result = idx
    elif kind == "pick":
        idx = others
        reference = f"torch.gather(x, {dim}, idx.unsqueeze({dim})).squeeze({dim})"
        result = others
    elif kind == "expand":
        lacking = others[0]
        idx = tuple(n if n != names[dim] else "j" for n in names if n != lacking)
        full = names[:dim] + ("j",) + names[dim + 1:]
        at = full.index(lacking)
        sizes = ", ".join(f"x.shape[{full.index(lacking)}]" if n == lacking else "-1" for n in full)
        reference = f"torch.gather(x, {dim}, idx.unsqueeze({at}).expand({sizes}))"
        result = full
    elif kind == "select":
        idx = ("j",)
        reference = f"torch.index_select(x, {dim}, idx)"
        result = names[:dim] + ("j",) + names[dim + 1:]
    else:
        idx = ("j", "k")
        reference = f"torch.index_select(x, {dim}, idx.reshape(-1)).unflatten({dim}, idx.shape)"
        result = names[:dim] + ("j", "k") + names[dim + 1:]
    read = ", ".join(n if n != "v" else _access("idx", idx) for n in x_dims)
    name = f"{kind}_rank{rank}_dim{dim}"
    spec = textwrap.dedent(f'''
        [ops.{name}]
        inputs = ["{_access('x', x_dims)}", "{_access('idx', idx)}"]
        integer = ["idx"]
        equation = "{_access('y', result)} = x[{read}]"
        reference = "{reference}"
    ''')
    return spec, name


GATHER_KINDS = ["gather", "pick", "expand", "select", "select2"]


def gather_cases():
    for kind, rank in itertools.product(GATHER_KINDS, (2, 3)):
        if kind == "expand" and rank < 3:
            continue
        for dim in range(rank):
            yield kind, rank, dim


def generate(tmp_path, text: str):
    """The op of `text` written as a spec file and generated in both styles: (spec path, op, {style: module})."""
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    catalog = parse_catalog(text, str(spec))
    with shared_builds():
        files = render_catalog(catalog, tuple(STYLES), namespace=f"test_{tmp_path.name}".replace("-", "_"))
    modules = {}
    for style in STYLES:
        path = f"{STYLE_DIRS[style]}{catalog.ops[0].name}.py"
        target = tmp_path / path.replace("/", "_")
        target.write_text(files[path])
        modules[style] = target
    return spec, catalog.ops[0], modules


def check_bool_masks(op, module):
    """The module given the masks as bool tensors computes what it computes given them as int64, in the
    inputs' dtype: forward and every gradient."""
    for dtype in (torch.float64, torch.float32):
        inputs = make_inputs(op, dtype=dtype)
        masks = [t.integer and t.value_range is None for t in op.inputs]
        assert any(masks)
        as_bool = [v.bool() if mask else v for v, mask in zip(inputs, masks)]
        forward = getattr(module, f"{op.name}_forward")
        output, output_bool = forward(*inputs), forward(*as_bool)
        assert output_bool.dtype == output.dtype == dtype
        torch.testing.assert_close(output_bool, output)
        grad = torch.randn_like(output)
        for got, want in zip(call_backward(op, module, grad, as_bool, output_bool),
                             call_backward(op, module, grad, inputs, output)):
            if want is not None:
                assert got.dtype == want.dtype == dtype
                torch.testing.assert_close(got, want)


def check_mask_spec(tmp_path, role, dims):
    spec, op, modules = generate(tmp_path, mask_spec(role, dims))
    for style, path in modules.items():
        verify_op(spec, op.name, path)
        check_bool_masks(op, load_module(path))


def check_gather_spec(tmp_path, kind, rank, dim):
    text, name = gather_spec(kind, rank, dim)
    spec, op, modules = generate(tmp_path, text)
    for style, path in modules.items():
        verify_op(spec, op.name, path)
        module = load_module(path)
        sizes = sizes_for(op)
        # more positions than values: the index repeats, and the gradient must add every read
        repeated = dict(sizes, v=2, j=7)
        inputs = make_inputs(op, repeated)
        assert inputs[1].unique().numel() < inputs[1].numel()
        check_gradients(op, module, inputs=inputs)
        gradcheck_op(op, module, sizes=repeated)
        for size in ("j", "a"):     # no position read, or no row
            check_gradients(op, module, sizes=dict(sizes, **{size: 0}))
        check_gradients(op, module, sizes=dict.fromkeys(sizes, 1))


FAST_MASKS = [("factor", ("n", "k")), ("where_bare", ("...",)), ("numbers", ("i",)), ("compared_arithmetic", ("i",))]
FAST_GATHERS = [("gather", 2, 1), ("select2", 3, 1)]


@pytest.mark.parametrize("role, dims", FAST_MASKS)
def test_masks_as_values(tmp_path, role, dims):
    check_mask_spec(tmp_path, role, dims)


@pytest.mark.slow
@pytest.mark.parametrize("role, dims", [c for c in mask_cases() if c not in FAST_MASKS])
def test_masks_as_values_everywhere(tmp_path, role, dims):
    check_mask_spec(tmp_path, role, dims)


@pytest.mark.parametrize("kind, rank, dim", FAST_GATHERS)
def test_gathers(tmp_path, kind, rank, dim):
    check_gather_spec(tmp_path, kind, rank, dim)


@pytest.mark.slow
@pytest.mark.parametrize("kind, rank, dim", [c for c in gather_cases() if c not in FAST_GATHERS])
def test_gathers_along_every_dim(tmp_path, kind, rank, dim):
    check_gather_spec(tmp_path, kind, rank, dim)


# --- what the catalog's gathers lower to ------------------------------------------------------------

def _backward_line(op_name: str, target: str, style: str = "contraction") -> str:
    source = (GENERATED / f"{STYLE_DIRS[style]}{op_name}.py").read_text()
    return next(line.strip() for line in source.splitlines() if line.strip().startswith(f"{target} = ")
                and "None" not in line)


def test_gather_lowers_to_gather_and_scatter_add():
    """torch.gather's own pair, never a one-hot of the gathered dim; the zeros come from grad_y and take its
    batch dims under vmap, so the gradient is added in place (one allocation, as autograd's)."""
    source = (GENERATED / "gather.py").read_text()
    assert "return x.gather(1, idx)" in source
    assert _backward_line("gather", "grad_x") == "grad_x = grad_y.new_zeros(x.shape).scatter_add_(1, idx, grad_y)"
    assert "torch.nn.functional.one_hot" not in source


def test_embedding_2d_adds_rows_with_torchs_embedding_backward():
    """Rows of a 2-D table read by a (B, T) index: torch's own embedding backward adds them up (index_add_ of the
    flattened rows took 1.7x its time)."""
    source = (GENERATED / "embedding_2d.py").read_text()
    assert "return table.index_select(0, idx.flatten()).unflatten(0, idx.shape)" in source
    assert _backward_line("embedding_2d", "grad_table") == \
        "grad_table = torch.ops.aten.embedding_dense_backward(grad_y, idx, table.shape[0], -1, False)"
    assert "torch.nn.functional.one_hot" not in source


def test_rows_of_a_wider_table_are_added_with_index_add(tmp_path):
    """x[a, idx[j, k], b]: rows along dim 1 of a 3-D input, index_add over the flattened index."""
    text, _ = gather_spec("select2", 3, 1)
    _, op, modules = generate(tmp_path, text)
    source = modules["contraction"].read_text()
    assert "return x.index_select(1, idx.flatten()).unflatten(1, idx.shape)" in source
    assert "grad_x = grad_y.new_zeros(x.shape).index_add_(1, idx.reshape(-1), grad_y.flatten(1, 2))" in source


def test_a_gather_sharing_some_dims_expands_its_index(tmp_path):
    """x[a, b, idx[b, j]]: the index is lined up as x (j at the gathered dim) and expanded over a, a view."""
    text, _ = gather_spec("expand", 3, 2)
    _, op, modules = generate(tmp_path, text)
    source = modules["contraction"].read_text()
    assert "return x.gather(2, idx.unsqueeze(0).expand(x.shape[0], -1, -1))" in source
    assert "grad_x = grad_y.new_zeros(x.shape).scatter_add_(2, idx.unsqueeze(0).expand(x.shape[0], -1, -1), " \
        "grad_y)" in source


# --- inputs, contracts, refusals -------------------------------------------------------------------

def test_make_inputs_draws_masks_of_zeros_and_ones():
    op = parse_catalog(mask_spec("factor", ("n", "k")), "m.toml").ops[0]
    mask, _ = make_inputs(op, {"n": 8, "k": 8})
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1}


def test_bool_is_accepted_for_a_mask_and_refused_for_an_index(tmp_path):
    _, op, modules = generate(tmp_path, mask_spec("factor", ("i",)))
    module = load_module(modules["contraction"])
    x = torch.randn(4)
    mask = torch.tensor([True, False, True, False])
    torch.testing.assert_close(module.mask_factor(mask, x), torch.where(mask, x, 0))
    with pytest.raises(RuntimeError, match="mask has dtype torch.float32 but is declared an integer input"):
        module.mask_factor(x, x)
    embedding = load_module(GENERATED / "embedding.py")
    with pytest.raises(RuntimeError, match="idx has dtype torch.bool"):
        embedding.embedding(torch.randn(3, 2), torch.tensor([True, False]))


def test_a_condition_on_integers_alone_is_no_kink():
    """where(mask[i] > 0, ...) picks a branch per entry; a mask does not vary, so there is no kink to settle
    (and the bare form must keep its condition: treated as a kink, mask != 0 read as true on both sides)."""
    from derive.pipeline import build_op
    for role in ("where_compared", "where_bare"):
        op = parse_catalog(mask_spec(role, ("i",)), "m.toml").ops[0]
        gradients = build_op(op).derivation.gradients
        assert all(not g.kinks for g in gradients)
        assert all(g.vjp.has(__import__("sympy").Piecewise) for g in gradients)


def test_an_integer_input_read_nowhere_is_refused():
    text = mask_spec("factor", ("i",)).replace('"y[i] = mask[i] * x[i]"', '"y[i] = x[i]"')
    with pytest.raises(SpecError, match="integer input 'mask' is never used"):
        parse_catalog(text, "m.toml")
