"""Kinks: where a spec's function is differentiable, its gradient is the true derivative whatever the
conventions; where it is not, each kink takes torch's value, or the one the spec's tie= gives it.

The first test is a generator: identities whose kinks cancel (Max(p, q) + Min(p, q) is p + q, ...),
on kinks of several shapes (x = 0, x = a, 2x = a + 1, x[n, k] = c[n]), placed in several contexts
(alone, inside tanh, summed over an index, times a real kink, reduced to a loss), with inputs exactly
on every kink and tie, and equal sizes for different indices. Its oracle is autograd of the smooth
function the identity equals. `DERIVE_KINK_CASES=all` runs the whole product instead of a slice.
"""

import itertools
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from derive.build import build_op
from derive.emit import render_module
from derive.explain import explain_op, render_explanation
from derive.spec import parse_catalog
from derive.testing import autograd_gradients, call_backward, check_gradients, load_module

from conftest import first_by_default, half_by_default

NAMESPACES = itertools.count()
DECLARED = {"x": "x[n, k]", "a": "a[n, k]", "c": "c[n]", "s": "s[n]", "w": "w[k]"}


def generate(tmp_path, equation: str, inputs: list[str], reference: str = "x", name: str = "kinked"):
    """The op and its generated (contraction-style) module."""
    declared = ", ".join(f'"{i}"' for i in inputs)
    text = f'[ops.{name}]\ninputs = [{declared}]\nequation = "{equation}"\nreference = "{reference}"\n'
    op = parse_catalog(text, "kinks.toml").ops[0]
    built = build_op(op, ("contraction",))
    path = tmp_path / f"{name}.py"
    path.write_text(render_module(built.derivation, built.lowered["contraction"], "kinks.toml", "derive generate",
                                  namespace=f"kinks_{next(NAMESPACES)}"))
    return op, load_module(path)


# --- identities whose kinks cancel ------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """Two sides p and q of a kink p = q, in the spec and in torch, and how to put inputs on it."""

    p: str
    q: str
    names: tuple[str, ...]                              # the inputs p and q read
    torch_p: Callable[[dict], torch.Tensor]
    torch_q: Callable[[dict], torch.Tensor]
    place: Callable[[dict, torch.Tensor], None]         # make p == q exactly where the mask is set


def _set(tensors, mask, value):
    tensors["x"] = torch.where(mask, value, tensors["x"])


PAIRS = [
    Pair("x[n, k]", "0", ("x",), lambda t: t["x"], lambda t: torch.zeros_like(t["x"]),
         lambda t, m: _set(t, m, torch.zeros_like(t["x"]))),
    Pair("x[n, k]", "a[n, k]", ("x", "a"), lambda t: t["x"], lambda t: t["a"],
         lambda t, m: _set(t, m, t["a"])),
    Pair("2 * x[n, k]", "a[n, k] + 1", ("x", "a"), lambda t: 2 * t["x"], lambda t: t["a"] + 1,
         lambda t, m: _set(t, m, (t["a"] + 1) / 2)),      # exact: halving and doubling lose nothing
    Pair("x[n, k]", "c[n]", ("x", "c"), lambda t: t["x"], lambda t: t["c"][:, None].expand_as(t["x"]),
         lambda t, m: _set(t, m, t["c"][:, None].expand_as(t["x"]))),
]

# (spec with {p} and {q}, the smooth function of p and q it equals)
IDENTITIES = [
    ("Max({p}, {q}) + Min({p}, {q})", lambda p, q: p + q),
    ("Max({p}, {q}, tie=0) + Min({p}, {q}, tie=0)", lambda p, q: p + q),
    ("2 * Max({p}, {q}) - Abs({p} - {q})", lambda p, q: p + q),
    ("Abs({p} - {q}) + 2 * Min({p}, {q}, tie=1)", lambda p, q: p + q),
    ("Max({p} - {q}, 0, tie=0) + Min({p} - {q}, 0, tie=0)", lambda p, q: p - q),
    ("where({p} > {q}, {p} - {q}, 0) + Min({p} - {q}, 0)", lambda p, q: p - q),
    # a smooth negative branch glued to a linear positive one (ELU), its two kinks written differently
    ("Max({p} - {q}, 0) + Min(exp({p} - {q}) - 1, 0)", lambda p, q: F.elu(p - q)),
    # continuous but not one formula: the kink's value must be the common one, not relu's 0 twice
    ("Max({p} - {q}, 0, tie=0) + Min({p} - {q}, 0, tie=0) + Max({p} - {q}, 0)**2",
     lambda p, q: (p - q) + torch.relu(p - q) ** 2),
]

