"""Constructs derive refused or got wrong (issue 13): gathers in general and affine reads under batch dims.

Gathers: an input read at one subscript through an integer input indexed by plain indices, along any dim;
the index may share some of the input's other dims (torch.gather) or none (index_select), with any number
of dims of its own, under batch dims '...' of the input and of the index (which broadcast). The gradient is
an accumulating scatter (scatter_add / index_add), never a one-hot; a repeated index adds up; an index
outside [0, size) is an error, negative ones included (as torch.gather and F.embedding; advanced indexing
would read them from the end).

Affine reads under '...': `y[..., t] = sum(x[..., t + k] * w[k], k)` and `mean(x[..., 2*t + k], k)` with
any number of batch dims (none, one, two, an empty one), in both styles, against references built from
`unfold` and the torch builtins, with float64 gradcheck and gradgradcheck.
"""

import textwrap

import pytest
import torch

from conftest import shared_builds
from derive.build import STYLE_DIRS, render_catalog
from derive.spec import parse_catalog
from derive.testing import check_gradients, gradcheck_op, load_module, make_inputs, sizes_for, verify_op

BATCHES = [(), (3,), (2, 3), (0, 2)]


def generate(tmp_path, text: str, styles=tuple(STYLE_DIRS)):
    """The op of `text` written as a spec file and generated in `styles`: (spec path, op, {style: module})."""
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    catalog = parse_catalog(text, str(spec))
    with shared_builds():
        files = render_catalog(catalog, tuple(styles), namespace=f"test_{tmp_path.name}".replace("-", "_"))
    modules = {}
    for style in styles:
        path = f"{STYLE_DIRS[style]}{catalog.ops[0].name}.py"
        modules[style] = tmp_path / path.replace("/", "_")
        modules[style].write_text(files[path])
    return spec, catalog.ops[0], modules


def _spec(name: str, inputs: list[str], equation: str, reference: str = "", extra: str = "") -> str:
    lines = [f"[ops.{name}]", f"inputs = {inputs!r}".replace("'", '"'), f'equation = "{equation}"']
    if any(i.startswith("idx") for i in inputs):
        lines.append('integer = ["idx"]')
    if reference:
        lines.append(f'reference = "{reference}"')
    return "\n".join(lines + ([extra] if extra else [])) + "\n"


def _check_repeats_and_sizes(op, path):
    """Repeated indices add up, and sizes 1 and 0 (no position read, no row) work, as autograd's."""
    module = load_module(path)
    sizes = sizes_for(op)
    repeated = dict(sizes, v=2, j=5)
    inputs = make_inputs(op, repeated)
    assert inputs[-1].unique().numel() < inputs[-1].numel()
    check_gradients(op, module, inputs=inputs)
    gradcheck_op(op, module, sizes=repeated)
    for size in ("j", "n"):
        check_gradients(op, module, sizes=dict(sizes, **{size: 0}))
    check_gradients(op, module, sizes=dict.fromkeys(sizes, 1))
    check_gradients(op, module, sizes=dict.fromkeys(sizes, 3))     # equal sizes for different indices


# --- gathers ----------------------------------------------------------------------------------------

GATHERS = {
    # an index over x's other dim n with two of its own: torch.gather of the flattened index
    "several_own": (["x[n, v]", "idx[n, i, j]"], "y[n, i, j] = x[n, idx[n, i, j]]",
                    "torch.gather(x, 1, idx.flatten(1)).unflatten(1, idx.shape[1:])"),
    # along dim 0, the own dims on both sides of the shared one
    "own_apart": (["x[v, n]", "idx[i, n, j]"], "y[i, j, n] = x[idx[i, n, j], n]",
                  "x[idx, torch.arange(x.shape[1]).unsqueeze(-1)].permute(0, 2, 1)"),
    # three own dims, a shared dim after the gathered one, a dim of x the index lacks
    "lacking": (["x[a, v, n]", "idx[i, n, j, k]"], "y[a, i, j, k, n] = x[a, idx[i, n, j, k], n]",
                "x[torch.arange(x.shape[0]).reshape(-1, 1, 1, 1, 1), idx.permute(0, 2, 3, 1).unsqueeze(0), "
                "torch.arange(x.shape[2])]"),
    # batch dims of x that the index lacks, beside a named dim it has
    "batched_pick": (["x[..., n, v]", "idx[n]"], "y[..., n] = x[..., n, idx[n]]",
                     "torch.gather(x, -1, idx.unsqueeze(-1).expand(x.shape[:-1] + (1,))).squeeze(-1)"),
    # rows of a batched input selected by a 2-D index along its last dim
    "batched_select": (["x[..., v]", "idx[i, j]"], "y[..., i, j] = x[..., idx[i, j]]",
                       "x.index_select(-1, idx.flatten()).unflatten(-1, idx.shape)"),
}


