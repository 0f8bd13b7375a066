"""`derive bench --quick`: its table, the gradients it compares, and its memory measure. No timing assertions."""

import dataclasses
import functools
import random

import pytest
import torch

from derive import bench
from derive.spec import load_catalog

from conftest import GENERATED, OPS, ROOT, STYLES, derivation, first_by_default, shared_builds

QUICK = bench.SIZE_PRESETS["quick"]
ROWS = [*OPS, bench.SEED_NETWORK, f"{bench.SEED_NETWORK}, {bench.HANDWRITTEN}", bench.MLP]
catalog = functools.cache(load_catalog)


@pytest.fixture(autouse=True)
def each_op_derived_once(monkeypatch):
    """Each `bench.cases` call parses the catalog and derives every op of it; these tests call it ten
    times: they share one parse and one derivation per op (both depend on the catalog's text alone)."""
    monkeypatch.setattr(bench, "load_catalog", catalog)
    monkeypatch.setattr(bench, "derive", derivation)


# The whole quick bench in each style under `-m slow` (CI); by default the contraction style's bench of a
# kink, a fused loss kernel and the seed network (test_every_contender_computes_autograds_gradients builds and
# checks every case, and test_cli_bench_quick runs the broadcast style's whole bench).
@pytest.mark.parametrize("style, only", first_by_default(
    [("contraction", ("relu", "cross_entropy", bench.SEED_NETWORK)), *((style, ()) for style in STYLES)], 1))
def test_quick_bench_has_a_row_per_op_and_the_seed_network(style, only, render_once):
    with shared_builds():     # its `derive generate` timing renders the catalog: from the session's builds
        report = bench.run_bench(quick=True, style=style, generated_dir=GENERATED, only=only)
    rows = [row for row in ROWS if not only or row.split(",")[0] in only]
    assert [row.case for row in report.rows] == rows
    assert all(row.seconds > 0 and row.autograd_seconds > 0 for row in report.rows)
    text = bench.format_report(report)
    assert all(case in text for case in rows)
    assert "generated / hand-written" in text and "derive generate" in text


@pytest.mark.parametrize("style", STYLES)
def test_every_contender_computes_autograds_gradients(style):
    for case in bench.cases(style, QUICK, GENERATED):
        expected = case.contenders[bench.AUTOGRAD]()
        for name, contender in case.contenders.items():
            actual = contender()
            assert len(actual) == len(expected), (case.name, name)
            for got, want in zip(actual, expected):
                assert got.abs().max() > 0, f"{case.name} ({name}): an all-zero gradient would prove nothing"
                torch.testing.assert_close(got, want)


def test_verify_refuses_a_contender_that_computes_something_else():
    case, = bench.cases("contraction", QUICK, GENERATED, only=[bench.SEED_NETWORK])
    generated = case.contenders[bench.GENERATED]
    wrong = dataclasses.replace(case, contenders={**case.contenders,
                                                  bench.GENERATED: lambda: [2 * g for g in generated()]})
    bench.verify(case)
    with pytest.raises(AssertionError, match="seed network"):
        bench.verify(wrong)


def test_peak_memory_sees_the_broadcast_intermediate():
    def linear_peak(style):
        case, = bench.cases(style, QUICK, GENERATED, only=["linear"])
        return bench.peak_bytes(case.contenders[bench.GENERATED])

    n, k, m = QUICK["n"], QUICK["k"], QUICK["m"]
    assert linear_peak("contraction") < n * k * m * 4 <= linear_peak("broadcast")
    assert bench.peak_bytes(lambda: [torch.ones(1000, dtype=torch.float32)]) >= 4000


def test_cli_bench_quick(derive_cli, render_once):
    result = derive_cli("bench", "--quick", "--style", "broadcast", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert all(case in result.stdout for case in ROWS)
    bad = derive_cli("bench", "--sizes", "huge", cwd=ROOT)
    assert bad.returncode == 2 and "unknown size preset" in bad.stderr


def test_only_the_named_cases_are_built():
    cases = bench.cases("contraction", QUICK, GENERATED, only=["relu", bench.SEED_NETWORK])
    assert [case.name for case in cases] == ["relu", bench.SEED_NETWORK]
    assert [case.name for case in bench.cases("contraction", QUICK, GENERATED, only=["mse"])] == ["mse"]


def test_the_timed_checks_are_the_call_the_backward_makes():
    """Each op case times its module's shape-check call on the arguments its backward passes, and the
    report shows it on the op's row; a contract broken in those arguments makes that call raise."""
    cases = bench.cases("contraction", QUICK, GENERATED)
    op_cases = [case for case in cases if case.name not in (bench.SEED_NETWORK, bench.MLP)]
    assert [case.name for case in op_cases] == OPS and all(case.checks for case in op_cases)
    for case in op_cases:
        assert case.checks() is None
    report = bench.Report("contraction", 1, 0, tuple(bench.measure(op_cases[0], 1, 0, random.Random(0))), 0.0)
    (row,) = report.rows
    assert row.check_seconds > 0 and "checks share" in bench.format_report(report)


def test_recorded_checks_replay_the_arguments_given():
    seen = []

    class Module:
        @staticmethod
        def _check_op_shapes(x, *, grad_y=None):
            seen.append((x, grad_y))

    x, grad_y = torch.ones(2, 3), torch.ones(2, 3)
    replay = bench._recorded_checks(Module, "_check_op_shapes", lambda: Module._check_op_shapes(x, grad_y=grad_y))
    replay()
    assert len(seen) == 2 and seen[1][0] is x and seen[1][1] is grad_y