# (equation with {e}, inputs it adds, the same in torch of e and the tensors)
CONTEXTS = [
    ("y[n, k] = {e}", (), lambda e, t: e),
    ("y[n, k] = tanh({e}) * s[n]", ("s",), lambda e, t: torch.tanh(e) * t["s"][:, None]),
    ("y[n] = sum(({e}) * w[k], k)", ("w",), lambda e, t: (e * t["w"]).sum(-1)),
    # a real kink beside the cancelling ones: torch.maximum's even split at s == 0
    ("y[n, k] = ({e}) * Max(s[n], 0)", ("s",), lambda e, t: e * torch.maximum(t["s"], torch.zeros_like(t["s"]))[:, None]),
    ("y = mean(sin({e}), n, k)", (), lambda e, t: torch.sin(e).mean()),
]

SIZES = [(3, 3), (3, 3), (1, 3), (3, 3), (2, 1), (0, 3)]   # mostly equal sizes for n and k; size 1 and 0


def cases():
    combos = [(i, identity, pair, context)
              for i, (identity, (pair, context)) in enumerate(
                  (identity, pc) for identity in range(len(IDENTITIES))
                  for pc in itertools.product(range(len(PAIRS)), range(len(CONTEXTS))))]
    if os.environ.get("DERIVE_KINK_CASES") != "all":
        # every identity once, with pairs, contexts and sizes rotating: each of them is used at least once
        # (DERIVE_KINK_CASES=twice runs every identity twice)
        repeats = 2 if os.environ.get("DERIVE_KINK_CASES") == "twice" else 1
        combos = [(i, identity, (identity + j) % len(PAIRS), (identity + 2 * j) % len(CONTEXTS))
                  for i, (identity, j) in enumerate(itertools.product(range(len(IDENTITIES)), range(repeats)))]
    for i, identity, pair, context in combos:
        if "where" in IDENTITIES[identity][0] and "sum(" in CONTEXTS[context][0]:
            continue   # a where() inside a sum with a free index is mis-derived on main already (its own issue)
        spec = IDENTITIES[identity][0].format(p=f"({PAIRS[pair].p})", q=f"({PAIRS[pair].q})")
        yield pytest.param(i, identity, pair, context, id=f"{spec} | {CONTEXTS[context][0]}")


def default_cases() -> list:
    """Every fourth identity by default, the rest under `-m slow`; DERIVE_KINK_CASES's set unmarked (CI: `all`)."""
    every = list(cases())
    if os.environ.get("DERIVE_KINK_CASES"):
        return every
    return first_by_default(every[::4] + [case for k, case in enumerate(every) if k % 4], len(every[::4]))


@pytest.mark.parametrize("seed, identity, pair, context", default_cases())
def test_cancelling_kinks_give_the_true_derivative(tmp_path, seed, identity, pair, context):
    template, smooth = IDENTITIES[identity]
    pair = PAIRS[pair]
    where, extra, outer = CONTEXTS[context]
    equation = where.format(e=template.format(p=f"({pair.p})", q=f"({pair.q})"))
    names = [n for n in DECLARED if n in pair.names + extra]
    op, module = generate(tmp_path, equation, [DECLARED[n] for n in names])

    n, k = SIZES[seed % len(SIZES)]
    generator = torch.Generator().manual_seed(seed)
    shapes = {"x": (n, k), "a": (n, k), "c": (n,), "s": (n,), "w": (k,)}
    # multiples of 1/16: every spelling of a kink (2 * x == a + 1, 2 * x - a - 1 == 0) is then exact
    tensors = {name: torch.round(16 * torch.randn(shapes[name], generator=generator, dtype=torch.float64)) / 16
               for name in names}
    pair.place(tensors, torch.rand((n, k), generator=generator) < 0.5)     # on the kink p == q
    if "s" in tensors:
        tensors["s"] = torch.where(torch.rand((n,), generator=generator) < 0.5, 0.0, tensors["s"])
    inputs = [tensors[name] for name in names]

    def reference(*values):
        t = dict(zip(names, values))
        return outer(smooth(pair.torch_p(t), pair.torch_q(t)), t)

    output = getattr(module, "kinked_forward")(*inputs)
    torch.testing.assert_close(output, reference(*inputs), equal_nan=True)    # a mean over size 0 is NaN
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    expected = autograd_gradients(reference, inputs, grad_output, [True] * len(inputs))
    actual = call_backward(op, module, grad_output, inputs, output)
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape, f"grad_{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        torch.testing.assert_close(got, want, msg=lambda m: f"{equation}: grad_{name}: {m}")


def test_kinks_that_cancel_leave_no_step(tmp_path):
    op, module = generate(tmp_path, "y[i] = Max(0, x[i]) + Min(0, x[i])", ["x[i]"])
    gradient, = build_op(op).derivation.gradients
    assert str(gradient.vjp) == "grad_y[i]"
    assert [k.verdict for k in gradient.kinks] == ["smooth"]
    assert "grad_x = grad_y\n" in open(module.__file__).read()


# --- conventions where the gradient jumps -----------------------------------------------------

