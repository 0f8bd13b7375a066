"""Pooling and lookups lowered to what torch's own backward does (issue 13's bench targets).

- A max (min) with tie="first" over windows, max(x[n, c, s*t + k], k, tie="first"): the forward hands the
  backward each window's first extremal position in x (`saved_argmax`, max_pool1d's indices), and the gradient
  is one scatter_add_ at them into zeros as long as x; the backward never cuts and reduces the windows again.
- A mean over windows, mean(x[n, c, s*t + k], k): its gradient spreads g with aten.unfold_backward of a stride-0
  view, and holds nothing larger than autograd's F.avg_pool1d backward does.
- Rows of a 2-D table picked by an index of any dims: aten.embedding_dense_backward adds them up.

Each spec is invented here (other strides and sizes than the catalog's), checked on inputs with exact ties in
windows, sizes 1 and every size equal; the whole sweep with verify_op in both styles under -m slow.
"""

import inspect

import pytest
import torch

from derive import naming
from derive.bench import peak_bytes
from derive.testing import check_gradients, kink_inputs, make_inputs, verify_op

from conftest import written_specs


def pool(function: str, size: int, stride: int) -> str:
    """max or min over windows of `size` every `stride`, tie="first", beside its torch reference."""
    sign = "" if function == "max" else "-"
    reference = f"{sign}torch.nn.functional.max_pool1d({sign}x, {size}, {stride})"
    return (f'inputs = ["x[n, c, l]"]\nsizes = {{ k = {size} }}\n'
            f'equation = "y[n, c, t] = {function}(x[n, c, {stride}*t + k], k, tie=\\"first\\")"\n'
            f'reference = "{reference}"\n')


def mean_pool(size: int, stride: int) -> str:
    return (f'inputs = ["x[n, c, l]"]\nsizes = {{ k = {size} }}\n'
            f'equation = "y[n, c, t] = mean(x[n, c, {stride}*t + k], k)"\n'
            f'reference = "torch.nn.functional.avg_pool1d(x, {size}, {stride})"\n')


EMBEDDING_3D = ('inputs = ["table[v, d]", "idx[a, b, e]"]\ninteger = ["idx"]\n'
                'equation = "y[a, b, e, d] = table[idx[a, b, e], d]"\n'
                'reference = "torch.nn.functional.embedding(idx, table)"\n')

POOLS = {"min_pool_k3_s1": pool("min", 3, 1),     # overlapping windows
         "max_pool_k2_s3": pool("max", 2, 3)}     # gaps between windows
SLOW_POOLS = {f"{function}_pool_k{size}_s{stride}": pool(function, size, stride)
              for function in ("max", "min") for size in (1, 2, 3) for stride in (1, 2, 3)}
MEANS = {"mean_pool_k3_s2": mean_pool(3, 2)}
SLOW_MEANS = {f"mean_pool_k{size}_s{stride}": mean_pool(size, stride) for size in (1, 2, 3) for stride in (1, 2, 3)}
SPECS = POOLS | SLOW_POOLS | MEANS | SLOW_MEANS | {"embedding_3d": EMBEDDING_3D}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name, style) -> (op, module, path), each spec derived and written once."""
    return written_specs(tmp_path_factory.mktemp("pool"), SPECS, "pool")


def window(op) -> tuple[int, int]:
    """(size, stride) of a pool spec."""
    subscript, k = op.rhs.args[0].indices[2], op.rhs.args[1]
    (t,) = subscript.atoms(type(k)) - {k}
    return dict(op.fixed_sizes)["k"], int(subscript.coeff(t))


def tied(op, sizes, seed=0):
    """Inputs with exact ties inside windows (kink_inputs puts them on the extremum)."""
    (x,), _ = kink_inputs(op, make_inputs(op, sizes, dtype=torch.float64, seed=seed),
                          generator=torch.Generator().manual_seed(seed))
    return x


@pytest.mark.parametrize("name", ["min_pool_k3_s1", pytest.param("max_pool_k2_s3", marks=pytest.mark.slow)])
def test_a_pool_hands_its_first_positions_to_the_backward(generated, name):
    op, module, _ = generated(name)
    size, stride = window(op)
    backward = getattr(module, naming.backward(op.name))
    source = inspect.getsource(backward)
    assert "argmax(" not in source and "argmin(" not in source and "pad(" not in source
    for sizes in ({"n": 2, "c": 3, "l": 11}, {"n": 1, "c": 1, "l": size}):
        x = tied(op, sizes)
        y, saved = getattr(module, naming.forward_saving(op.name))(x)
        largest = op.rhs.largest
        _, indices = torch.nn.functional.max_pool1d(x if largest else -x, size, stride, return_indices=True)
        # torch's index of each window's first extremum, a position of x
        torch.testing.assert_close(saved, indices, rtol=0, atol=0)
        check_gradients(op, module, inputs=[x])


@pytest.mark.parametrize("name", MEANS)
def test_a_mean_over_windows_adds_back_without_a_larger_tensor(generated, name):
    op, module, _ = generated(name)
    size, stride = 3, 2
    backward = getattr(module, naming.backward(op.name))
    assert "unfold_backward" in inspect.getsource(backward)
    for sizes in ({"n": 2, "c": 3, "l": 10}, {"n": 3, "c": 3, "l": 3}):
        check_gradients(op, module, sizes=sizes)
    # a length the windows do not cover to its end (l = 2*t + 2): the rest of the gradient is 0
    x = torch.randn(16, 8, 201, requires_grad=True)
    y = torch.nn.functional.avg_pool1d(x, size, stride)
    grad_y = torch.randn_like(y)
    ours = peak_bytes(lambda: backward(grad_y, x.detach()))
    theirs = peak_bytes(lambda: torch.autograd.grad(y, x, grad_y, retain_graph=True))
    assert ours <= 1.05 * theirs, (ours, theirs)     # a transposed convolution by ones took 2x


def test_rows_picked_by_an_index_of_three_dims_add_up_with_embedding_backward(generated):
    op, module, _ = generated("embedding_3d")
    assert "embedding_dense_backward" in inspect.getsource(getattr(module, naming.backward(op.name)))
    # one row only (every index repeats it), every size equal, and an empty index
    for sizes in ({"v": 5, "d": 3, "a": 2, "b": 3, "e": 4}, {"v": 1, "d": 2, "a": 2, "b": 2, "e": 3},
                  {"v": 3, "d": 3, "a": 3, "b": 3, "e": 3}, {"v": 4, "d": 2, "a": 2, "b": 0, "e": 3}):
        check_gradients(op, module, sizes=sizes)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("name", list(POOLS | SLOW_POOLS | MEANS | SLOW_MEANS) + ["embedding_3d"])
def test_verify_op_in_both_styles(generated, name, style, tmp_path):
    op, module, path = generated(name, style)
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f"[ops.{name}]\n{SPECS[name]}")
    verify_op(spec, name, path)
    if name in POOLS | SLOW_POOLS:
        for seed in range(3):
            check_gradients(op, module, inputs=[tied(op, {"n": 2, "c": 2, "l": 9}, seed=seed)])
