"""The fused style saves what its compiled backward would recompute at more than one transcendental function
(saving.save_function_values): the forward returns the chain, the backward reads it, and the gradients stay
those of the contraction style, which recomputes it. Compiling takes seconds: the compiled check is slow."""

import inspect
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from derive.build import render_catalog
from derive.spec import parse_catalog
from derive.testing import load_module, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # Inductor's own notes on dynamic shapes

# Invented ops: a chain of two functions read again by the gradient (mish); a chain over the weight's dims
# only, beside a one-function factor of the input (saved over d, the sigmoid recomputed); one function alone
# (nothing saved: cheaper recomputed); a chain that is the whole result (read from the output instead); two
# chains of the same function at different arguments (two values, numbered); a chain inside a reduction's
# body, whose gradient reads it at the input's indices; the `saving` key: "save" saves one function too,
# "recompute" nothing; a chain over a broadcast bias (an optional input), and one over a transposed read: saved
# in the layout of its widest read, where the forward computes it.
SPECS = """
[ops.mish_like]
inputs = ["x[...]"]
equation = "y[...] = x[...] * tanh(softplus(x[...]))"

[ops.gated_weight]
inputs = ["x[n, d]", "w[d]"]
equation = "y[n, d] = sigmoid(x[n, d]) * exp(sin(w[d]))"

[ops.one_function]
inputs = ["a[...]", "b[...]"]
equation = "y[...] = a[...] * erf(a[...]) * b[...]"

[ops.whole_chain]
inputs = ["x[...]"]
equation = "y[...] = tanh(exp(x[...]))"

[ops.two_chains]
inputs = ["a[n, d]", "b[n, d]"]
equation = "y[n, d] = a[n, d] * tanh(exp(a[n, d])) + b[n, d] * tanh(exp(2 * b[n, d]))"

[ops.one_function_saved]
inputs = ["a[...]", "b[...]"]
saving = "save"
equation = "y[...] = a[...] * erf(a[...]) * b[...]"

[ops.chain_recomputed]
inputs = ["x[...]"]
saving = "recompute"
equation = "y[...] = x[...] * tanh(softplus(x[...]))"

[ops.chain_with_bias]
inputs = ["x[n, d]", "b[d]"]
optional = { b = 0 }
equation = "y[n, d] = (x[n, d] + b[d]) * tanh(softplus(x[n, d] + b[d]))"

[ops.chain_transposed]
inputs = ["x[n, d]", "z[d, n]"]
equation = "y[n, d] = x[n, d] * tanh(exp(x[n, d] * z[d, n]))"

[ops.summed_chain]
inputs = ["x[n, d]"]
equation = "loss[n] = sum(x[n, d] * log(1 + exp(cos(x[n, d]))), d)"
"""

SAVED = {"mish_like": ["saved_tanh"], "gated_weight": ["saved_exp"], "one_function": [], "whole_chain": [],
         "two_chains": ["saved_tanh_0", "saved_tanh_1"], "summed_chain": ["saved_softplus"],
         "one_function_saved": ["saved_erf"], "chain_recomputed": [],
         "chain_with_bias": ["saved_tanh"], "chain_transposed": ["saved_tanh"]}


# Rendered by default (each op's derivation costs about a second of CPU); the rest under -m slow.
DEFAULT = ("mish_like", "one_function")


@pytest.fixture(scope="module", params=[DEFAULT, pytest.param(tuple(sorted(set(SAVED) - set(DEFAULT))),
                                                              marks=pytest.mark.slow)], ids=["default", "more"])
def modules(request, tmp_path_factory):
    """op name -> (op, contraction module, fused module)."""
    folder = tmp_path_factory.mktemp("fusedperf")
    catalog = parse_catalog(SPECS, str(folder / "fusedperf.toml"))
    catalog = replace(catalog, ops=tuple(op for op in catalog.ops if op.name in request.param))
    files = render_catalog(catalog, ("contraction", "fused"),
                           namespace=f"fusedperf_{folder.name}".replace("-", "_"))
    made = {}
    for op in catalog.ops:
        for path in (f"{op.name}.py", f"fused/{op.name}.py"):
            (folder / path).parent.mkdir(exist_ok=True)
            (folder / path).write_text(files[path])
        made[op.name] = (op, load_module(folder / f"{op.name}.py"), load_module(folder / f"fused/{op.name}.py"))
    return made


