"""Test helpers: verify generated backward code against torch.autograd.

Call these from your own pytest with your own spec, so you need not copy derive's
tests::

    from derive.testing import verify_op
    def test_my_ops():
        verify_op("my_ops.toml", "softsign", "my_project/grads/softsign.py")
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import itertools
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import sympy
import torch

from . import naming
from .model import OpSpec, SpecError, param_symbol, scalar_symbol
from .functions import SPECIAL_POINTS, TIE_SHARES, Tied, _Extremum, _OverIndex, free_indices
from .derivation import kinked
from .optional import absent_sets, condition as none_condition
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
    if not op.reference:
        raise SpecError("no 'reference' to verify against: add a torch expression of the inputs, such as "
                        "reference = \"torch.tanh(x)\"", path=op.source, op=op.name)
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
    chosen.update(op.fixed_sizes)
    # an index whose size is inferred from affine reads gets at least 2: the dims it is read from grow
    for index, formula in op.inferred_sizes:
        for _ in range(64):
            value = _size_at(formula, chosen)
            if value >= 2:
                break
            # (a stride makes the size grow every few steps of the length)
            indices = [naming.index_of_size(s.name) for s in sorted(formula.free_symbols, key=str)]
            grows = [i for i in indices if _size_at(formula, chosen | {i: chosen[i] + 8}) > value]
            if not grows:
                break
            chosen[grows[0]] += 1
        chosen[index] = max(int(_size_at(formula, chosen)), 0)
    return chosen


def _size_at(formula, chosen: dict[str, int]) -> int:
    """An inferred size's value at concrete sizes."""
    return int(formula.xreplace({s: chosen[naming.index_of_size(s.name)] for s in formula.free_symbols}))


def make_inputs(op: OpSpec, sizes: dict[str, int] | None = None, dtype=torch.float64, seed: int = 0,
                kinks: bool = False, requires_grad: bool = False,
                batch_shapes: dict[str, tuple[int, ...]] | None = None) -> list[torch.Tensor]:
    """Random inputs; with `kinks`, a third of the entries are exactly 0 (where step functions jump), in the
    inputs whose declared range holds 0 (outside it the op is not defined: acosh(0) is NaN).

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
            # an index ranges over the dim it indexes; a value only (a mask) is 0 or 1
            high = sizes[tensor.value_range] if tensor.value_range is not None else 2
            tensors.append(torch.randint(0, high, shape, generator=generator))
            continue
        value = torch.randn(shape, generator=generator, dtype=torch.float64)
        if tensor.name in ranges:
            low, high = ranges[tensor.name]
            value = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
        if kinks and (tensor.name not in ranges or ranges[tensor.name][0] <= 0 <= ranges[tensor.name][1]):
            value = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 1 / 3, 0.0, value)
        tensors.append(value.to(dtype).requires_grad_(requires_grad))
    return tensors


def nonempty_sizes(op: OpSpec) -> set[str]:
    """The sizes that must not be 0: those a max or min reduces over (the max of nothing is undefined;
    torch.amax and the generated forward both raise)."""
    index_sizes = dict(op.index_sizes)
    return {index_sizes[i.name] for e in op.rhs.atoms(_Extremum) for i in e.indices}


@functools.cache
def built_op(op: OpSpec):
    """build_op(op), once per op: OpSpec is a frozen dataclass, and what is built depends on it alone.
    call_backward reads the backward's signature on every call (gradcheck calls a backward once per
    output element); a caller that builds the op itself should build it through this, to share it."""
    from .pipeline import build_op
    return build_op(op)


def uses_output(op: OpSpec) -> bool:
    """Whether `<op>_backward` takes the forward's result (the gradients reuse it)."""
    return built_op(op).derivation.uses_output


def call_backward(op: OpSpec, module: ModuleType, grad_output, inputs, output=None, **keywords):
    """`<op>_backward(grad_output, *inputs[, output][, *saved])`: see `backward_arguments`."""
    params = {p.name: keywords[p.name] for p in op.params if p.name in keywords}
    arguments = backward_arguments(op, module, inputs, output, **params)
    return getattr(module, naming.backward(op.name))(grad_output, *arguments, **keywords)


