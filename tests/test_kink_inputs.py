"""derive.testing.kink_inputs finds every kink of an op's forward, wherever it lies, and places inputs
exactly on it; verify_op tests there (and with all index sizes equal)."""

import textwrap

import pytest
import torch

from derive.build import render_catalog
from derive.spec import parse_catalog
from derive.testing import kink_inputs, kinks, make_inputs, verify_op

from conftest import half_by_default

SPECS = {
    "floor": ('''
        inputs = ["x[n, k]"]
        params = { lo = 0.3 }
        equation = "y[n, k] = Max(x[n, k], lo)"
        reference = "torch.clamp_min(x, lo)"
     ''', lambda x, lo: x == lo),
    "hinge": ('''
        inputs = ["x[n]"]
        equation = "y[n] = Max(1 - x[n], 0, tie=0)"
        reference = "torch.relu(1 - x)"
     ''', lambda x: x == 1),
    "floor_tied": ('''
        inputs = ["x[n, k]", "lo[k]", "hi[n, k]"]
        equation = "y[n, k] = Min(Max(x[n, k], lo[k], tie=1), hi[n, k], tie=0)"
        reference = "torch.minimum(torch.maximum(x, lo), hi)"
     ''', lambda x, lo, hi: (x == lo) | (torch.maximum(x, lo) == hi)),
    "huber": ('''
        inputs = ["p[n]", "t[n]"]
        params = { delta = 0.7 }
        equation = "loss = mean(where(Abs(p[n] - t[n]) < delta, 0.5 * (p[n] - t[n])**2, delta * (Abs(p[n] - t[n]) - 0.5 * delta)), n)"
        reference = "torch.nn.functional.huber_loss(p, t, delta=delta)"
     ''', lambda p, t, delta: (torch.abs(p - t) == delta) | (p == t)),
    "clamp": ('''
        inputs = ["x[..., k]", "lo[k]", "hi[..., k]"]
        equation = "y[..., k] = Min(Max(x[..., k], lo[k]), hi[..., k])"
        reference = "torch.minimum(torch.maximum(x, lo), hi)"
     ''', lambda x, lo, hi: (x == lo) | (torch.maximum(x, lo) == hi)),
    "softclip": ('''
        inputs = ["x[n]", "s"]
        equation = "y[n] = Max(exp(x[n]), s)"
        reference = "torch.maximum(torch.exp(x), s)"
     ''', lambda x, s: torch.exp(x) == s),
}


def parsed(name, text):
    return parse_catalog(f"[ops.{name}]\n" + textwrap.dedent(text), "kinks.toml").ops[0]


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("seed", range(2))
def test_every_kink_is_found_and_inputs_are_placed_exactly_on_it(name, seed):
    text, on_kink = SPECS[name]
    op = parsed(name, text)
    inputs = make_inputs(op, seed=seed)
    if name == "softclip":
        inputs[1] = torch.tensor(1.7, dtype=torch.float64)
    placed, placements = kink_inputs(op, inputs, generator=torch.Generator().manual_seed(seed))
    # every kink of the equation gets entries, each placed entry is exactly on a kink, nothing else moves
    assert placements and {p.kink for p in placements} == set(kinks(op)), (placements, kinks(op))
    params = {p.name: p.default for p in op.params}
    hits = on_kink(*placed, **params)
    for placement in placements:
        assert placement.mask.any()
        assert hits.expand(placement.mask.shape)[placement.mask].all() if hits.dim() else hits, str(placement)
    for position, tensor in enumerate(op.inputs):
        moved = placed[position] != inputs[position]
        allowed = torch.zeros_like(moved)
        for placement in placements:
            if placement.input == tensor.name:
                allowed |= placement.mask
        assert not (moved & ~allowed).any(), tensor.name


def test_each_kink_is_solved_for_the_input_that_reaches_every_entry():
    op = parsed("clamp", SPECS["clamp"][0])
    _, placements = kink_inputs(op, make_inputs(op))
    assert {str(p.kink.function): (p.input, str(p.solution)) for p in placements} == {
        "Max": ("x", "lo[k]"), "Min": ("hi", "Max(lo[k], x[..., k])")}
    op = parsed("huber", SPECS["huber"][0])
    _, placements = kink_inputs(op, make_inputs(op))
    solutions = {str(p.solution) for p in placements}
    assert solutions & {"delta + t[n]", "-delta + t[n]"} and "t[n]" in solutions


def module_for(tmp_path, name, text):
    spec = tmp_path / "kinks.toml"
    spec.write_text(f"[ops.{name}]\n" + textwrap.dedent(text))
    files = render_catalog(parse_catalog(spec.read_text(), str(spec)), ("contraction",),
                           namespace=f"kinks_{tmp_path.name}".replace("-", "_"))
    module = tmp_path / f"{name}.py"
    module.write_text(files[f"{name}.py"])
    return spec, module


def test_verify_op_passes_on_kinks_away_from_zero(tmp_path):
    for name in ("hinge", "huber"):
        spec, module = module_for(tmp_path, name, SPECS[name][0])
        verify_op(spec, name, module)


def test_verify_op_catches_a_wrong_gradient_on_a_kink_away_from_zero(tmp_path):
    """Max(0, 1 - x) without tie= splits the gradient at x = 1 (x gets -g/2) where torch.relu(1 - x) gives 0:
    inputs at 0 never see it (x = 0 is not a kink), inputs at the solved kink x = 1 do."""
    spec, module = module_for(tmp_path, "hinge", SPECS["hinge"][0].replace("Max(1 - x[n], 0, tie=0)", "Max(0, 1 - x[n])"))
    with pytest.raises(AssertionError, match="grad_x"):
        verify_op(spec, "hinge", module)


# |a| of an argument SymPy can prove >= 0 but that reaches 0: SymPy would rewrite |a| to a, whose derivative at
# a = 0 is not torch.abs's 0 (|Max(p, 0)| at p = 0 took 1/2 of the gradient; the fuzzer found it).
NONNEGATIVE = [("Max(p[n], 0)", "torch.clamp_min(p, 0)"), ("Max(p[n], 0, tie=1)", "torch.clamp_min(p, 0)"),
               ("Max(p[n], 0) * q[n]**2", "torch.maximum(p, torch.zeros_like(p)) * q**2"),
               ("Max(p[n], q[n]**2)", "torch.maximum(p, q**2)")]


@pytest.mark.parametrize("argument, reference", half_by_default(NONNEGATIVE), ids=[a for a, _ in NONNEGATIVE])
def test_the_absolute_value_of_a_nonnegative_argument_has_torchs_derivative_at_zero(tmp_path, argument, reference):
    text = f'''
        inputs = ["p[n]", "q[n]"]
        equation = "y[n] = Abs({argument}) - p[n] * q[n]"
        reference = "torch.abs({reference}) - p * q"
    '''
    spec, module = module_for(tmp_path, "abs_nonnegative", text)
    verify_op(spec, "abs_nonnegative", module)


def test_a_kink_on_a_special_point_is_checked_as_torch_gives_it():
    """|x| ** p with x moved onto Abs's kink, 0, and exponents of both signs: the gradient there is inf or NaN in
    torch too (0 ** -1 is inf); verify_op accepts the generated code's NaN where the reference's is NaN, as it
    does at zeros, instead of calling matching NaNs a mismatch."""
    import derive
    from derive.testing import verify_module

    power = derive.op("y[i] = Abs(x[i]) ** p[i]", inputs=["x[i]", "p[i]"], reference="x.abs() ** p", name="power")
    verify_module(power._built.op, power.module)