def check_gather(tmp_path, name, styles=("contraction", "broadcast"), verify=True):
    """Repeats, sizes 0, 1 and equal against autograd of the reference, gradcheck; with `verify`, verify_op
    (float32, the Function's double backward, its custom op) too."""
    inputs, equation, reference = GATHERS[name]
    spec, op, modules = generate(tmp_path, _spec(name, inputs, equation, reference), styles)
    for style in styles:
        if verify:
            verify_op(spec, op.name, modules[style])
        _check_repeats_and_sizes(op, modules[style])
    return modules


def test_a_gather_by_an_index_with_several_dims_of_its_own(tmp_path):
    """x[n, idx[n, i, j]] was refused ("more than one of its own"): the own dims are flattened into
    torch.gather's one and unflattened after; the gradient scatter_adds the flattened upstream gradient."""
    modules = check_gather(tmp_path, "several_own", styles=("contraction",), verify=False)
    source = modules["contraction"].read_text()
    assert "return x.gather(1, idx.flatten(-2)).unflatten(1, idx.shape[1:])" in source
    assert "grad_x = torch.zeros_like(x).scatter_add(1, idx.flatten(-2), grad_y.flatten(-2))" in source
    assert "torch.nn.functional.one_hot" not in source


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GATHERS))
def test_gathers_of_every_form(tmp_path, name):
    check_gather(tmp_path, name)


def _broadcast_gather(x, idx):
    """torch.gather along the last dim after broadcasting the batch dims of x and idx."""
    batch = torch.broadcast_shapes(x.shape[:-1], idx.shape[:-1])
    return torch.gather(x.expand(batch + x.shape[-1:]), -1, idx.expand(batch + idx.shape[-1:]))


@pytest.mark.parametrize("style", ["contraction", pytest.param("broadcast", marks=pytest.mark.slow)])
def test_a_batched_gather_broadcasts_the_batch_dims_of_input_and_index(tmp_path, style):
    """x[..., idx[..., j]] with x's batch (3,) and idx's (1,) gave a (1, j) result (torch.gather reads a
    sub-block where the sizes differ): both are expanded to the shape they broadcast to, and the gradient is
    summed back to x's."""
    text = _spec("batched_gather", ["x[..., v]", "idx[..., j]"], "y[..., j] = x[..., idx[..., j]]")
    _, _, modules = generate(tmp_path, text, (style,))
    module = load_module(modules[style])
    for x_batch, idx_batch in [((3,), (1,)), ((1,), (3,)), ((), (2, 3)), ((2, 3), ()), ((0,), (1,))]:
        x = torch.randn(*x_batch, 4, dtype=torch.float64, requires_grad=True)
        idx = torch.randint(0, 2, idx_batch + (5,))     # fewer values than positions: repeats
        y = module.batched_gather(x, idx)
        want = _broadcast_gather(x, idx)
        assert y.shape == want.shape
        torch.testing.assert_close(y, want)
        grad = torch.randn_like(y)
        got, = torch.autograd.grad(y, x, grad)
        torch.testing.assert_close(got, torch.autograd.grad(want, x, grad)[0])
        if y.numel() and x.shape[0] == 1:
            assert torch.autograd.gradcheck(lambda x: module.batched_gather(x, idx), (x,))
            assert torch.autograd.gradgradcheck(lambda x: module.batched_gather(x, idx), (x,))


def test_an_index_outside_its_range_is_an_error_negative_ones_too():
    """Rows read by `table[idx]` took -1 for the last row while the gradient (embedding_dense_backward)
    dropped it; derive's indices are positions in [0, size), as torch.gather's and F.embedding's."""
    from conftest import generated_module
    embedding, gather = generated_module("embedding"), generated_module("gather")
    table = torch.randn(4, 3)
    for bad in (-1, 4):
        with pytest.raises((IndexError, RuntimeError)):
            torch.nn.functional.embedding(torch.tensor([0, bad]), table)
        with pytest.raises((IndexError, RuntimeError)):
            embedding.embedding(table, torch.tensor([0, bad]))
        with pytest.raises(RuntimeError, match="out of bounds"):
            gather.gather(table, torch.tensor([[0], [bad], [1], [2]]))


