"""Regressions the hunt for wrong gradients on ops outside the catalog found (tests/spec_strategies.index_cases
and ops written by hand), each on the spec that showed it and on variants with equal sizes, size 1 and a length
another input sets. Every case runs the differential fuzzer's oracle (`check_by_hand`): forward, backward, double
backward and JVP against autograd of the reference, in both styles."""

from __future__ import annotations

import pytest
import torch

from test_differential import check_by_hand


def _random(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# The gradient of a pooling spreads grad_y over the windows with conv_transpose1d, whose result was fitted to the
# input's length with output_padding: negative where the windows reach into a `pad` after the input, a stride or
# more where another input sets the number of windows (torch refuses both). It is padded or cropped now.
SPREADS = {
    "windows into the pad after the input": (
        '[ops.fuzzed]\ninputs = ["x[n, l]"]\nequation = "y[n, t] = mean(x[n, 2*t + k], k)"\n'
        'reference = "torch.nn.functional.pad(x, (1, 2))[:, 1:].unfold(1, 1, 2).mean(-1)"\n'
        'sizes = { k = 1 }\npad = { x = { l = [1, 2] } }\n',
        [[_random(2, 1)], [_random(3, 4, seed=1)], [_random(1, 2, seed=2)]]),
    "fewer windows than the input holds": (
        '[ops.fuzzed]\ninputs = ["x[n, l]", "z[n, t]"]\nequation = "y[n, t] = mean(x[n, 2*t + k], k) + z[n, t]"\n'
        'reference = "x[:, :2 * z.shape[1]].unfold(1, 2, 2).mean(-1) + z"\nsizes = { k = 2 }\n',
        [[_random(2, 7), _random(2, 2, seed=1)], [_random(3, 3, seed=2), _random(3, 1, seed=3)],
         [_random(1, 4, seed=4), _random(1, 2, seed=5)]]),
}


@pytest.mark.parametrize("name", ["fewer windows than the input holds",
                                  pytest.param("windows into the pad after the input", marks=pytest.mark.slow)])
def test_a_pooling_gradient_fits_the_input_length(name):
    toml, input_sets = SPREADS[name]
    check_by_hand(toml, input_sets)


def test_a_failure_only_on_kinks_names_the_tie_convention():
    """Max(x, 0) beside the reference torch.clamp_min(x, 0) differs only where x is exactly 0 (Max splits the
    tie, clamp_min passes it; the same for Max(x @ w, 0), where x @ w is 0 at rows of zeros): verify_op says
    where the inputs were and how to state the convention (tie=1)."""
    import derive
    from derive.testing import verify_module

    split = derive.op("y[n] = Max(x[n], 0) * s[n]", inputs=["x[n]", "s[n]"],
                      reference="torch.clamp_min(x, 0) * s", name="split")
    with pytest.raises(AssertionError, match=r"(?s)with inputs (a third|on the kinks).*\(random inputs agree\).*tie=1\) is torch\.clamp_min"):
        verify_module(split._built.op, split.module)


@pytest.mark.slow
def test_a_function_of_a_padded_convolution():
    """tanh(conv1d(x, w, padding=1)): the gradient reads the convolution inside tanh's derivative, where
    lowering looked for leaves in it (it has none: it reads x and w by name) and printing for a tensor to take a
    dtype from (its kernel): internal errors, for every activation after a convolution with padding."""
    toml = ('[ops.fuzzed]\ninputs = ["x[n, c, l]", "w[o, c, k]"]\n'
            'equation = "y[n, o, t] = tanh(sum(x[n, c, t + k - 1] * w[o, c, k], c, k))"\n'
            'pad = { x = { l = 1 } }\nreference = "torch.tanh(torch.nn.functional.conv1d(x, w, padding=1))"\n')
    check_by_hand(toml, [[_random(2, 3, 3), _random(3, 3, 3, seed=1)], [_random(1, 1, 1, seed=2), _random(1, 1, 1, seed=3)],
                         [_random(2, 2, 4, seed=4), _random(3, 2, 2, seed=5)]])


# A subscript with a negative coefficient reads its kernel backwards: the kernel is flipped along its taps, which
# were counted as if the kernel had its out and channel dims already (`w.flip((2,))` of a 1-d w: IndexError).
FLIPPED = {
    "no channels": ('["x[n, l]", "w[k]"]', "y[n, t] = sum(x[n, t - k + 2] * w[k], k)",
                    "torch.nn.functional.conv1d(x.unsqueeze(1), w.flip(0).view(1, 1, -1)).squeeze(1)",
                    [[_random(2, 6), _random(3, seed=1)], [_random(1, 3, seed=2), _random(3, seed=3)]]),
    "channels": ('["x[n, c, l]", "w[o, c, k]"]', "y[n, o, t] = sum(x[n, c, t - k + 2] * w[o, c, k], c, k)",
                 "torch.nn.functional.conv1d(x, w.flip(2))",
                 [[_random(2, 3, 5), _random(3, 3, 3, seed=1)], [_random(1, 1, 3, seed=2), _random(1, 1, 3, seed=3)]]),
}


@pytest.mark.parametrize("name", ["no channels", pytest.param("channels", marks=pytest.mark.slow)])
def test_a_kernel_read_backwards(name):
    inputs, equation, reference, input_sets = FLIPPED[name]
    check_by_hand(f'[ops.fuzzed]\ninputs = {inputs}\nequation = "{equation}"\nreference = "{reference}"\n', input_sets)


def test_an_index_repeated_three_times():
    """a[i, i, i]: the gradient has two masks of positions, where(i == j) and where(i == k); the first was placed
    with the second inside it as its value (a mask that reads no tensor: an internal error). Each is placed in
    turn now, one diag_embed around the other; at sizes 3, 1 and 0."""
    toml = ('[ops.fuzzed]\ninputs = ["a[i, i, i]", "b[i]"]\nequation = "y[i] = exp(a[i, i, i]) * b[i] + sum(a[j, j, j], j)"\n'
            'reference = "torch.exp(a.diagonal().diagonal(0, 0, 1)) * b + a.diagonal().diagonal(0, 0, 1).sum()"\n')
    check_by_hand(toml, [[_random(3, 3, 3), _random(3, seed=1)], [_random(1, 1, 1, seed=2), _random(1, seed=3)],
                         [_random(0, 0, 0), _random(0)]])


def test_a_gather_through_a_window_is_refused_in_one_line():
    """e[idx[n, t + k], d]: a gather whose index is read through a window (an embedding then a convolution) was
    an internal error (the scatter read the window's indices); it is a one-line refusal naming the op now."""
    from derive.model import SpecError
    from derive.pipeline import build_op
    from derive.spec import parse_catalog

    toml = ('[ops.embed_conv]\ninputs = ["e[v, d]", "idx[n, l]", "w[o, d, k]"]\ninteger = ["idx"]\n'
            'equation = "y[n, o, t] = sum(e[idx[n, t + k], d] * w[o, d, k], d, k)"\n')
    with pytest.raises(SpecError) as refused:
        build_op(parse_catalog(toml, "s.toml").ops[0])
    message = str(refused.value)
    assert message.startswith("s.toml:") and "op 'embed_conv'" in message and "\n" not in message
    assert "internal error" not in message, message


def test_abs_of_a_value_sympy_cannot_prove_real():
    """|asin(tanh(p))|: SymPy cannot prove asin(tanh(p)) real, so it differentiated |a| in its complex form,
    (re(a) re(a)' + im(a) im(a)') / |a|, which is 0 / 0 = NaN at a = 0 where torch's gradient is 0 (CI fuzz seed
    99, with p[..., j]). Every value of a spec is real: d|a| = sign(a) a'. At p == 0 exactly, at sizes 3 and 1."""
    toml = ('[ops.fuzzed]\ninputs = ["p[j]"]\nequation = "y[j] = ((1 + (Abs(asin(tanh(p[j]))))**2))**0.5"\n'
            'reference = "torch.pow((1 + (torch.abs(torch.asin(torch.tanh(p)))) ** 2), 0.5)"\n')
    on_zero = _random(3)
    on_zero[1] = 0.0
    check_by_hand(toml, [[on_zero], [torch.zeros(1, dtype=torch.float64)]])


def test_kink_inputs_solve_no_kink_through_a_max_reduction():
    """Max(min(x[n, k], k) - b[n], 0): solved for b, the kink's solution is min(x[n, k], k), a reduction that the
    elementwise evaluation of a solution cannot compute (verify_op raised NameError: name 'amin'). Such a kink is
    left out, as one through a sum is; the others of the op (ties of the min, c = 1) are still placed."""
    from derive.spec import parse_catalog
    from derive.testing import kink_inputs, make_inputs

    toml = ('[ops.shifted]\ninputs = ["x[n, k]", "b[n]", "c[n]"]\n'
            'equation = "y[n] = Max(min(x[n, k], k) - b[n], 0, tie=0) + Abs(c[n] - 1)"\n')
    op = parse_catalog(toml, "s.toml").ops[0]
    placed, placements = kink_inputs(op, make_inputs(op))
    assert sorted(p.input for p in placements) == ["c", "x"]     # c = 1, and ties of x's min over k
    (on_abs,) = [p for p in placements if p.input == "c"]
    assert (placed[2][on_abs.mask] == 1).all()


def test_a_window_extremum_of_a_function_keeps_its_formulas():
    """min(sigmoid(x[n, 2*t + k + 1]), k, tie="first") over a padded input (found by the CI fuzz campaign, seed
    43): what multiplies the share varies along the window (sigmoid's derivative at each position), so no
    scatter_add at the saved positions adds it; the share keeps its formula (an internal error before)."""
    toml = ('[ops.fuzzed]\ninputs = ["x[n, l]"]\nequation = "y[n, t] = min(sigmoid(x[n, 2*t + k + 1]), k, tie=\\"first\\")"\n'
            'reference = "torch.sigmoid(torch.nn.functional.pad(x, (1, 0)))[:, 2:].unfold(1, 2, 2).min(-1)[0]"\n'
            'sizes = { k = 2 }\npad = { x = { l = [1, 0] } }\n')
    tied = torch.tensor([[0.5, 0.5, 0.5, -1.0, -1.0], [2.0, 2.0, -0.5, 0.0, 0.0]], dtype=torch.float64)
    check_by_hand(toml, [[_random(2, 5)], [tied], [_random(1, 6, seed=3)]])


@pytest.mark.parametrize("equation, inputs, reference", [
    ("y[n, f] = x[n, f]", ["x[n, f]"], "x.clone()"),
    pytest.param("y = p", ["p"], "p.clone()", marks=pytest.mark.slow),
    ("y[i, j] = x[j, i]", ["x[j, i]"], "x.T.clone()"),
    pytest.param("y[n, f] = x[n, f] * s[f] + b[f]", ["x[n, f]", "s[f]", "b[f]"], "x * s + b", marks=pytest.mark.slow),
])
def test_a_forward_that_reads_one_input_returns_a_copy(equation, inputs, reference):
    """The identity, a transpose and an op whose variant without its optional inputs is y = x: the forward's code
    is the input or a view of it, which a custom op may not return ("may not alias any inputs"; only a
    diagonal was copied before): verify_op runs the custom op, opcheck and every variant."""
    import derive
    optional = {"optional": {"s": 1, "b": 0}} if "s[f]" in equation else {}
    op = derive.op(equation, inputs=inputs, reference=reference, **optional)
    assert ".clone()" in op.source
    op.verify()


def test_a_step_read_through_windows_is_not_saved_as_a_tensor():
    """|x| read through strided dilated windows, then convolved: the gradient reads sign(x[n, c, 2*t + 2*k]), a
    step that save_steps would save as a tensor over plain indices (an internal error before: an affine read has
    none); it keeps its formula. Inputs on the kink (zeros) and with ties (whole numbers), sizes equal."""
    toml = ('[ops.fuzzed]\ninputs = ["x[n, c, l]", "w[o, c, k]"]\n'
            'equation = "y[n, o, t] = tanh(sum(Abs(x[n, c, 2*t + 2*k]) * w[o, c, k], c, k))"\n'
            'reference = "torch.tanh(torch.nn.functional.conv1d(x.abs(), w, stride=2, dilation=2))"\n')
    on_kinks = torch.tensor([[[0.0, 1.0, -1.0, 0.0, 2.0, 0.0, -2.0, 1.0]] * 2] * 2, dtype=torch.float64)
    check_by_hand(toml, [[_random(2, 2, 8), _random(2, 2, 2, seed=1)], [on_kinks, _random(2, 2, 2, seed=2)]])


@pytest.mark.parametrize("equation, reference", [
    ("y[c] = log(sum(exp(x[..., c]), ...))", "torch.logsumexp(x.reshape(-1, x.shape[-1]), 0)"),
    pytest.param("y[..., c] = exp(x[..., c]) / sum(exp(x[..., c]), ...)",
                 "torch.exp(x) / torch.exp(x).reshape(-1, x.shape[-1]).sum(0)", marks=pytest.mark.slow)])
def test_a_logsumexp_or_softmax_over_the_batch_dims_takes_all_of_them(equation, reference):
    """logsumexp over `...` printed as one dim (`torch.logsumexp(x.T, dim=-1)`, its gradient
    `torch.softmax(x, dim=-2)`) and exp / sum(exp) over `...` rewritten to that softmax: wrong with no batch dim or
    two. The batch dims are flattened into one, and a softmax over them stays exp(a - logsumexp(a))."""
    toml = f'[ops.fuzzed]\ninputs = ["x[..., c]"]\nequation = "{equation}"\nreference = "{reference}"\n'
    check_by_hand(toml, [[_random(3)], [_random(2, 4, 3, seed=1)], [_random(2, 1, seed=2)]])


def test_softmax_over_the_batch_dims_is_refused_in_one_line():
    from derive.spec import parse_catalog
    from derive.errors import SpecError
    with pytest.raises(SpecError, match=r"softmax\(\) over the batch dims '\.\.\.' is not supported"):
        parse_catalog('[ops.a]\ninputs = ["x[..., c]"]\nequation = "y[..., c] = softmax(x[..., c], ...)"\n')


def test_a_shared_value_that_cse_finds_inside_a_power_is_still_computed():
    """sqrt(rp[m]) recurs under other index names (so it is named before cse) and rp[m] ** (-1/2) holds it too:
    cse took the named value whole and left its definition reading itself, `shared_1 = shared_1` in the JVP
    (UnboundLocalError; seed 1043 of the CI campaign)."""
    toml = ('[ops.fuzzed]\ninputs = ["t[v, m]", "g[m, n]", "p[n]", "rp[m]", "q[m]"]\n'
            'equation = "y = sum((cos(atan2(t[g[m, n], m], exp(p[n]))) * sqrt(rp[m]) * sinh(softmax(q[m], m))), m, n)"\n'
            'reference = "(torch.cos(torch.atan2(torch.gather(t, 0, g.T), torch.exp(p).unsqueeze(1))) * '
            'torch.sqrt(rp).unsqueeze(0) * torch.sinh(torch.softmax(q, dim=0)).unsqueeze(0)).sum()"\n'
            'integer = ["g"]\nranges = { rp = [0.5, 2.0] }\n')
    index = torch.tensor([[0, 2], [1, 1], [2, 0]])
    check_by_hand(toml, [[_random(3, 3), index, _random(2, seed=1), _random(3, seed=2).abs() + 0.5,
                          _random(3, seed=3)]])


def test_a_chain_of_functions_of_constants_is_not_saved():
    """exp(sqrt(exp(pi))) inside an op: the fused style saved every chain of more than one function that a
    gradient reads again, this one too, as a tensor with no dims (an internal error, 'Indexed needs at least one
    index'; seed 43 of the CI campaign). A chain without dims costs a few scalar evaluations: it is never saved."""
    toml = ('[ops.fuzzed]\ninputs = ["x[n, k]", "z[n]"]\n'
            'equation = "y[n] = sinh(z[n]) * asinh(atan2(logsumexp(x[n, k], k), exp(sqrt(exp(pi)))))"\n'
            'reference = "torch.sinh(z) * torch.asinh(torch.atan2(torch.logsumexp(x, 1), '
            'torch.exp(torch.sqrt(torch.exp(torch.tensor(torch.pi, dtype=torch.float64))))))"\n')
    check_by_hand(toml, [[_random(4, 2), _random(4, seed=2)], [_random(1, 3, seed=1), _random(1, seed=3)]])