def backward_arguments(op: OpSpec, module: ModuleType, inputs, output=None, **params) -> tuple:
    """What `<op>_backward` takes after grad_output, in the order of its signature: the inputs, the
    forward's result when the backward reuses it, and the values `<op>_forward_saving` hands over when
    the module has one (the signature of the style that saves as many values is the module's)."""
    saving = getattr(module, naming.forward_saving(op.name), None)
    saved = ()
    if saving is not None:
        output_again, *saved = saving(*inputs, **params)
        output = output_again if output is None else output
    built = built_op(op)
    candidates = [*built.signatures.values(), *([built.fused[1]] if built.fused is not None else [])]
    signature = next(s for s in candidates if len(s.values) == len(saved))
    values = {t.name: value for t, value in zip(op.inputs, inputs)} | dict(zip(signature.values, saved))
    if signature.uses_output:
        values[op.output] = output if output is not None else \
            getattr(module, naming.forward(op.name))(*inputs, **params)
    return tuple(values[name] for name in signature.arguments[1:])


def autograd_gradients(function, inputs, grad_output, differentiable):
    """Gradients of `function` by torch.autograd, for the inputs flagged differentiable (None elsewhere)."""
    leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, differentiable)]
    output = function(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(output, wanted, grad_output))
    return [next(grads) if flag else None for flag in differentiable]


def assert_matches(got: torch.Tensor, want: torch.Tensor, equal_nan: bool = False, infinite: bool = False,
                   msg=None) -> None:
    """torch.testing.assert_close; with `infinite`, where `want` is infinite `got` may be any infinite or NaN
    value, and where `want` is NaN any value: a derivative that is infinite there (asin's at 1, x ** 0.5's at
    0) reaches a sum as inf or as inf - inf = NaN, and a where() branch that is not taken as 0 * inf = NaN or
    as 0, by the order of the operations, which generated code and torch need not share."""
    if infinite and got.shape == want.shape:
        infinite_there = torch.isinf(want)
        assert not torch.isfinite(got[infinite_there]).any(), \
            msg("finite where the expected value is infinite") if msg else "finite where expected inf"
        defined = torch.isfinite(want)
        got, want = got[defined], want[defined]
    torch.testing.assert_close(got, want, equal_nan=equal_nan, msg=msg)


def check_gradients(op: OpSpec, module: ModuleType, dtype=torch.float64, sizes=None, seed: int = 0,
                    kinks: bool = False, inputs: list[torch.Tensor] | None = None, equal_nan: bool = False,
                    params: dict[str, float] | None = None, infinite: bool = False) -> None:
    """The generated backward equals autograd of the torch reference, with exactly each input's shape.

    `inputs` overrides the random ones; `equal_nan` accepts NaN where the reference has NaN too, `infinite`
    any inf or NaN where it has inf or NaN (see `assert_matches`);
    `params` sets hyperparameters (default: their defaults).
    """
    params = params or {}
    forward = getattr(module, naming.forward(op.name))
    if inputs is None:
        inputs = make_inputs(op, sizes, dtype, seed, kinks)
    expected_output = reference(op)(*inputs, **params)
    output = forward(*inputs, **params)
    assert_matches(output, expected_output, equal_nan, infinite,
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
        assert_matches(got, want, equal_nan, infinite, msg=lambda m: f"{op.name}: grad_{tensor.name}: {m}")


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
                   params: dict[str, float] | None = None, infinite: bool = False) -> None:
    """Forward mode: torch.func.jvp through `<op>()` (its Function's generated jvp) equals torch.func.jvp of
    the torch reference (when the op has one) and of the generated forward, for random tangents on every
    differentiable input (with `kinks`, against the reference alone: it sets the convention there;
    `equal_nan` accepts NaN where the oracle has NaN too, as a mean over an empty dim gives, `infinite` any inf
    or NaN where it has inf or NaN);
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
        assert_matches(tangent, expected, equal_nan, infinite, msg=lambda m: f"{op.name}: jvp against {label}: {m}")
    jvp = getattr(module, naming.jvp(op.name))
    for p in positions:
        alone = [tangents[p] if q == p else None for q in range(len(inputs))]
        share = jvp(**jvp_arguments(op, module, inputs, alone, **params))
        _, expected = along(next(iter(oracles.values())), only=p)
        assert share.shape == expected.shape, f"{op.name}: share of {op.inputs[p].name} has shape {tuple(share.shape)}"
        assert_matches(share, expected, equal_nan, infinite, msg=lambda m: f"{op.name}: share of {op.inputs[p].name}: {m}")
    none = jvp(**jvp_arguments(op, module, inputs, [None] * len(inputs), **params))
    assert none.shape == output.shape and none.dtype == output.dtype and not none.any(), \
        f"{op.name}: without tangents, {naming.jvp(op.name)} should give zeros shaped like the result"


def finite_part(function):
    """`function` with its infinite outputs read as 0, for gradcheck: an output entry that is ±inf (a mask's
    `-inf`) has no finite difference, and the gradient there is checked against autograd instead."""
    def finite(*inputs):
        output = function(*inputs)
        return torch.where(torch.isinf(output.detach()), 0, output)
    return finite


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
    assert torch.autograd.gradcheck(finite_part(Generated.apply), inputs)


def has_kinks(op: OpSpec) -> bool:
    """Whether the op's derivative jumps somewhere (a step, a sign or a Piecewise) or takes torch's value at a
    point where its formula is undefined (a power's at base 0, atan2's at (0, 0)); a condition on index positions
    alone (k <= t, i == j) is no kink: it is the same for every input value."""
    return any(kinked(g.vjp, op, (sympy.Heaviside, sympy.sign, *SPECIAL_POINTS, *TIE_SHARES))
               for g in built_op(op).derivation.gradients)


@dataclass(frozen=True)
class Kink:
    """Where an op's forward is not smooth: the points on which `left` equals `right`."""

    left: sympy.Expr    # Max(a, b) -> (a, b); Abs(u), sign(u) -> (u, 0); where(p < q, ...) -> (p, q); atan2(a, b) -> (a, 0), (b, 0); max(u, c) -> (u, max)
    right: sympy.Expr
    function: str       # "Max", "Min", "Abs", "sign", "where", "atan2" or "max"/"min" (a reduction), for messages