def _on(*values):
    """Entries exactly on kinks and ties, and random ones."""
    return torch.tensor(values + (-1.5, 0.7, 2.25, -0.3), dtype=torch.float64)


NAN = float("nan")
# (equation, inputs, reference, input values: on every kink and tie, with NaN where torch's NaN rule matches)
TORCH_CONVENTIONS = [
    # relu's 0 at 0; the gradient passes at NaN, as threshold_backward does
    ("y[i] = Max(x[i], 0, tie=0)", ["x[i]"], "torch.relu(x)", [_on(0.0, 0.0, NAN)]),
    # clamp_min with a tensor bound passes the gradient to x at the bound, none to the bound
    ("y[i] = Max(x[i], lo[i], tie=1)", ["x[i]", "lo[i]"], "torch.clamp_min(x, lo)",
     [_on(0.5, -1.0, 0.0), _on(0.5, -1.0, 1.0)]),
    # hardtanh: 0 at both bounds, the gradient at NaN
    ("y[i] = Min(Max(x[i], -1, tie=0), 1, tie=0)", ["x[i]"], "torch.nn.functional.hardtanh(x)",
     [_on(-1.0, 1.0, NAN)]),
    # clamp passes at both bounds
    ("y[i] = Min(Max(x[i], -0.5, tie=1), 0.5, tie=1)", ["x[i]"], "torch.clamp(x, -0.5, 0.5)", [_on(-0.5, 0.5, 0.0)]),
    # relu's convention and clamp's in one equation
    ("y[i] = Max(x[i], 0, tie=0) + Min(Max(x[i], -1, tie=1), 1, tie=1)", ["x[i]"],
     "torch.relu(x) + torch.clamp(x, -1, 1)", [_on(-1.0, 0.0, 1.0)]),
    # Max and Min split a tie evenly and give the gradient to both at NaN, as torch.maximum/minimum
    ("y[i] = Max(a[i], b[i])", ["a[i]", "b[i]"], "torch.maximum(a, b)", [_on(1.0, 0.0, NAN, 2.0), _on(1.0, 0.0, 3.0, NAN)]),
    ("y[i] = Min(a[i], b[i])", ["a[i]", "b[i]"], "torch.minimum(a, b)", [_on(1.0, 0.0, NAN, 2.0), _on(1.0, 0.0, 3.0, NAN)]),
    # a clamp between tensor bounds, with x on each bound and all three equal
    ("y[i] = Min(Max(x[i], lo[i]), hi[i])", ["x[i]", "lo[i]", "hi[i]"], "torch.minimum(torch.maximum(x, lo), hi)",
     [_on(-1.0, 1.0, 0.5, 0.0), _on(-1.0, 0.0, 0.5, 0.0), _on(0.0, 1.0, 0.5, 0.0)]),
    # where() as written (clamp_min's convention) beside Max's even split, on one kink
    ("y[i] = where(x[i] >= lo[i], x[i], lo[i]) + Max(x[i], lo[i])", ["x[i]", "lo[i]"],
     "torch.clamp_min(x, lo) + torch.maximum(x, lo)", [_on(0.5, -1.0, 0.0), _on(0.5, -1.0, 1.0)]),
    # Abs's sign(0) = 0, a strict where() and Max's even split, on one kink that really jumps
    ("y[i] = 3 * Abs(x[i]) + where(x[i] > 0, x[i], 0) + Max(x[i], 0)", ["x[i]"],
     "3 * torch.abs(x) + torch.where(torch.gt(x, 0), x, 0.0) + torch.maximum(x, torch.zeros_like(x))", [_on(0.0, 0.0)]),
]


@pytest.mark.parametrize("equation, inputs, reference, values", half_by_default(TORCH_CONVENTIONS),
                         ids=[case[0] for case in TORCH_CONVENTIONS])
def test_kinks_follow_torch_and_the_spec(tmp_path, equation, inputs, reference, values):
    op, module = generate(tmp_path, equation, inputs, reference)
    check_gradients(op, module, inputs=values, equal_nan=True)


def test_explain_shows_the_value_at_each_kink():
    text = '''
[ops.pick]
inputs = ["a[i]", "b[i]"]
equation = "y[i] = Max(a[i], b[i]) + Max(a[i], 0, tie=0) + Min(a[i], 0, tie=0)"
reference = "torch.maximum(a, b) + a"
'''
    out = render_explanation(explain_op(parse_catalog(text, "kinks.toml").ops[0]))
    assert "a[i] = 0: one formula on both sides: the step cancels and is gone" in out
    assert "a[i] = b[i]: the gradient jumps" in out
    assert "a[i] > b[i]: grad_a[i] = 2*grad_y[i]" in out and "a[i] < b[i]: grad_a[i] = grad_y[i]" in out
    assert "a[i] = b[i]: grad_a[i] = 3*grad_y[i]/2" in out
    assert "a[i] = b[i]: grad_b[i] = grad_y[i]/2" in out
