"""Masks written as a reduction's identity, `where(s <= t, score, -inf)`: the constant `inf` of an equation, and
the reductions (max, min, softmax) whose position index is also a value the mask reads. Each case runs the
differential fuzzer's oracle (`check_by_hand`: forward, backward, double backward and JVP against autograd of
the reference, in both styles) on equal sizes, size 1 and ties; tests/spec_strategies.index_cases draws masked
softmax, logsumexp, max and min of every index comparison."""

from __future__ import annotations

import pytest
import torch

import derive
from derive.spec import parse_catalog
from derive.testing import verify_module
from test_differential import check_by_hand


def _random(*shape, seed=0, whole=False):
    value = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.round(value) if whole else value


def _causal(rows: str, columns: str) -> str:
    """The reference's causal mask of positions: True where the column is after the row."""
    return f"torch.ones({rows}, {columns}, dtype=torch.bool).triu(1)"


CAUSAL_SIZES = {"equal sizes": ((3, 2), (3, 2), (3, 2)), "more keys than queries, one value column": ((2, 3), (4, 3), (4, 1)),
                "size 1": ((1, 1), (1, 1), (1, 2))}


@pytest.mark.slow
@pytest.mark.parametrize("sizes", CAUSAL_SIZES)
def test_causal_attention_masked_with_minus_inf(sizes):
    """softmax over s of a score where s <= t, else -inf (attention's causal mask): what torch's masked_fill
    gives, forward and gradients, with t and s of equal and of different sizes."""
    toml = ('[ops.fuzzed]\ninputs = ["q[t, d]", "k[s, d]", "v[s, e]"]\n'
            'equation = "y[t, e] = sum(softmax(where(s <= t, sum(q[t, d] * k[s, d], d), -inf), s) * v[s, e], s)"\n'
            f'reference = "torch.softmax((q @ k.T).masked_fill({_causal("q.shape[0]", "k.shape[0]")}, -torch.inf), -1)'
            ' @ v"\n')
    check_by_hand(toml, [[_random(*shape, seed=seed) for seed, shape in enumerate(CAUSAL_SIZES[sizes])]])


def test_a_result_that_holds_minus_inf_is_checked_on_its_finite_entries():
    """An op whose result is -inf where masked: gradcheck has no finite difference there (inf - inf), so
    verify_op checks the finite entries by gradcheck and the masked ones against autograd of the reference."""
    scores = derive.op("y[t, s] = where(s <= t, sum(q[t, d] * k[s, d], d), -inf)", inputs=["q[t, d]", "k[s, d]"],
                       reference=f"(q @ k.T).masked_fill({_causal('q.shape[0]', 'k.shape[0]')}, -torch.inf)",
                       name="causal_scores")
    verify_module(scores._built.op, scores.module)
    assert "-torch.inf" in scores.source


@pytest.mark.parametrize("reduction, fill, torch_reduction",
                         [("max", "-inf", "amax"), pytest.param("min", "inf", "amin", marks=pytest.mark.slow)])
def test_a_running_extremum_through_a_mask(reduction, fill, torch_reduction):
    """max over s <= t of x[n, s] (a running max, ties split as amax) and min over s >= t, on whole numbers."""
    relation = "<=" if reduction == "max" else ">="
    mask = "tril" if reduction == "max" else "triu"
    toml = ('[ops.fuzzed]\ninputs = ["x[n, s]"]\n'
            f'equation = "y[n, t] = {reduction}(where(s {relation} t, x[n, s], {fill}), s)"\n'
            f'reference = "torch.where(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).{mask}(), '
            f'x.unsqueeze(1), {"-" if fill == "-inf" else ""}torch.inf).{torch_reduction}(-1)"\n')
    check_by_hand(toml, [[_random(2, 4, whole=True)], [_random(3, 1)], [_random(1, 3, seed=1, whole=True)]])


def test_a_reduction_over_an_index_no_input_declares():
    """max(x[n, k], k) where every input declares t, not k: k is the reduction's index (it was read as a
    value, 'index k is a position, not a value')."""
    catalog = parse_catalog('[ops.a]\ninputs = ["q[n, t]", "v[n, t]"]\n'
                            'equation = "y[n, t] = max(sin(q[n, k]) * v[n, t], k)"\n')
    assert str(catalog.op("a").rhs).startswith("amax(")


def test_a_mask_of_equal_positions_inside_a_max():
    """max over k of where(k == t, f(q[n, k]) * v[n, t], -inf): the only entry is k = t. Placing the mask's
    diagonal replaced k by t inside the max's comparison, which then compared along t (`a == a.amax(-1)` of
    the diagonal) instead of along k."""
    toml = ('[ops.fuzzed]\ninputs = ["q[n, t]", "v[n, t]"]\n'
            'equation = "y[n, t] = max(where(k == t, sigmoid(q[n, k]) * v[n, t], -inf), k)"\n'
            'reference = "(torch.sigmoid(q).unsqueeze(1) * v.unsqueeze(2)).masked_fill(torch.logical_not('
            'torch.eye(q.shape[1], dtype=torch.bool)), -torch.inf).amax(2)"\n')
    check_by_hand(toml, [[_random(3, 2, whole=True), _random(3, 2, seed=1, whole=True)],
                         [_random(2, 3), _random(2, 3, seed=1)]])


def test_inf_is_yours_when_you_name_an_input_so():
    """`inf` is the constant only when no input is named so, as `pi`."""
    catalog = parse_catalog('[ops.a]\ninputs = ["x[i]", "inf[i]"]\nequation = "y[i] = x[i] * inf[i]"\n')
    assert "inf[i]" in str(catalog.op("a").rhs)