@dataclass(frozen=True)
class KinkPlacement:
    """Entries of one input moved exactly onto one kink by `kink_inputs`."""

    kink: Kink
    input: str                  # the input solved for
    solution: sympy.Expr        # its value on the kink, in the other inputs and the params
    mask: torch.Tensor          # the entries placed (bool, the input's shape)

    def __str__(self) -> str:
        return f"{self.input} = {self.solution} ({self.kink.function} kink, {int(self.mask.sum())} entries)"


def kinks(op: OpSpec) -> list[Kink]:
    """Every kink of the op's forward, found in its equation: each pair of Max/Min arguments, each Abs and
    sign argument against 0, each where() condition's two sides, each argument of atan2 against 0 (the
    branch cut a = 0, b < 0, and the point a = b = 0 where torch's gradient is 0), and each max or min
    reduction's operand against the reduction (several positions that reach the max tie)."""
    found: dict[tuple, Kink] = {}
    # Max(a, b, tie=t) has the value, and so the kinks, of Max(a, b): the convention only picks a derivative
    values = op.rhs.replace(lambda node: isinstance(node, Tied), lambda node: node.untied)
    for node in sympy.preorder_traversal(values):
        if isinstance(node, _Extremum):
            found.setdefault((node.body, node), Kink(node.body, node, "max" if node.largest else "min"))
        elif isinstance(node, (sympy.Max, sympy.Min)):
            for a, b in itertools.combinations(node.args, 2):
                found.setdefault((a, b), Kink(a, b, type(node).__name__))
        elif isinstance(node, (sympy.Abs, sympy.sign)):
            found.setdefault((node.args[0], sympy.S.Zero), Kink(node.args[0], sympy.S.Zero, type(node).__name__))
        elif isinstance(node, sympy.atan2):
            for argument in node.args:
                found.setdefault((argument, sympy.S.Zero), Kink(argument, sympy.S.Zero, "atan2"))
        elif isinstance(node, sympy.Piecewise):
            for _, condition in node.args:
                if isinstance(condition, sympy.core.relational.Relational):
                    found.setdefault((condition.lhs, condition.rhs), Kink(condition.lhs, condition.rhs, "where"))
    return list(found.values())


# Functions a kink's solution may contain, as torch evaluates them.
_TORCH_FUNCTIONS = {"exp": torch.exp, "log": torch.log, "log1p": torch.log1p, "sqrt": torch.sqrt,
                    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
                    "erf": torch.erf, "sin": torch.sin, "cos": torch.cos, "asin": torch.asin, "acos": torch.acos,
                    "atanh": torch.atanh, "tan": torch.tan, "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh,
                    "asinh": torch.asinh, "acosh": torch.acosh, "sign": torch.sign,
                    "Abs": torch.abs, "abs": torch.abs, "pi": torch.pi, "E": torch.e,
                    "atan2": lambda a, b: torch.atan2(torch.as_tensor(a), torch.as_tensor(b)),
                    "maximum": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)),
                    "minimum": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b))}


def _torch_function(arguments, expr):
    """`expr` as a function of `arguments` evaluated by torch, elementwise (Max and Min pairwise)."""
    def pairwise(name):
        def fold(*args):
            result = args[0]
            for arg in args[1:]:
                result = sympy.Function(name)(result, arg)
            return result
        return fold

    expr = expr.replace(sympy.Max, pairwise("maximum")).replace(sympy.Min, pairwise("minimum"))
    return sympy.lambdify(arguments, expr, modules=[_TORCH_FUNCTIONS])


