import dataclasses
import functools
import inspect
from contextlib import contextmanager
from pathlib import Path

import pytest
import sympy
import torch

import derive.bench
import derive.build
import derive.cli
import derive.testing
from derive.build import STYLE_DIRS, build_op, render_catalog
from derive.cli import main
from derive.derivation import derive as derive_op
from derive.spec import load_catalog
from derive.functions import Tied
from derive.testing import load_module


# The tests compute on small tensors, where a second thread costs more than it saves; and under
# `pytest -n 2` (the README's command) each of the two processes keeps to one of the two cores.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
CATALOG = load_catalog()
OPS = [op.name for op in CATALOG.ops]
STYLES = list(STYLE_DIRS)
# Ops whose equation holds a kink (Max, Min, Abs, where, sign, atan2, x ** p): read off the spec, so that collecting the tests
# derives nothing; test_catalog checks that it agrees with derive.testing.has_kinks.
# A power with a tensor exponent and atan2 count too: their gradients take torch's value where their formula is
# undefined (x == 0, a == b == 0).
KINKS = (sympy.Max, sympy.Min, sympy.Abs, sympy.Piecewise, sympy.sign, sympy.Heaviside, Tied, sympy.atan2)
KINK_OPS = [op.name for op in CATALOG.ops
            if op.rhs.has(*KINKS) or any(not power.exp.is_number for power in op.rhs.atoms(sympy.Pow))]


# derive(op) and build_op(op) depend on the frozen OpSpec alone (test_determinism proves rendering pure):
# tests that read an op's derivation or lowered code share one per op and set of styles in the session.
derivation = functools.cache(derive_op)


@functools.cache
def _built(op, styles) -> object:
    return build_op(op, styles, None)


def built(op, styles=tuple(STYLE_DIRS), budget=None, stage=None):
    """`build_op` shared by the session (one per op and set of styles); the budget is not applied."""
    return _built(op, tuple(styles))


@contextmanager
def shared_builds():
    """Within it, render_catalog builds each op through `built`: a test that renders a spec and then
    inspects the same op's lowered code derives it once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(derive.build, "build_op", built)
        yield


def generated_module(op_name: str, style: str = "contraction"):
    return load_module(GENERATED / STYLE_DIRS[style] / f"{op_name}.py")


@pytest.fixture(params=OPS)
def op(request):
    return CATALOG.op(request.param)


@pytest.fixture(params=STYLES)
def style(request):
    return request.param


# Rendering the built-in catalog takes seconds; render_catalog is pure (test_determinism proves it, in one
# process and across processes), so tests that only need its result share one rendering per argument set.
_RENDERED: dict[tuple, dict[str, str]] = {}


def rendered(*args, **kwargs) -> dict[str, str]:
    """render_catalog(*args, **kwargs), computed once per session for each distinct set of arguments."""
    call = inspect.signature(render_catalog).bind(*args, **kwargs)
    call.apply_defaults()
    key = tuple(call.arguments.items())
    if key not in _RENDERED:
        with shared_builds():
            _RENDERED[key] = render_catalog(*call.args, **call.kwargs)
    return dict(_RENDERED[key])


@pytest.fixture
def render_once(monkeypatch):
    """The command line and the bench render through `rendered`: a test that runs `derive generate` and
    `derive check` five times on the built-in catalog renders it once in the whole session."""
    monkeypatch.setattr(derive.cli, "render_catalog", rendered)
    monkeypatch.setattr(derive.bench, "render_catalog", rendered)


@dataclasses.dataclass
class Completed:
    """What a finished `derive` command gives back, as subprocess.CompletedProcess names it."""
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def derive_cli(capsys, monkeypatch):
    """Run `derive <args>` in this process, in `cwd`: derive.cli.main's exit code, stdout and stderr.
    An argparse error exits with SystemExit, as `python -m derive` would."""

    def run(*args, cwd=ROOT):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return Completed(code, captured.out, captured.err)

    return run
