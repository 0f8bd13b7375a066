"""Hostile inputs: exact ties of several arguments, non-finite upstream gradients, size-0 dims, infinities.

Each test runs the differential fuzzer's own oracle (`test_differential.check`, through `check_by_hand`):
forward, backward with exact shapes, double backward and JVP in both styles, against autograd of the spec's
torch reference in float64, on inputs written by hand. The default run takes the first case of each family
that is cheap to derive (the nested Max/Min tie, the double transpose, the masked tensor power); `-m slow`
runs the rest (the shared tie at ±inf, the logsumexp and the mean over nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import first_by_default
from derive.testing import autograd_gradients, call_backward, reference
from test_differential import check_by_hand

INF = float("inf")


def _tensor(*values):
    return torch.tensor(values, dtype=torch.float64)


def _tied(count: int, size: int, seed: int) -> list[torch.Tensor]:
    """`count` inputs of `size` entries that tie in every pattern: all equal, two of them equal, none."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(size, generator=generator, dtype=torch.float64) for _ in range(count)]
    for position in range(size):
        pattern = position % (count + 2)
        if pattern == 0:                      # all tie
            for t in tensors[1:]:
                t[position] = tensors[0][position]
        elif pattern <= count:                # all but one tie, the odd one above or below
            odd = pattern - 1
            for k, t in enumerate(tensors):
                if k != odd:
                    t[position] = tensors[(odd + 1) % count][position]
    return tensors


# (equation, torch reference, inputs): nests of Max/Min that SymPy would flatten (Max(Max(a, b), c) is
# Max(a, b, c) to it) or absorb (Max(a, Min(a, b)) is a), and Max/Min of three arguments written at once
NESTS = [
    ("Max(Max(a[i], b[i]), c[i])", "torch.maximum(torch.maximum(a, b), c)", "abc"),
    ("Max(a[i], Max(b[i], c[i]))", "torch.maximum(a, torch.maximum(b, c))", "abc"),
    ("Min(Min(a[i], b[i]), c[i])", "torch.minimum(torch.minimum(a, b), c)", "abc"),
    ("Max(a[i], b[i], c[i])", "torch.maximum(torch.maximum(a, b), c)", "abc"),
    ("Min(c[i], Max(a[i], Min(b[i], c[i])))", "torch.minimum(c, torch.maximum(a, torch.minimum(b, c)))", "abc"),
    ("Max(a[i], Min(a[i], b[i]))", "torch.maximum(a, torch.minimum(a, b))", "ab"),
    # the fuzzer's example: a tie of q - r with p and q where r == 0
    ("Max(q[i] - r[i], Max(p[i], q[i]))", "torch.maximum(q - r, torch.maximum(p, q))", "pqr"),
    ("sin(Max(Max(a[i], 0), b[i]))", "torch.sin(torch.maximum(torch.maximum(a, torch.zeros_like(a)), b))", "ab"),
]


@pytest.mark.parametrize("equation, torch_reference, names", first_by_default(NESTS, 1), ids=[n[0] for n in NESTS])
def test_nested_max_min_split_a_tie_at_each_level_as_torch_does(equation, torch_reference, names):
    """nested_max_min_exact_ties: SymPy flattened Max(Max(a, b), c) into Max(a, b, c), whose derivative gives
    every tied argument half the gradient (3/2 in all at a three-way tie) where torch.maximum's nest gives
    a and b a quarter each and c a half. A Max/Min keeps the nesting it is written with; three arguments
    nest from the left."""
    toml = (f'[ops.fuzzed]\ninputs = [{", ".join(f"{chr(34)}{n}[i]{chr(34)}" for n in names)}]\n'
            f'equation = "y[i] = {equation}"\nreference = "{torch_reference}"\n')
    input_sets = [_tied(len(names), 12, 0), _tied(len(names), 1, 1), _tied(len(names), 0, 2)]
    if "r" in names:     # the tie q - r == q where r == 0, and q == p
        for inputs in input_sets:
            p, q, r = inputs
            r.zero_()
            p.copy_(q)
    if "a" in names and equation.startswith("sin"):     # a on 0 (the inner kink) and b == 0 too
        for inputs in input_sets:
            inputs[0][::2] = 0.0
            inputs[1][::3] = 0.0
    check_by_hand(toml, input_sets, placed="three-way ties")