def kink_inputs(op: OpSpec, inputs: list[torch.Tensor], params: dict[str, float] | None = None,
                generator: torch.Generator | None = None, fraction: float = 1 / 3
                ) -> tuple[list[torch.Tensor], list[KinkPlacement]]:
    """Copies of `inputs` with a `fraction` of one input's entries moved exactly onto each kink of the op.

    For each kink (see `kinks`), the equation `left = right` is solved with SymPy for one input that
    appears in it outside any sum, gather or softmax (`x = lo` for Max(x, lo), `pred = target + delta`
    and `pred = target - delta` for where(Abs(pred - target) < delta, ...), `a = b` for Max(a, b)); the
    solution is evaluated from the other inputs at the same indices (index 0 of an index the solved
    input does not have) and written into the chosen entries, nudged by a few ulps where rounding
    missed: every placed entry makes `left == right` hold exactly in float64. Inputs with a declared
    range are not moved (the kink may lie outside it). A kink that no input can be solved for is left out.
    """
    params = {p.name: p.default for p in op.params} | (params or {})
    generator = generator or torch.Generator().manual_seed(0)
    tensors = {t.name: value.detach().clone() for t, value in zip(op.inputs, inputs)}
    ranged = {name for name, _, _ in op.ranges}
    placements = []
    for kink in kinks(op):
        if isinstance(kink.right, _Extremum):
            placement = _place_in_windows(op, kink, tensors, ranged, generator, fraction)
            if placement is not None:
                placements.append(placement)
                continue
        for candidate in _solvable_accesses(op, kink, ranged):
            place = _place_on_extremum if isinstance(kink.right, _Extremum) else _place
            placement = place(op, kink, candidate, tensors, params, generator, fraction)
            if placement is not None:
                placements.append(placement)
                break
    return [tensors[t.name] for t in op.inputs], placements


def _solvable_accesses(op: OpSpec, kink: Kink, ranged: set[str]) -> list[sympy.Indexed]:
    """Accesses of float inputs in a kink's equation that the equation can be solved for elementwise."""
    # a reduction's operand against the reduction: solved in the operand (`_place_on_extremum`)
    difference = kink.left if isinstance(kink.right, _Extremum) else kink.left - kink.right
    hidden = {a for node in sympy.preorder_traversal(difference)
              if isinstance(node, (sympy.Sum, _OverIndex, _Extremum)) for a in node.atoms(sympy.Indexed)}
    floats = {t.name for t in op.inputs if not t.integer and t.name not in ranged}
    accesses = [a for a in difference.atoms(sympy.Indexed)
                if a.base.name in floats and a not in hidden and all(isinstance(i, sympy.Idx) for i in a.indices)]
    scalars = [scalar_symbol(t.name) for t in op.inputs if not t.indices and t.name in floats]
    accesses += [s for s in scalars if s in difference.free_symbols]
    # an access with every index first: `x[n, k] = lo[k]` holds for all entries, `lo[k] = x[0, k]` for one row
    return sorted(accesses, key=lambda a: (-len(getattr(a, 'indices', ())), sympy.default_sort_key(a)))


