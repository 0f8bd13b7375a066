"""The fused style: the contraction code run through torch.compile gives the contraction style's results, a new
batch size reuses the kernels, and without a C++ compiler the first call says so. Compiles take seconds each:
every test that compiles is slow (CI runs them with `-m slow`)."""

import pytest
import torch
from torch._dynamo.utils import counters

from derive import naming
from derive.optional import absent_sets
from derive.testing import make_inputs

from conftest import CATALOG, OPS, generated_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # Inductor's own notes on dynamic shapes


def forward_and_gradients(op, module, inputs):
    """The op's result and every differentiable input's gradient, through the module's public function."""
    leaves = [t.detach().requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    output = getattr(module, op.name)(*leaves)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    return [output.detach(), *torch.autograd.grad(output, wanted, grad_output)]


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("op_name", OPS)
def test_fused_matches_the_contraction_style(op_name):
    """Result and gradients of the fused module equal the contraction module's (float64, two batch sizes), and
    they come from compiled kernels: Dynamo compiled graphs for them."""
    op = CATALOG.op(op_name)
    fused, contraction = generated_module(op_name, "fused"), generated_module(op_name)
    before = compiled_graphs()
    for sizes in ({}, {naming.BATCH: 5}):
        inputs = make_inputs(op, sizes, torch.float64)
        for got, want in zip(forward_and_gradients(op, fused, inputs), forward_and_gradients(op, contraction, inputs)):
            torch.testing.assert_close(got, want)
    assert compiled_graphs() > before, f"{op_name}: the fused module ran without compiling"


@pytest.mark.slow
@pytest.mark.parametrize("op_name", ["layer_norm", "cross_entropy", "linear", "embedding"])
def test_a_new_batch_size_compiles_nothing(op_name):
    """After the first call, calls that change only the batch (OpSpec.batch_index: the `...` dims, or the
    result's first index) reuse the compiled forward and backward: no graph is compiled again."""
    op = CATALOG.op(op_name)
    module = generated_module(op_name, "fused")
    batch = naming.BATCH if op.batch_index == naming.BATCH else op.size_of(op.batch_index)
    forward_and_gradients(op, module, make_inputs(op, {batch: 6}, torch.float32))
    graphs, frames = compiled_graphs(), counters["frames"]["ok"]
    for size in (9, 17, 40):
        forward_and_gradients(op, module, make_inputs(op, {batch: size}, torch.float32, seed=size))
    assert (compiled_graphs(), counters["frames"]["ok"]) == (graphs, frames)


def test_without_a_cpp_compiler_the_first_call_says_so(monkeypatch):
    """No silent slowdown: on CPU, a fused function whose kernels cannot be built raises a one-line error that
    names the function and what to do, before torch.compile tries."""
    import torch._inductor.config
    module = generated_module("relu", "fused")
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("derive-test-no-such-compiler",))
    forward = module._fused(module.relu_forward.__wrapped__)     # a fresh wrapper: nothing compiled yet
    with pytest.raises(RuntimeError, match=r"relu_forward \(derive's fused style\).*C\+\+ compiler.*contraction"):
        forward(torch.randn(3))


def test_the_fused_module_prints_the_contraction_code():
    """The fused module is the contraction module's formula, decorated: the same forward, backward and jvp text."""
    for op_name in ("layer_norm", "linear"):
        fused = (generated_module(op_name, "fused").__file__, generated_module(op_name).__file__)
        fused_text, contraction_text = (open(path).read() for path in fused)
        body = contraction_text.split(f"\ndef {naming.forward(op_name)}(")[1].split("\nclass ")[0]
        assert body in fused_text.replace("@_fused\n", "")
        # the forward, the backward and the forward that saves values, of the op and of each variant without
        # its optional inputs (linear's and layer_norm's bias)
        assert fused_text.count("@_fused\n") == (2 + ("_forward_saving(" in body)) * (1 + len(absent_sets(CATALOG.op(op_name))))


# --- derive bench --composite --------------------------------------------------------------------------------

@pytest.mark.slow
def test_composite_sizes_and_native_kernels_name_the_specs_ops_and_indices():
    from derive import composite
    from derive.spec import load_catalog
    ops = {op.name: op for op in load_catalog(composite.SPEC).ops}
    assert len(ops) >= 8 and set(composite.SIZES) == set(ops) and set(composite.NATIVE) <= set(ops)
    for name, sizes in composite.SIZES.items():
        assert set(sizes) == set(dict(ops[name].index_sizes).values()), name


def test_saved_bytes_counts_each_saved_storage_once():
    from derive.composite import saved_bytes
    a, b = (torch.randn(1000, requires_grad=True) for _ in range(2))
    assert saved_bytes(lambda x: torch.exp(x), [a]) == 4000            # exp saves its result
    assert saved_bytes(lambda x: x * x, [a]) == 4000                   # both operands are x: one storage
    assert saved_bytes(lambda x, y: x * y, [a, b]) == 8000
    assert saved_bytes(lambda x, y: x + y, [a, b]) == 0


@pytest.mark.slow
def test_quick_composite_bench_checks_and_reports_every_op():
    """Every contender's gradients match torch eager's (run_composite verifies before timing), and the table
    has a row per op with the native column where torch has a kernel."""
    from derive import composite
    rows = composite.run_composite(quick=True, rounds=1)
    assert [row.op for row in rows] == sorted(composite.SIZES)     # the catalog's order
    for row in rows:
        expected = {composite.EAGER, composite.COMPILED, composite.COMPILED_DYNAMIC, composite.DERIVE,
                    composite.FUSED} \
            | ({composite.NATIVE_KERNEL} if row.op in composite.NATIVE else set())
        assert set(row.seconds) == set(row.saved) == expected
        assert all(value > 0 for value in row.seconds.values()) and row.saved[composite.EAGER] > 0
    text = composite.format_composite(rows)
    assert all(row.op in text for row in rows) and "fused/compiled" in text and "fused/dynamic" in text
