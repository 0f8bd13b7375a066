"""Test helpers: verify generated backward code against torch.autograd.

Call these from your own pytest with your own spec, so you need not copy derive's
tests::

    from derive.testing import verify_op
    def test_my_ops():
        verify_op("my_ops.toml", "softsign", "my_project/grads/softsign.py")
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import sympy
import torch

from . import naming
from .model import OpSpec
from .naming import BATCH
from .spec import load_catalog

# Distinct sizes per index, so that a transposed or unreduced gradient cannot pass by accident.
DEFAULT_SIZES = (3, 4, 5, 6, 7, 2)


def load_module(path: str | Path) -> ModuleType:
    """Import a generated module from its file path."""
    path = Path(path).resolve()
    # One module per file: importing twice would register its custom op twice.
    name = f"derive_generated_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference(op: OpSpec):
    """The op's torch reference expression as a function of its inputs (params as keywords).

    The expression was checked against a whitelist when the spec was parsed; it is
    compiled here without builtins.
    """
    code = compile(ast.parse(op.reference, mode="eval"), f"<reference of {op.name}>", "eval")
    names = [t.name for t in op.inputs]
    defaults = {p.name: p.default for p in op.params}

    def function(*tensors, **params):
        scope = {"torch": torch, **defaults, **params, **dict(zip(names, tensors))}
        # The expression can name nothing but inputs, params and torch; `__import__` is there only
        # for torch's own C code, which imports through the calling frame's builtins.
        return eval(code, {"__builtins__": {"__import__": __import__}}, scope)  # noqa: S307

    return function


def sizes_for(op: OpSpec, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """A concrete length for every size an op's indices range over."""
    representatives = sorted(set(dict(op.index_sizes).values()))
    chosen = dict(zip(representatives, DEFAULT_SIZES * (1 + len(representatives) // len(DEFAULT_SIZES))))
    chosen.update(sizes or {})
    return chosen


def make_inputs(op: OpSpec, sizes: dict[str, int] | None = None, dtype=torch.float64, seed: int = 0,
                kinks: bool = False, requires_grad: bool = False,
                batch_shapes: dict[str, tuple[int, ...]] | None = None) -> list[torch.Tensor]:
    """Random inputs; with `kinks`, a third of the entries are exactly 0 (where step functions jump).

    `batch_shapes` gives the dims `...` stands for in each input (default: one dim of
    the size chosen for `...`); they may differ as long as they broadcast.
    """
    sizes = sizes_for(op, sizes)
    index_sizes = dict(op.index_sizes)
    ranges = {name: (low, high) for name, low, high in op.ranges}
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for tensor in op.inputs:
        shape = ()
        for index in tensor.indices:
            if index == BATCH:
                shape += (batch_shapes or {}).get(tensor.name, (sizes[BATCH],))
            else:
                shape += (sizes[index_sizes[index]],)
        if tensor.integer:
            tensors.append(torch.randint(0, sizes[tensor.value_range], shape, generator=generator))
            continue
        value = torch.randn(shape, generator=generator, dtype=torch.float64)
        if tensor.name in ranges:
            low, high = ranges[tensor.name]
            value = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
        if kinks:
            value = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 1 / 3, 0.0, value)
        tensors.append(value.to(dtype).requires_grad_(requires_grad))
    return tensors


def uses_output(op: OpSpec) -> bool:
    from .derivation import derive
    return derive(op).uses_output


def call_backward(op: OpSpec, module: ModuleType, grad_output, inputs, output=None, **keywords):
    """`<op>_backward(grad_output, *inputs[, output][, *saved])`: see `backward_arguments`."""
    params = {p.name: keywords[p.name] for p in op.params if p.name in keywords}
    arguments = backward_arguments(op, module, inputs, output, **params)
    return getattr(module, naming.backward(op.name))(grad_output, *arguments, **keywords)


def backward_arguments(op: OpSpec, module: ModuleType, inputs, output=None, **params) -> tuple:
    """What `<op>_backward` takes after grad_output: the inputs, the forward's result when the backward
    reuses it, and the values `<op>_forward_saving` hands over when the module has one."""
    saving = getattr(module, naming.forward_saving(op.name), None)
    saved = ()
    if saving is not None:
        output_again, *saved = saving(*inputs, **params)
        output = output_again if output is None else output
    if uses_output(op):
        if output is None:
            output = getattr(module, naming.forward(op.name))(*inputs, **params)
        return (*inputs, output, *saved)
    return (*inputs, *saved)


def autograd_gradients(function, inputs, grad_output, differentiable):
    """Gradients of `function` by torch.autograd, for the inputs flagged differentiable (None elsewhere)."""
    leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, differentiable)]
    output = function(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(output, wanted, grad_output))
    return [next(grads) if flag else None for flag in differentiable]


