"""A where() inside a sum stays inside it: in the forward, the gradients and the tangents.

SymPy's Sum() folds a Piecewise to the top of its summand, and into sums nested there: the condition of
where(x[n, k] > 0, ...) ended up outside the only sum that binds k (a backward with w.sum(), a JVP that
could not be planned). A small generator writes specs with a where() inside sums and means that leave a
free index, each with a torch reference composed the same way; the generated backward and the JVP through
`<op>()` must equal autograd / torch.func.jvp of the reference, for equal sizes, size 1 and inputs exactly
on the where() boundaries.
"""

import itertools
import json
import textwrap
from dataclasses import dataclass

import pytest
import torch

from derive.build import render_catalog
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, kink_inputs, load_module, make_inputs

from conftest import half_by_default


@dataclass(frozen=True)
class Where:
    """An elementwise where() of x[n, k] (and the other inputs named in `inputs`), in the spec and in torch."""

    name: str
    inputs: tuple[str, ...]     # declared inputs besides x[n, k]
    equation: str
    torch: str                  # the same value as a tensor shaped (n, k)
    params: str = "{}"          # TOML inline table


@dataclass(frozen=True)
class Reduction:
    """Sums or means around a where() F[n, k] that leave a free index; {F} stands for it."""

    name: str
    inputs: tuple[str, ...]
    equation: str
    torch: str


WHERES = [
    Where("relu", (), "where(x[n, k] > 0, x[n, k], 0)", "torch.where(x.gt(0), x, 0)"),
    Where("pick", ("t[k]",), "where(x[n, k] <= t[k], x[n, k] * t[k], 2 * x[n, k])",
          "torch.where(x.le(t), x * t, 2 * x)"),
    Where("huber", ("t[k]",),
          "where(Abs(x[n, k] - t[k]) < delta, 0.5 * (x[n, k] - t[k])**2, delta * (Abs(x[n, k] - t[k]) - 0.5 * delta))",
          "torch.nn.functional.huber_loss(x, t.expand_as(x), reduction='none', delta=delta)", "{ delta = 0.6 }"),
]

REDUCTIONS = [
    Reduction("nested", ("w[k]", "u[n, m]"), "y[m] = sum(u[n, m] * sum({F} * w[k], k), n)",
              "(u * ({F} * w).sum(-1, keepdim=True)).sum(0)"),
    Reduction("weighted", ("w[k]",), "y[n] = sum({F} * w[k], k)", "({F} * w).sum(-1)"),
    Reduction("mean_rows", (), "y[k] = mean({F}, n)", "{F}.mean(0)"),
    Reduction("logsumexp", (), "y[n] = logsumexp({F}, k)", "torch.logsumexp({F}, -1)"),
]

# where() of two inputs that do not share all their indices, inside their contraction; and the Huber loss
OTHERS = {
    "where_contraction": '''
        inputs = ["x[n, k]", "v[k, m]"]
        equation = "y[n, m] = sum(where(x[n, k] > v[k, m], x[n, k] * v[k, m], v[k, m]), k)"
        reference = "torch.where(x.unsqueeze(-1).gt(v), x.unsqueeze(-1) * v, v).sum(1)"
    ''',
    "huber_loss": '''
        inputs = ["p[n]", "t[n]"]
        params = { delta = 0.7 }
        equation = "loss = mean(where(Abs(p[n] - t[n]) < delta, 0.5 * (p[n] - t[n])**2, delta * (Abs(p[n] - t[n]) - 0.5 * delta)), n)"
        reference = "torch.nn.functional.huber_loss(p, t, delta=delta)"
    ''',
}


def generated_specs() -> dict[str, str]:
    """Each reduction around one where() (in turn: deriving every pair would take SymPy ten seconds), then
    the others: op name -> spec body."""
    specs = {}
    for where, reduction in zip(itertools.cycle(WHERES), REDUCTIONS):
        inputs = ["x[n, k]", *dict.fromkeys(where.inputs + reduction.inputs)]
        specs[f"{where.name}_{reduction.name}"] = textwrap.dedent(f'''
            inputs = {json.dumps(inputs)}
            params = {where.params}
            equation = "{reduction.equation.format(F=where.equation)}"
            reference = "{reduction.torch.format(F=where.torch)}"
        ''')
    return specs | {name: textwrap.dedent(text) for name, text in OTHERS.items()}


SPECS = generated_specs()
# every other spec by default (each where() form still meets a reduction), all under `-m slow` (CI)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name) -> (op, its generated module), each spec derived and written once, on its own."""
    directory = tmp_path_factory.mktemp("where_in_sums")
    made = {}

    def op_and_module(name):
        if name not in made:
            spec = directory / f"{name}.toml"
            spec.write_text(f"[ops.{name}]{SPECS[name]}")
            catalog = parse_catalog(spec.read_text(), str(spec))
            for path, source in render_catalog(catalog, ("contraction",), namespace=f"where_{name}").items():
                (directory / path).write_text(source)
            made[name] = catalog.op(name), load_module(directory / f"{name}.py")
        return made[name]
    return op_and_module


@pytest.mark.parametrize("name", half_by_default(SPECS))
def test_backward_and_jvp_match_the_reference(generated, name):
    op, module = generated(name)
    check_gradients(op, module)
    check_tangents(op, module)


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("name", half_by_default(SPECS))
def test_every_index_of_the_same_size(generated, name, size):
    """n, k and m of one length (a where() moved out of its sum can still broadcast there), and 1."""
    op, module = generated(name)
    sizes = {size_name: size for size_name in dict(op.index_sizes).values()}
    check_gradients(op, module, sizes=sizes)
    check_tangents(op, module, sizes=sizes)


@pytest.mark.parametrize("name", half_by_default(SPECS))
def test_inputs_exactly_on_the_boundary(generated, name):
    """Entries on each where() boundary (x = 0, x - t = ±delta and x = t, x = v), where the branch the
    comparison picks must be the one torch's where() picks."""
    op, module = generated(name)
    placed, placements = kink_inputs(op, make_inputs(op), generator=torch.Generator().manual_seed(1))
    assert placements and all(p.mask.any() for p in placements), placements
    check_gradients(op, module, inputs=placed)
    check_tangents(op, module, inputs=placed, kinks=True)