def _place_on_extremum(op, kink, access, tensors, params, generator, fraction) -> KinkPlacement | None:
    """Ties of a max or min reduction: the operand u is evaluated, its extremum m over the reduced indices
    taken, and `u = m` solved for `access` as any kink, so that a `fraction` of the positions of each row
    reach the extremum exactly (with the one that did: several equal maxima in a row). Only for an access
    that carries every index of the operand (moving one entry then moves one position of u)."""
    extremum = kink.right
    body = kink.left.replace(lambda e: isinstance(e, Tied), lambda e: e.untied)     # the same values
    if not isinstance(access, sympy.Indexed) or body.has(sympy.Sum, _OverIndex, _Extremum, sympy.Piecewise) \
            or not free_indices(body) <= {i.name for i in access.indices}:
        return None
    name = access.base.name
    target = tensors[name]
    if target.numel() == 0:
        return None
    names = _dims(access, target)
    accesses = sorted(body.atoms(sympy.Indexed), key=sympy.default_sort_key)
    stand_ins = {a: sympy.Dummy(str(a.base), real=True) for a in accesses}
    scalar_symbols = {scalar_symbol(t.name): sympy.Dummy(t.name, real=True) for t in op.inputs if not t.indices}
    param_symbols = {param_symbol(p): sympy.Dummy(p, real=True) for p in params}
    values = {symbol: _aligned(a, tensors[a.base.name], names) for a, symbol in stand_ins.items()}
    values |= {symbol: tensors[str(s)] for s, symbol in scalar_symbols.items()}
    values |= {symbol: torch.as_tensor(params[str(p)], dtype=target.dtype) for p, symbol in param_symbols.items()}
    if any(v is None for v in values.values()):
        return None
    operand = body.xreplace({**stand_ins, **scalar_symbols, **param_symbols})
    grid = torch.broadcast_to(torch.as_tensor(_torch_function(list(values), operand)(*values.values()),
                                              dtype=target.dtype), target.shape)
    if any(i.name not in names for i in extremum.indices):
        return None     # a reduced index the access does not carry (read under another name): no row to tie
    dims = [names.index(i.name) for i in extremum.indices]
    if any(target.shape[d] == 0 for d in dims):
        return None
    reached = grid.amax(dims, keepdim=True) if extremum.largest else grid.amin(dims, keepdim=True)
    stand_in = sympy.IndexedBase(f"{name}_extremum")[access.indices]   # m, read at every position of the row
    tensors[stand_in.base.name] = reached.expand(target.shape)
    try:
        placement = _place(op, Kink(body, stand_in, kink.function), access, tensors, params, generator, fraction)
    finally:
        del tensors[stand_in.base.name]
    if placement is None:
        return None
    return KinkPlacement(kink, name, placement.solution.xreplace({stand_in: extremum}), placement.mask)


def _place_in_windows(op, kink, tensors, ranged, generator, fraction) -> KinkPlacement | None:
    """Ties of a max or min over windows, max(x[n, c, s*t + d*k + e], k): window by window (t in order), a
    `fraction` of its entries are set to the window's extremum, so that several positions of one window
    reach it exactly. Where windows overlap (s < d*(K - 1) + 1), a later window may raise an entry an earlier
    one shares and so undo that one's tie; the mask holds every entry set. None: the operand is no single
    read with one affine subscript in the reduced index and one other index."""
    extremum = kink.right
    body = extremum.body
    if not isinstance(body, sympy.Indexed) or len(extremum.indices) != 1 or body.base.name in ranged:
        return None
    affine = [p for p, i in enumerate(body.indices) if not isinstance(i, sympy.Idx)]
    inputs = {t.name: t for t in op.inputs}
    name = body.base.name
    if len(affine) != 1 or name not in inputs or inputs[name].integer or BATCH in inputs[name].indices:
        return None
    position, subscript, index = affine[0], body.indices[affine[0]], extremum.indices[0]
    others = subscript.atoms(sympy.Idx) - {index}
    if subscript.atoms(sympy.Indexed) or index not in subscript.atoms(sympy.Idx) or len(others) != 1:
        return None
    start = others.pop()
    index_sizes = dict(op.index_sizes)
    chosen = {index_sizes[i]: size for t in op.inputs for i, size in zip(t.indices, tensors[t.name].shape)}
    chosen |= dict(op.fixed_sizes)
    for inferred, formula in op.inferred_sizes:
        chosen[inferred] = max(_size_at(formula, chosen), 0)
    windows, width = (chosen.get(index_sizes.get(i.name, i.name)) for i in (start, index))
    target = tensors[name]
    if not windows or not width or target.numel() == 0:
        return None
    moved = target.movedim(position, -1).clone()        # the affine dim last
    placed = torch.zeros(moved.shape, dtype=torch.bool)
    reach = torch.arange(width) * int(subscript.coeff(index)) + int(subscript.subs({start: 0, index: 0}))
    for window in range(windows):
        at = reach + window * int(subscript.coeff(start))
        at = at[(at >= 0) & (at < moved.shape[-1])]       # positions outside read padding's zeros
        if not len(at):
            continue
        values = moved[..., at]
        padded = len(at) < width     # the zeros read outside take part in the extremum
        reached = values.amax(-1, keepdim=True) if extremum.largest else values.amin(-1, keepdim=True)
        if padded:
            reached = reached.clamp_min(0) if extremum.largest else reached.clamp_max(0)
        chosen_entries = torch.rand(values.shape, generator=generator) < fraction
        moved[..., at] = torch.where(chosen_entries, reached, values)
        placed[..., at] |= chosen_entries
    if not placed.any():
        return None
    tensors[name] = moved.movedim(-1, position)
    return KinkPlacement(kink, name, extremum, placed.movedim(-1, position))