def check_gradients(op: OpSpec, module: ModuleType, dtype=torch.float64, sizes=None, seed: int = 0,
                    kinks: bool = False, inputs: list[torch.Tensor] | None = None, equal_nan: bool = False,
                    params: dict[str, float] | None = None) -> None:
    """The generated backward equals autograd of the torch reference, with exactly each input's shape.

    `inputs` overrides the random ones; `equal_nan` accepts NaN where the reference has NaN too;
    `params` sets hyperparameters (default: their defaults).
    """
    params = params or {}
    forward = getattr(module, naming.forward(op.name))
    if inputs is None:
        inputs = make_inputs(op, sizes, dtype, seed, kinks)
    expected_output = reference(op)(*inputs, **params)
    output = forward(*inputs, **params)
    torch.testing.assert_close(output, expected_output, equal_nan=equal_nan,
                               msg=lambda m: f"{op.name}: forward against the reference {op.reference!r}: {m}")
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed + 1),
                              dtype=torch.float64).to(dtype)
    differentiable = [t.differentiable for t in op.inputs]
    expected = autograd_gradients(lambda *xs: reference(op)(*xs, **params), inputs, grad_output, differentiable)
    actual = call_backward(op, module, grad_output, inputs, output, **params)
    assert len(actual) == len(op.inputs), f"{op.name}: backward returned {len(actual)} values for {len(op.inputs)} inputs"
    for tensor, flag, got, want in zip(op.inputs, differentiable, actual, expected):
        if not flag:
            assert got is None, f"{op.name}: gradient of non-differentiable {tensor.name} should be None"
            continue
        assert got.shape == want.shape, f"{op.name}: grad_{tensor.name} has shape {tuple(got.shape)}, " \
                                        f"expected {tuple(want.shape)}"
        assert got.dtype == dtype, f"{op.name}: grad_{tensor.name} is {got.dtype}, expected {dtype}"
        torch.testing.assert_close(got, want, equal_nan=equal_nan, msg=lambda m: f"{op.name}: grad_{tensor.name}: {m}")


# --- forward mode ---------------------------------------------------------------------------------

def jvp_arguments(op: OpSpec, module: ModuleType, inputs, tangents, **params) -> dict:
    """Keyword arguments of `<op>_jvp`: the inputs, the forward's result when the tangent reuses it,
    and one tangent per differentiable input (`tangents` has one entry per input; None for none)."""
    function = getattr(module, naming.jvp(op.name))
    arguments = {t.name: value for t, value in zip(op.inputs, inputs)}
    arguments |= {naming.tangent(t.name): value for t, value in zip(op.inputs, tangents) if t.differentiable}
    if op.output in inspect.signature(function).parameters:
        arguments[op.output] = getattr(module, naming.forward(op.name))(*inputs, **params)
    return arguments | params


def check_tangents(op: OpSpec, module: ModuleType, dtype=torch.float64, sizes=None, seed: int = 0,
                   kinks: bool = False, inputs: list[torch.Tensor] | None = None, equal_nan: bool = False,
                   params: dict[str, float] | None = None) -> None:
    """Forward mode: torch.func.jvp through `<op>()` (its Function's generated jvp) equals torch.func.jvp of
    the torch reference (when the op has one) and of the generated forward, for random tangents on every
    differentiable input (with `kinks`, against the reference alone: it sets the convention there;
    `equal_nan` accepts NaN where the oracle has NaN too, as a mean over an empty dim gives);
    `<op>_jvp` called with one tangent at a time (the others None) gives that
    input's share, and with none a zero tangent, each exactly the result's shape and dtype."""
    params = params or {}
    if inputs is None:
        inputs = make_inputs(op, sizes, dtype, seed, kinks)
    generator = torch.Generator().manual_seed(seed + 2)
    tangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype) if meta.differentiable
                else None for t, meta in zip(inputs, op.inputs)]
    positions = [p for p, meta in enumerate(op.inputs) if meta.differentiable]

    def along(function, only=None):
        """torch.func.jvp of `function` in the differentiable inputs (all, or `only` one of them)."""
        wanted = positions if only is None else [only]

        def of_differentiable(*values):
            arguments = list(inputs)
            for p, value in zip(wanted, values):
                arguments[p] = value
            return function(*arguments, **params)
        return torch.func.jvp(of_differentiable, tuple(inputs[p] for p in wanted),
                              tuple(tangents[p] for p in wanted))

    output, tangent = along(getattr(module, op.name))
    oracles = {}
    if not (kinks and op.reference):     # at a kink, torch's ops in the forward may follow other conventions
        oracles["the generated forward"] = getattr(module, naming.forward(op.name))
    if op.reference:
        oracles["the reference"] = reference(op)
    for label, function in oracles.items():
        expected_output, expected = along(function)
        assert tangent.shape == expected.shape and tangent.dtype == expected.dtype, \
            f"{op.name}: tangent {tuple(tangent.shape)} {tangent.dtype}, " \
            f"expected {tuple(expected.shape)} {expected.dtype} (from {label})"
        torch.testing.assert_close(tangent, expected, equal_nan=equal_nan,
                                   msg=lambda m: f"{op.name}: jvp against {label}: {m}")
    jvp = getattr(module, naming.jvp(op.name))
    for p in positions:
        alone = [tangents[p] if q == p else None for q in range(len(inputs))]
        share = jvp(**jvp_arguments(op, module, inputs, alone, **params))
        _, expected = along(next(iter(oracles.values())), only=p)
        assert share.shape == expected.shape, f"{op.name}: share of {op.inputs[p].name} has shape {tuple(share.shape)}"
        torch.testing.assert_close(share, expected, equal_nan=equal_nan,
                                   msg=lambda m: f"{op.name}: share of {op.inputs[p].name}: {m}")
    none = jvp(**jvp_arguments(op, module, inputs, [None] * len(inputs), **params))
    assert none.shape == output.shape and none.dtype == output.dtype and not none.any(), \
        f"{op.name}: without tangents, {naming.jvp(op.name)} should give zeros shaped like the result"