# (spec, reference): the broadcast style lines up a shared value read transposed (`shared_0[k, n]`) and an
# elementwise factor printed in its own order, both in the product's order
TRANSPOSED_READS = [
    ("y[n] = sum(exp(x[n, k]) * w[k], k)", "(torch.exp(x) * w).sum(1)", '"x[n, k]", "w[k]"'),
    ("y[m, k] = sum(w[m, n] * tanh(x[n, k] * v[k]), n)", "w @ torch.tanh(x * v)", '"x[n, k]", "v[k]", "w[m, n]"'),
]


@pytest.mark.parametrize("equation, torch_reference, inputs", first_by_default(TRANSPOSED_READS, 1), ids=[t[0] for t in TRANSPOSED_READS])
def test_a_double_transpose_cancels(equation, torch_reference, inputs):
    """`.T.T`: a leaf printed transposed (`shared_0.T`, for the term's operand order) was transposed again to
    line up in the product (`shared_0.T.T`), and an elementwise leaf printed as `f(x.T * v.unsqueeze(-1)).T`.
    Permutations compose (`Code.unpermuted`), and a product's elementwise factors print in its own order."""
    toml = f'[ops.fuzzed]\ninputs = [{inputs}]\nequation = "{equation}"\nreference = "{torch_reference}"\n'
    shapes = {"x": (3, 3), "w": (3,) if "w[k]" in inputs else (3, 3), "v": (3,)}
    generator = torch.Generator().manual_seed(0)
    names = re.findall(r'"(\w+)\[', inputs)
    _, modules = check_by_hand(toml, [[torch.randn(shapes[n], generator=generator, dtype=torch.float64)
                                       for n in names]])
    for module in modules.values():
        code = Path(module.__file__).read_text()
        assert not re.search(r"\.(T|mT)\.(T|mT)\b", code), code


EMPTY_LOGSUMEXP = [
    ("Max(logsumexp(x[n, k], k), w[n])", "torch.maximum(torch.logsumexp(x, 1), w)"),
    ("exp(logsumexp(x[n, k], k)) * w[n]", "torch.exp(torch.logsumexp(x, 1)) * w"),
    ("Max(logsumexp(x[n, k], k), 0) * w[n]", "torch.maximum(torch.logsumexp(x, 1), torch.zeros_like(w)) * w"),
]


