"""The fused style compiles the op's batch dims as symbols and every other size as a constant: OpSpec.batch_index
names the batch (the `...` dims, else the result's first index, else the first input's first index), and each
fused module's _BATCH_DIMS table lists the dims of every tensor argument that carry it."""


import pytest
import torch
from torch._dynamo.utils import counters

from derive.build import render_catalog
from derive import naming
from derive.naming import BATCH
from derive.spec import parse_catalog
from derive.testing import load_module, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # Inductor's own notes on dynamic shapes

# Invented ops: the batch as `...`; as a named index that the first input does not carry (the weight comes
# first); as the first input's first index under a scalar result; equal sizes for different indices are made
# by the tests' shapes.
SPECS = """
[ops.scaled]
inputs = ["x[..., d]", "w[d]"]
equation = "y[..., d] = x[..., d] * w[d]"

[ops.project]
inputs = ["w[k, m]", "x[n, k]"]
equation = "y[n, m] = tanh(sum(x[n, k] * w[k, m], k))"

[ops.score]
inputs = ["p[n, c]", "t[n, c]"]
equation = "loss = sum(p[n, c] * t[n, c], n, c)"
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused_batch")
    catalog = parse_catalog(SPECS, str(folder / "batch.toml"))
    files = render_catalog(catalog, ("fused",), namespace=f"fused_batch_{folder.name}".replace("-", "_"))
    modules = {}
    for op in catalog.ops:
        path = folder / f"{op.name}.py"
        path.write_text(files[f"fused/{op.name}.py"])
        modules[op.name] = (op, load_module(path))
    return modules


def test_the_batch_is_the_dots_else_the_results_first_index_else_the_first_inputs(modules):
    assert {name: op.batch_index for name, (op, _) in modules.items()} == \
        {"scaled": BATCH, "project": "n", "score": "n"}
    # the dims each table selects, on tensors of the declared ranks (two batch dims for `...`)
    dims = {name: {arg: tuple(range(rank)[module._BATCH_DIMS[arg]]) for arg, rank in ranks.items()}
            for name, ranks in {"scaled": {"x": 3, "grad_y": 3}, "project": {"x": 2, "grad_y": 2},
                                "score": {"p": 2, "t": 2}}.items()
            for module in [modules[name][1]]}
    assert dims == {"scaled": {"x": (0, 1), "grad_y": (0, 1)}, "project": {"x": (0,), "grad_y": (0,)},
                    "score": {"p": (0,), "t": (0,)}}
    # weights carry no batch
    assert set(modules["scaled"][1]._BATCH_DIMS) == {"x", "grad_y"}
    assert set(modules["project"][1]._BATCH_DIMS) == {"x", "grad_y", "y"}     # y: tanh's gradient reads it


def step(op, module, sizes, seed=0):
    """The result and gradients from the fused op, checked against autograd of its eager formula."""
    leaves = [t.requires_grad_() for t in make_inputs(op, sizes, torch.float32, seed=seed)]
    output = getattr(module, op.name)(*leaves)
    got = [output, *torch.autograd.grad(output, leaves, torch.ones_like(output))]
    formula = getattr(module, naming.forward(op.name)).__wrapped__(*leaves)
    want = [formula, *torch.autograd.grad(formula, leaves, torch.ones_like(formula))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    return got


def compiled() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


@pytest.mark.slow
def test_only_the_batch_is_dynamic(modules):
    """A new batch size (the named batch n, equal to k on the first call) reuses the compiled forward and
    backward; a new size of any other index compiles them again, for that size."""
    op, module = modules["project"]
    n, k, m = op.size_of("n"), op.size_of("k"), op.size_of("m")
    step(op, module, {n: 4, k: 4, m: 3})
    before = compiled()
    for size in (9, 17):
        step(op, module, {n: size, k: 4, m: 3}, seed=size)
    assert compiled() == before
    step(op, module, {n: 9, k: 5, m: 3})
    assert compiled()[0] > before[0]


@pytest.mark.slow
def test_a_first_batch_of_1_compiles_once_more_then_never(modules):
    """torch specializes a size of 1: after a first call with batch 1, the next batch size compiles once more
    (the batch symbolic from then on, torch's automatic dynamic shapes), and later ones nothing, also one equal
    to d's."""
    op, module = modules["scaled"]
    d = op.size_of("d")
    step(op, module, {BATCH: 1, d: 3})
    first = compiled()
    step(op, module, {BATCH: 9, d: 3})
    second = compiled()
    assert second[0] > first[0]
    for size in (17, 3):
        step(op, module, {BATCH: size, d: 3}, seed=size)
    assert compiled() == second