def gradcheck_op(op: OpSpec, module: ModuleType, sizes=None, seed: int = 0) -> None:
    """float64 torch.autograd.gradcheck of forward + generated backward (via an autograd.Function)."""
    forward = getattr(module, naming.forward(op.name))

    class Generated(torch.autograd.Function):
        @staticmethod
        def forward(*tensors):
            return forward(*tensors)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs, output)

        @staticmethod
        def backward(ctx, grad_output):
            *inputs, output = ctx.saved_tensors
            return call_backward(op, module, grad_output, inputs, output, needs_input_grad=ctx.needs_input_grad)

    inputs = make_inputs(op, sizes, torch.float64, seed, requires_grad=False)
    inputs = [t.requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    assert torch.autograd.gradcheck(Generated.apply, inputs)


def has_kinks(op: OpSpec) -> bool:
    """Whether the op's derivative jumps somewhere (a step, a sign or a Piecewise)."""
    from .derivation import derive
    return any(g.vjp.has(sympy.Heaviside, sympy.sign, sympy.Piecewise) for g in derive(op).gradients)


def verify_op(spec: str | Path, op_name: str, module_path: str | Path) -> None:
    """The checks derive runs on its own catalog, for one op of your spec and its generated module:

    - float64 gradcheck of forward + generated backward;
    - forward and gradients against autograd of the reference, float64 and float32, exact shapes;
    - hyperparameters at their defaults and at other values;
    - inputs exactly at 0 when the derivative has a step (a kink elsewhere, such as Huber's at
      |d| = delta, needs inputs of your own: `check_gradients(..., inputs=...)`);
    - the module's autograd.Function (gradcheck and gradgradcheck) and its custom op (gradients
      against the reference);
    - forward mode: the Function's jvp and `<op>_jvp` against torch.func.jvp of the reference
      (`check_tangents`).
    """
    op = load_catalog(spec).op(op_name)
    module = load_module(module_path)
    gradcheck_op(op, module)
    for dtype in (torch.float64, torch.float32):
        check_gradients(op, module, dtype)
    if op.params:
        check_gradients(op, module, params={p.name: 1.5 * p.default + 0.25 for p in op.params})
    if has_kinks(op):
        check_gradients(op, module, torch.float64, kinks=True)
    inputs = make_inputs(op, dtype=torch.float64)
    inputs = [t.requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    function = getattr(module, op.name)
    assert torch.autograd.gradcheck(function, inputs), f"{op.name}: the autograd.Function fails gradcheck"
    assert torch.autograd.gradgradcheck(function, inputs), f"{op.name}: the autograd.Function fails gradgradcheck"
    custom_op = getattr(module, naming.custom_op(op.name))
    flags = [meta.differentiable for meta in op.inputs]
    grad_output = torch.randn_like(custom_op(*inputs))
    for got, want in zip(autograd_gradients(custom_op, inputs, grad_output, flags),
                         autograd_gradients(reference(op), inputs, grad_output, flags)):
        if want is not None:
            torch.testing.assert_close(got, want, msg=lambda m: f"{op.name}: custom op gradient: {m}")
    check_tangents(op, module)