def _place(op, kink, access, tensors, params, generator, fraction) -> KinkPlacement | None:
    name = access.base.name if isinstance(access, sympy.Indexed) else access.name
    target = tensors[name]
    if target.numel() == 0:
        return None
    # every input access and param becomes a real symbol, so that SymPy can solve through Abs
    others = sorted((difference_atoms := (kink.left - kink.right)).atoms(sympy.Indexed) - {access},
                    key=sympy.default_sort_key)
    unknown = sympy.Dummy("unknown", real=True)
    stand_ins = {a: sympy.Dummy(str(a.base), real=True) for a in others}
    param_symbols = {param_symbol(p): sympy.Dummy(p, real=True) for p in params}
    scalar_symbols = {scalar_symbol(t.name): sympy.Dummy(t.name, real=True)
                      for t in op.inputs if not t.indices and scalar_symbol(t.name) != access}
    replaced = difference_atoms.xreplace({access: unknown, **stand_ins, **param_symbols, **scalar_symbols})
    if replaced.has(sympy.Sum, _OverIndex, _Extremum, sympy.Indexed, sympy.Piecewise):   # (not elementwise)
        return None
    try:
        solutions = sympy.solve(replaced, unknown)
    except (NotImplementedError, ValueError, TypeError):
        return None
    # a solution valid under a condition (delta >= 0) is tried as it is: entries it misses are not placed
    solutions = [next((e for e, _ in s.args if e is not sympy.nan), s) if isinstance(s, sympy.Piecewise) else s
                 for s in solutions]
    solutions = [s for s in solutions if not s.has(sympy.I, sympy.zoo, sympy.nan, sympy.Piecewise)]
    if not solutions:
        return None
    solution = solutions[int(torch.randint(len(solutions), (), generator=generator))]
    names = _dims(access, target)
    values = {symbol: _aligned(a, tensors[a.base.name], names) for a, symbol in stand_ins.items()}
    values |= {symbol: torch.as_tensor(params[str(p)], dtype=target.dtype) for p, symbol in param_symbols.items()}
    values |= {symbol: tensors[str(s)] for s, symbol in scalar_symbols.items()}
    if any(v is None for v in values.values()):
        return None
    arguments = list(values)
    value = _torch_function(arguments, solution)(*values.values())
    value = torch.as_tensor(value, dtype=target.dtype)
    if torch.broadcast_shapes(value.shape, target.shape) != target.shape:
        return None     # the other inputs' batch dims are wider than this one's (they broadcast against it)
    value = torch.broadcast_to(value, target.shape)
    chance = torch.rand(target.shape, generator=generator)
    mask = (chance < fraction) | (chance == chance.min())     # at least one entry
    # evaluate both sides as written and nudge by ulps until they agree exactly
    left, right = (_torch_function([unknown, *arguments], side.xreplace(
        {access: unknown, **stand_ins, **param_symbols, **scalar_symbols})) for side in (kink.left, kink.right))

    def on_kink(candidate):
        return torch.broadcast_to(torch.as_tensor(left(candidate, *values.values()) == right(candidate, *values.values())),
                                  target.shape)

    placed = value.clone()
    exact = on_kink(value) & torch.isfinite(value)
    for direction in (float("inf"), float("-inf")):
        nudged = value
        for _ in range(4):
            nudged = torch.nextafter(nudged, torch.full_like(nudged, direction))
            hit = ~exact & on_kink(nudged) & torch.isfinite(nudged)
            placed = torch.where(hit, nudged, placed)
            exact = exact | hit
    mask = mask & exact
    if not mask.any():
        return None
    tensors[name] = torch.where(mask, placed, target)
    return KinkPlacement(kink, name, solution.xreplace(
        {v: k for k, v in {**stand_ins, **param_symbols, **scalar_symbols}.items()}), mask)


def _dims(access, tensor: torch.Tensor) -> list[str]:
    """A name for each dim of `tensor` read through `access`; batch dims are named from the right."""
    if not isinstance(access, sympy.Indexed):
        return []
    indices = [str(i) for i in access.indices]
    if BATCH not in indices:
        return indices
    batch = tensor.dim() - (len(indices) - 1)
    at = indices.index(BATCH)
    return indices[:at] + [f"{BATCH}{batch - 1 - b}" for b in range(batch)] + indices[at + 1:]