def saved_values(module, op) -> list[str]:
    """The names of the values the module's forward returns beside the result (forward_saving's)."""
    saving = getattr(module, f"{op.name}_forward_saving", None)
    if saving is None:
        return []
    source = saving.__wrapped__ if hasattr(saving, "__wrapped__") else saving
    returned = inspect.getsource(source).rsplit("return ", 1)[1]
    return [name.strip() for name in returned.split(",")[1:]]


def test_the_fused_style_saves_chains_of_functions_and_the_contraction_style_recomputes_them(modules):
    assert {name: saved_values(fused, op) for name, (op, _, fused) in modules.items()} == \
        {name: SAVED[name] for name in modules}
    assert {name: saved_values(contraction, op) for name, (op, contraction, _) in modules.items()} == \
        {name: [] for name in modules}


@pytest.mark.parametrize("sizes", [{}, {"n": 3, "d": 3, "...": 1}, {"n": 0, "d": 2, "...": 0}])
def test_the_fused_formulas_give_the_contraction_styles_gradients(modules, sizes):
    """The fused module's forward and backward as written (`__wrapped__`: nothing compiles), in float64, with
    equal sizes, size 1 and 0, and on x = 0 (softplus's and tanh's midpoint): the result and every gradient,
    computed from the saved values, equal the contraction style's, which recomputes them."""
    for name, (op, contraction, fused) in modules.items():
        inputs = make_inputs(op, sizes, torch.float64)
        inputs = [torch.where(torch.arange(t.numel()).view(t.shape) % 3 == 0, 0.0, t) for t in inputs]
        want, vjp = torch.func.vjp(getattr(contraction, name), *inputs)
        grad_output = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        saving = getattr(fused, f"{name}_forward_saving", getattr(fused, f"{name}_forward")).__wrapped__
        got, *saved = saving(*inputs) if saved_values(fused, op) else (saving(*inputs),)
        torch.testing.assert_close(got, want)
        backward = getattr(fused, f"{name}_backward").__wrapped__
        known = {f"grad_{op.output}": grad_output, op.output: want, **{t.name: v for t, v in zip(op.inputs, inputs)},
                 **dict(zip(saved_values(fused, op), saved))}
        arguments = [known[p] for p in inspect.signature(backward).parameters if p != "needs_input_grad"]
        for g, w in zip(backward(*arguments), vjp(grad_output), strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w)


@pytest.mark.slow
def test_compiled_the_saved_chain_gives_the_contraction_styles_gradients_and_a_new_batch_compiles_nothing(modules):
    if "mish_like" not in modules:
        pytest.skip("compiled once, for mish_like")
    op, contraction, fused = modules["mish_like"]

    def step(module, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        output = getattr(module, op.name)(*leaves)
        return [output.detach(), *torch.autograd.grad(output, leaves, torch.ones_like(output))]

    for got, want in zip(step(fused, make_inputs(op, {"...": 7}, torch.float64)),
                         step(contraction, make_inputs(op, {"...": 7}, torch.float64))):
        torch.testing.assert_close(got, want)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for size in (9, 30):
        step(fused, make_inputs(op, {"...": size}, torch.float64, seed=size))
    assert counters["stats"]["unique_graphs"] == graphs


def test_derive_testing_finds_the_fused_styles_backward_arguments(modules):
    """verify_op hands `<op>_backward` what `<op>_forward_saving` returns, by the signature that saves as many
    values: the fused style's own (a saved chain) is one of them, as the other styles' are."""
    from types import SimpleNamespace

    from derive.testing import backward_arguments

    name, (op, _, fused) = next((n, m) for n, m in modules.items() if saved_values(m[2], m[0]))
    uncompiled = SimpleNamespace(**{f"{name}_forward_saving": getattr(fused, f"{name}_forward_saving").__wrapped__,
                                    f"{name}_forward": getattr(fused, f"{name}_forward").__wrapped__})
    inputs = make_inputs(op, {}, torch.float64)
    arguments = backward_arguments(op, uncompiled, inputs)
    parameters = [p for p in inspect.signature(getattr(fused, f"{name}_backward").__wrapped__).parameters
                  if p != "needs_input_grad"]
    assert len(arguments) == len(parameters) - 1     # all but grad_<out>