@pytest.mark.slow
@pytest.mark.parametrize("equation, torch_reference", EMPTY_LOGSUMEXP, ids=[e[0] for e in EMPTY_LOGSUMEXP])
def test_a_logsumexp_over_nothing_reaches_a_finite_output(equation, torch_reference):
    """inf * 0 at size 0: a logsumexp over a size-0 dim is -inf, and Max/exp make the output finite again.
    derive's gradients and tangents are autograd's (the empty sum's 0 for x, none of -inf's NaN); torch's
    own forward mode is NaN there (its logsumexp jvp over nothing), so the oracle takes the tangent from
    reverse mode where torch's forward mode is NaN (test_differential.check)."""
    toml = (f'[ops.fuzzed]\ninputs = ["x[n, k]", "w[n]"]\nequation = "y[n] = {equation}"\n'
            f'reference = "{torch_reference}"\n')
    generator = torch.Generator().manual_seed(0)
    input_sets = [[torch.zeros(n, 0, dtype=torch.float64), torch.randn(n, generator=generator, dtype=torch.float64)]
                  for n in (3, 1, 0)]
    input_sets.append([torch.randn(2, 2, generator=generator, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])
    check_by_hand(toml, input_sets, placed="a size-0 logsumexp")


@pytest.mark.slow
def test_a_mean_over_an_empty_broadcast_batch():
    """mean over a size-0 `...` that broadcasts between inputs: 1 / size is inf there; it met the other input
    before the expansion to the (empty) batch shape, or the empty sum's 0 after it (NaN in the gradient of
    s and in the double backward, where autograd has 0). The numbers scale the expanded gradient now."""
    toml = ('[ops.fuzzed]\ninputs = ["x[...]", "s[...]"]\nequation = "y = mean(x[...] * s[...], ...)"\n'
            'reference = "(x * s).mean()"\n')
    generator = torch.Generator().manual_seed(0)
    shapes = [((0,), (1,)), ((2, 0), (2, 1)), ((0,), (0,)), ((3,), (1,)), ((1,), (1,))]
    check_by_hand(toml, [[torch.randn(a, generator=generator, dtype=torch.float64),
                          torch.randn(b, generator=generator, dtype=torch.float64)] for a, b in shapes])


# (spec, reference): a Max/Min whose tie share is neither 0, 1/2 nor 1, against a tensor and against a number
SHARED_TIES = [
    ("Max(a[i], b[i], tie=0.25)", "0.25 * torch.clamp_min(a, b) + 0.75 * torch.clamp_min(b, a)"),
    ("Min(a[i], 0.5, tie=0.75) * b[i]",
     "(0.75 * torch.clamp_max(a, 0.5) + 0.25 * torch.clamp_max(torch.full_like(a, 0.5), a)) * b"),
]


@pytest.mark.parametrize("equation, torch_reference", first_by_default(SHARED_TIES, 0), ids=[s[0] for s in SHARED_TIES])
def test_a_shared_tie_is_infinite_where_its_arguments_are(equation, torch_reference):
    """lerp at ±inf: Max(a, b, tie=t) was printed as torch.lerp(clamp_min(a, b), clamp_min(b, a), 1 - t), two
    tensors of the same value whose difference is inf - inf = NaN where the max is ±inf: a NaN forward (and
    gradient) where torch's ops give ±inf. It is their weighted sum now, whose autograd splits the same way."""
    toml = (f'[ops.fuzzed]\ninputs = ["a[i]", "b[i]"]\nequation = "y[i] = {equation}"\n'
            f'reference = "{torch_reference}"\n')
    values = torch.tensor([INF, -INF, INF, -INF, 0.5, 1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    others = torch.tensor([INF, -INF, -INF, INF, 0.5, 1.0, INF, -INF, 3.0], dtype=torch.float64)
    check_by_hand(toml, [[values, others], [values[:1], others[:1]], [values[:0], others[:0]]],
                  placed="ties and infinities")


# (spec, reference, declared inputs): a power with a tensor exponent, alone, beside other factors, in a
# contraction and under a function
TENSOR_POWERS = [
    ("y[i] = x[i] ** p[i]", "torch.pow(x, p)", {"x": "i", "p": "i"}),
    ("y[n] = sum(x[n, k] ** p[k] * w[k], k)", "(torch.pow(x, p) * w).sum(1)", {"x": "n, k", "p": "k", "w": "k"}),
    ("y[m, k] = sum(w[m, n] * tanh(x[n, k] ** p[k]), n)", "w @ torch.tanh(torch.pow(x, p))",
     {"x": "n, k", "p": "k", "w": "m, n"}),
]


@pytest.mark.parametrize("equation, torch_reference, declared", first_by_default(TENSOR_POWERS, 1),
                         ids=[t[0] for t in TENSOR_POWERS])
def test_a_tensor_power_masks_its_whole_product_where_the_exponent_is_0(equation, torch_reference, declared):
    """pow at p == 0 with a non-finite upstream gradient: torch's pow backward is where(p == 0, 0, grad * p *
    x**(p - 1)), 0 whatever grad is; derive wrote where(p == 0, 0, p * x**(p - 1)) * grad, NaN where grad is
    ±inf or NaN. The whole product (and the tangent's) is masked now, in both styles."""
    toml = "\n".join(["[ops.fuzzed]", "inputs = [" + ", ".join(f'"{n}[{i}]"' for n, i in declared.items()) + "]",
                      f'equation = "{equation}"', f'reference = "{torch_reference}"', "ranges = { x = [0.0, 2.0] }", ""])
    generator = torch.Generator().manual_seed(0)
    sizes = {"i": 6, "n": 3, "k": 6, "m": 2}
    inputs = [torch.rand(tuple(sizes[i] for i in indices.split(", ")), generator=generator, dtype=torch.float64)
              for indices in declared.values()]
    x, p = inputs[0], inputs[1]
    p += 1                           # exponents below 1 have infinite slopes at 0, another matter
    x.view(-1)[::2] = 0.0            # the base 0 and the exponent 0, together and apart
    p.view(-1)[:4] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    op, modules = check_by_hand(toml, [inputs], placed="zeros in x and p")
    ref = reference(op)
    output = ref(*inputs)
    hostile = torch.tensor([INF, float("nan"), -INF, 1.0], dtype=torch.float64).repeat(output.numel() + x.numel())
    grad_y = hostile[:output.numel()].view(output.shape)
    want = autograd_gradients(ref, inputs, grad_y, [True] * len(inputs))
    tangents = [torch.zeros_like(t) for t in inputs]
    tangents[0] = hostile[:x.numel()].view(x.shape)
    _, want_tangent = torch.func.jvp(ref, tuple(inputs), tuple(tangents))
    for module in modules.values():
        got = call_backward(op, module, grad_y, inputs, output)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True)
        _, got_tangent = torch.func.jvp(getattr(module, op.name), tuple(inputs), tuple(tangents))
        torch.testing.assert_close(got_tangent, want_tangent, equal_nan=True)