def _aligned(access: sympy.Indexed, tensor: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    """`tensor` read through `access`, lined up with dims `names` (index 0 of any other index)."""
    own = _dims(access, tensor)
    for position in reversed(range(len(own))):
        if own[position] not in names:
            if tensor.shape[position] == 0:
                return None
            tensor = tensor.select(position, 0)
            del own[position]
    tensor = tensor.permute([own.index(n) for n in names if n in own])
    for position, n in enumerate(names):
        if n not in own:
            tensor = tensor.unsqueeze(position)
    return tensor


def verify_op(spec: str | Path, op_name: str, module_path: str | Path) -> None:
    """The checks derive runs on its own catalog, for one op of your spec and its generated module:

    - float64 gradcheck of forward + generated backward;
    - forward and gradients against autograd of the reference, float64 and float32, exact shapes;
    - hyperparameters at their defaults and at other values;
    - inputs exactly at 0 when the derivative has a step or a special point (inf or NaN where the
      reference's gradient is inf, see `assert_matches`), and inputs exactly on every kink of the
      forward wherever it lies (`kink_inputs`: x = lo for Max(x, lo), x = 1 for Max(0, 1 - x),
      pred = target ± delta for where(Abs(pred - target) < delta, ...), a = b for Max(a, b));
    - once with every index of the same size (a transposed gradient then has the right shape);
    - the module's autograd.Function (gradcheck and gradgradcheck) and its custom op (gradients
      against the reference);
    - forward mode: the Function's jvp and `<op>_jvp` against torch.func.jvp of the reference
      (`check_tangents`);
    - optional inputs None, against the op with their declared values in their place (`check_optional`).
    """
    verify_module(load_catalog(spec).op(op_name), load_module(module_path))


@contextlib.contextmanager
def _on_kinks(op: OpSpec, where: str):
    """A gradient that differs only at exact kinks, where the random inputs agreed, is most often a reference
    with another convention at a tie than the spec's (torch.clamp_min passes a tie, torch.relu does not, Max
    splits it): the message says where the inputs were and how to state the convention."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{op.name}: with inputs {where} (random inputs agree): {error}\nIf the reference "
                             "takes another value at a tie than the spec, say which with tie= (Max(x, 0, tie=1) "
                             "is torch.clamp_min(x, 0), tie=0 is torch.relu; README \"Kinks\")") from None


def verify_module(op: OpSpec, module: ModuleType) -> None:
    """`verify_op`'s checks of `op` and a module rendered from it, already imported (`derive.op`'s, say)."""
    gradcheck_op(op, module)
    for dtype in (torch.float64, torch.float32):
        check_gradients(op, module, dtype)
    if op.params:
        check_gradients(op, module, params={p.name: 1.5 * p.default + 0.25 for p in op.params})
    if has_kinks(op):
        # at 0 torch's own gradient may be infinite (x ** p's for p < 1) or NaN (summed over exponents of both
        # signs): the generated one must be infinite or NaN where it is infinite
        with _on_kinks(op, "a third of each input exactly 0"):
            check_gradients(op, module, torch.float64, kinks=True, infinite=True)
    placed, placements = kink_inputs(op, make_inputs(op, dtype=torch.float64))
    if placements:
        with _on_kinks(op, "on the kinks " + "; ".join(map(str, placements))):
            # (a kink may be a special point too: |x| ** p at x = 0 is inf for p < 0, as torch's)
            check_gradients(op, module, torch.float64, inputs=placed, infinite=True)
    check_gradients(op, module, sizes=dict.fromkeys(sizes_for(op), 3))
    inputs = make_inputs(op, dtype=torch.float64)
    inputs = [t.requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]
    function = getattr(module, op.name)
    assert torch.autograd.gradcheck(finite_part(function), inputs), f"{op.name}: the autograd.Function fails gradcheck"
    assert torch.autograd.gradgradcheck(finite_part(function), inputs), \
        f"{op.name}: the autograd.Function fails gradgradcheck"
    custom_op = getattr(module, naming.custom_op(op.name))
    flags = [meta.differentiable for meta in op.inputs]
    grad_output = torch.randn_like(custom_op(*inputs))
    for got, want in zip(autograd_gradients(custom_op, inputs, grad_output, flags),
                         autograd_gradients(reference(op), inputs, grad_output, flags)):
        if want is not None:
            torch.testing.assert_close(got, want, msg=lambda m: f"{op.name}: custom op gradient: {m}")
    check_tangents(op, module)
    if op.optional:
        check_optional(op, module)


def check_optional(op: OpSpec, module: ModuleType, dtype=torch.float64, sizes=None, seed: int = 0) -> None:
    """Every set of optional inputs None at once gives what the op gives with each filled with its declared
    value (the rule of derive/optional.py): the forward through `<op>_forward`, `<op>()` and the custom op; the
    other inputs' gradients through `<op>_backward` (exact shapes and dtype, None for the absent inputs),
    `<op>()` and the custom op; forward mode through `<op>()`; and float64 gradcheck and gradgradcheck of
    `<op>()`."""
    defaults = dict(op.optional)
    inputs = make_inputs(op, sizes, dtype, seed)
    function = getattr(module, op.name)
    forward = getattr(module, naming.forward(op.name))
    custom_op = getattr(module, naming.custom_op(op.name))
    for absent in absent_sets(op):
        label = f"{op.name} with {none_condition(absent)}"
        given = [None if t.name in absent else x for t, x in zip(op.inputs, inputs)]
        filled = [torch.full_like(x, defaults[t.name]) if t.name in absent else x for t, x in zip(op.inputs, inputs)]
        expected = forward(*filled)
        for how, call in (("forward", forward), ("the Function", function), ("the custom op", custom_op)):
            assert_matches(call(*given), expected, msg=lambda m: f"{label}: {how}: {m}")
        grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1),
                                  dtype=torch.float64).to(dtype)
        present = [t.differentiable and t.name not in absent for t in op.inputs]
        want = autograd_gradients(forward, filled, grad_output, present)
        got = call_backward(op, module, grad_output, given)
        assert len(got) == len(op.inputs), f"{label}: backward returned {len(got)} values"
        for tensor, flag, value, oracle in zip(op.inputs, present, got, want):
            if not flag:
                assert value is None, f"{label}: grad_{tensor.name} should be None"
                continue
            assert value.shape == oracle.shape and value.dtype == dtype, \
                f"{label}: grad_{tensor.name} is {tuple(value.shape)} {value.dtype}, expected {tuple(oracle.shape)}"
            assert_matches(value, oracle, msg=lambda m: f"{label}: grad_{tensor.name}: {m}")
        wanted = [p for p, flag in enumerate(present) if flag]

        def with_present(call, *values):
            arguments = list(given)
            for p, value in zip(wanted, values):
                arguments[p] = value
            return call(*arguments)
        for how, call in (("the Function", function), ("the custom op", custom_op)):
            leaves = [inputs[p].detach().requires_grad_(True) for p in wanted]
            for value, oracle in zip(torch.autograd.grad(with_present(call, *leaves), leaves, grad_output),
                                     [want[p] for p in wanted]):
                assert_matches(value, oracle, msg=lambda m: f"{label}: gradient through {how}: {m}")
        tangents = tuple(torch.randn_like(inputs[p]) for p in wanted)
        _, tangent = torch.func.jvp(lambda *values: with_present(function, *values), tuple(inputs[p] for p in wanted),
                                    tangents)
        filled_present = [filled[p] for p in wanted]

        def filled_forward(*values):
            arguments = list(filled)
            for p, value in zip(wanted, values):
                arguments[p] = value
            return forward(*arguments)
        _, oracle = torch.func.jvp(filled_forward, tuple(filled_present), tangents)
        assert_matches(tangent, oracle, msg=lambda m: f"{label}: jvp: {m}")
        if dtype == torch.float64:
            leaves = tuple(inputs[p].detach().requires_grad_(True) for p in wanted)
            present = finite_part(lambda *values: with_present(function, *values))
            assert torch.autograd.gradcheck(present, leaves), f"{label}: the autograd.Function fails gradcheck"
            assert torch.autograd.gradgradcheck(present, leaves), \
                f"{label}: the autograd.Function fails gradgradcheck"


def saved_bytes(run: Callable[[], object], activations: bool = False) -> int:
    """Bytes the autograd graph built by `run()` holds for its backward: the distinct storages its nodes save
    (torch.autograd.graph.saved_tensors_hooks sees every tensor a node or a Function's ctx saves; a tensor two
    nodes save, or a view of one, is counted once). Shapes and numbers kept on a ctx are not tensors: 0 bytes.
    `activations`: only the values the forward computed, not the leaves (inputs, weights) or views of them."""
    storages: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        base = tensor if tensor._base is None else tensor._base
        if not (activations and base.is_leaf):
            storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    del result      # the graph, and the storages it saved, lived until now
    return sum(storages.values())


def op_saved_bytes(op: OpSpec, module: ModuleType, inputs) -> tuple[int, int]:
    """(bytes the generated `<op>()` saves, bytes autograd of the op's reference saves) for the same inputs,
    each differentiable input a leaf that requires grad."""
    def leaves():
        return [t.detach().requires_grad_(spec.differentiable) for t, spec in zip(inputs, op.inputs)]
    generated = getattr(module, op.name)
    return saved_bytes(lambda: generated(*leaves())), saved_bytes(lambda: reference(op)(*leaves()))