# --- affine reads under batch dims --------------------------------------------------------------------

def _channels(x):
    """x with its batch dims flattened into one and a channel dim of 1, as torch's pooling takes it."""
    return x.reshape(x.shape[:-1].numel(), 1, x.shape[-1])


WINDOWS = {
    # (inputs, equation, extra spec lines, reference, shapes of the inputs but the batch)
    "depthwise": (["x[..., l]", "w[k]"], "y[..., t] = sum(x[..., t + k] * w[k], k)", "",
               lambda x, w: (x.unfold(-1, w.shape[0], 1) * w).sum(-1), [(7,), (3,)]),
    "mean_pool": (["x[..., l]"], "y[..., t] = mean(x[..., 2*t + k], k)", "sizes = { k = 2 }",
                  lambda x: torch.nn.functional.avg_pool1d(_channels(x), 2).reshape(
                      x.shape[:-1] + (x.shape[-1] // 2,)), [(7,)]),
    "max_pool_first": (["x[..., l]"], 'y[..., t] = max(x[..., 2*t + k], k, tie=\\"first\\")', "sizes = { k = 2 }",
                       lambda x: torch.nn.functional.max_pool1d(_channels(x), 2).reshape(
                           x.shape[:-1] + (x.shape[-1] // 2,)), [(7,)]),
    "max_pool_dilated": (["x[..., l]"], "y[..., t] = max(x[..., 2*t + 2*k], k)", "sizes = { k = 2 }",
                         lambda x: x.unfold(-1, 3, 2)[..., ::2].amax(-1), [(8,)]),
    "conv2d_strided": (["x[..., h, l]", "w[p, q]"], "y[..., i, j] = sum(x[..., 2*i + p, j + q] * w[p, q], p, q)", "",
                       lambda x, w: (x.unfold(-2, 2, 2).unfold(-2, 2, 1) * w).sum((-1, -2)), [(5, 4), (2, 2)]),
    "flipped": (["x[..., l, c]", "w[k, c]"], "y[..., t, c] = sum(x[..., 6 - t - 2*k, c] * w[k, c], k)",
                "sizes = { t = 4 }", lambda x, w: (x[..., torch.tensor([[6 - t - 2 * k for k in range(2)] for t in range(4)]), :] * w).sum(-2),
                [(9, 2), (2, 2)]),
    "same_filter": (["x[..., l]", "w[k]"], "y[..., l] = sum(x[..., l + k - 1] * w[k], k)", "pad = { x = { l = 1 } }",
                    lambda x, w: (torch.nn.functional.pad(x, (1, 1)).unfold(-1, 3, 1) * w).sum(-1), [(6,), (3,)]),
}


def check_windows(tmp_path, name, styles=("contraction", "broadcast")):
    """The op against its reference with batch dims (), (3,), (2, 3) and (0, 2): forward, gradients of every
    input with exact shapes, float64 gradcheck and gradgradcheck; and verify_op on the spec as written."""
    inputs, equation, extra, reference, shapes = WINDOWS[name]
    spec, op, modules = generate(tmp_path, _spec(name, inputs, equation, extra=extra), styles)
    for style in styles:
        function = getattr(load_module(modules[style]), name)
        for batch in BATCHES:
            generator = torch.Generator().manual_seed(len(batch))
            values = [torch.randn(*(batch if "..." in i else ()), *shape, generator=generator, dtype=torch.float64)
                      for i, shape in zip(inputs, shapes)]
            if name.startswith("max"):
                values[0] = values[0].round()     # ties inside windows: the two conventions differ there
            values = [v.requires_grad_() for v in values]
            y, want = function(*values), reference(*values)
            assert y.shape == want.shape
            torch.testing.assert_close(y, want)
            grad = torch.randn_like(y)
            got = torch.autograd.grad(y, values, grad)
            for g, w, v in zip(got, torch.autograd.grad(want, values, grad), values):
                assert g.shape == v.shape
                torch.testing.assert_close(g, w)
            if y.numel() and not name.startswith("max"):
                assert torch.autograd.gradcheck(function, values)
                if len(batch) == 2:
                    assert torch.autograd.gradgradcheck(function, values)


@pytest.mark.parametrize("name, style", [("depthwise", "contraction"), ("mean_pool", "broadcast"),
                                         pytest.param("depthwise", "broadcast", marks=pytest.mark.slow),
                                         pytest.param("mean_pool", "contraction", marks=pytest.mark.slow)])
def test_affine_reads_under_any_batch_dims(tmp_path, name, style):
    """`y[..., t] = sum(x[..., t + k] * w[k], k)` and `mean(x[..., 2*t + k], k)` were refused ("affine
    subscripts need its dims named"): the windows are cut along named dims counted from the end, so any
    number of batch dims works, in both styles."""
    check_windows(tmp_path, name, styles=(style,))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in WINDOWS if n not in ("depthwise", "mean_pool")])
def test_windows_of_every_kind_under_batch_dims(tmp_path, name):
    check_windows(tmp_path, name)


REFERENCES = {
    "depthwise": "(x.unfold(-1, w.shape[0], 1) * w).sum(-1)",
    "mean_pool": "x.unfold(-1, 2, 2).mean(-1)",
    "max_pool_first": "x.unfold(-1, 2, 2).max(-1)[0]",
    "max_pool_dilated": "x.unfold(-1, 3, 2).unfold(-1, 1, 2).squeeze(-1).amax(-1)",
    "conv2d_strided": "(x.unfold(-2, w.shape[0], 2).unfold(-2, w.shape[1], 1) * w).sum((-1, -2))",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCES))
def test_windows_under_batch_dims_pass_verify_op(tmp_path, name):
    inputs, equation, extra, _, _ = WINDOWS[name]
    spec, op, modules = generate(tmp_path, _spec(name, inputs, equation, REFERENCES[name], extra=extra))
    for path in modules.values():
        verify_op(spec, op.name, path)


BATCHED_PRODUCTS = {
    # (inputs, equation, reference, x's named shape, the index's shape)
    "summed_select": (["x[..., n, v]", "idx[j]"], "y[..., n] = sum(x[..., n, idx[j]], j)",
                      lambda x, idx: x.index_select(-1, idx).sum(-1), (2, 4), (5,)),
    "select_times": (["x[..., v]", "idx[j]", "z[..., j]"], "y[..., j] = x[..., idx[j]] * z[..., j]",
                     lambda x, idx, z: x.index_select(-1, idx) * z, (4,), (5,)),
    "pick_times": (["x[..., n, v]", "idx[n]", "z[..., n]"], "y[..., n] = x[..., n, idx[n]] * z[..., n]",
                   lambda x, idx, z: torch.gather(x, -1, idx.unsqueeze(-1).expand(x.shape[:-1] + (1,))).squeeze(-1) * z,
                   (2, 4), (2,)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BATCHED_PRODUCTS))
def test_a_gathers_gradient_takes_the_batch_shape_every_input_broadcasts_to(tmp_path, name):
    """x's batch dims fewer than another input's: the gradient is added up at the broadcast batch shape (the
    zeros of x's alone were too small for scatter_add / index_add), then summed back to x's; in both styles."""
    inputs, equation, reference, x_shape, index_shape = BATCHED_PRODUCTS[name]
    _, _, modules = generate(tmp_path, _spec(name, inputs, equation))
    for path in modules.values():
        function = getattr(load_module(path), name)
        for x_batch, z_batch in [((1,), (3,)), ((3,), (1,)), ((2, 3), (3,)), ((), (2,)), ((0,), (1,))]:
            x = torch.randn(*x_batch, *x_shape, dtype=torch.float64, requires_grad=True)
            idx = torch.randint(0, x_shape[-1], index_shape)
            values = [x] + ([torch.randn(*z_batch, index_shape[0], dtype=torch.float64, requires_grad=True)]
                            if len(inputs) == 3 else [])
            y, want = function(x, idx, *values[1:]), reference(x, idx, *values[1:])
            torch.testing.assert_close(y, want)
            grad = torch.randn_like(y)
            for got, expected, value in zip(torch.autograd.grad(y, values, grad),
                                            torch.autograd.grad(want, values, grad), values):
                assert got.shape == value.shape
                torch.testing.assert_close(got, expected)
