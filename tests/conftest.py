import dataclasses
import functools
import inspect
from contextlib import contextmanager
from pathlib import Path

import pytest
import sympy

from derive.derivation import derive as derive_op, kinked
from derive.functions import Tied, _Extremum
from derive.naming import MODULE_STYLES, STYLE_DIRS
from derive.pipeline import build_op
from derive.spec import load_catalog

# torch, the renderer and the command line are imported where they are used: under `pytest -n 2` the
# controlling process, which runs no test, imports this file too and need not pay for them.


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests compute on small tensors, where a second thread costs more than it saves; and under
    `pytest -n 2` (the README's command) each of the two processes keeps to one of the two cores."""
    import torch
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
CATALOG = load_catalog()
OPS = [op.name for op in CATALOG.ops]
STYLES = list(STYLE_DIRS)
# Ops whose equation holds a kink (Max, Min, Abs, sign, atan2, a max or min reduction, a where() on values, x ** p):
# read off the spec, so that collecting the tests derives nothing; test_catalog checks that it agrees with
# derive.testing.has_kinks. A power with a tensor exponent and atan2 count too: their gradients take torch's value
# where their formula is undefined (x == 0, a == b == 0). A where() on index positions (k <= t) is no kink.
KINKS = (sympy.Max, sympy.Min, sympy.Abs, sympy.sign, sympy.Heaviside, Tied, sympy.atan2, _Extremum)
KINK_OPS = [op.name for op in CATALOG.ops
            if kinked(op.rhs, op, KINKS) or any(not power.exp.is_number for power in op.rhs.atoms(sympy.Pow))]


# derive(op) and build_op(op) depend on the frozen OpSpec alone (test_determinism proves rendering pure):
# tests that read an op's derivation or lowered code share one per op and set of styles in the session.
derivation = functools.cache(derive_op)


@functools.cache
def _built(op, styles) -> object:
    if styles == tuple(STYLE_DIRS):     # shared with derive.testing's callers (call_backward, the bench)
        from derive.testing import built_op
        return built_op(op)
    return build_op(op, styles, None)


def built(op, styles=tuple(STYLE_DIRS), budget=None, stage=None):
    """`build_op` shared by the session (one per op and set of styles); the budget is not applied."""
    return _built(op, tuple(styles))


@contextmanager
def shared_builds():
    """Within it, render_catalog builds each op through `built`: a test that renders a spec and then
    inspects the same op's lowered code derives it once."""
    import derive.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(derive.build, "build_op", built)
        yield


def first_by_default(params, count: int) -> list:
    """The first `count` of a generated family run by default; the rest are marked `slow` (CI runs them).
    For families where each case is a full derivation and the first cases already cover every shape."""
    return [param if position < count else _slow(param) for position, param in enumerate(params)]


def half_by_default(params) -> list:
    """Every other case of a family run by default (the first, the third, ...), the others marked `slow` (CI runs
    them): for sweeps over many ops or cases where neighbours exercise the same code."""
    return [param if position % 2 == 0 else _slow(param) for position, param in enumerate(params)]


def _slow(param):
    """`param` (a value, a tuple of values or a pytest.param) marked slow."""
    if isinstance(param, type(pytest.param(None))):
        return pytest.param(*param.values, marks=[*param.marks, pytest.mark.slow], id=param.id)
    return pytest.param(*param if isinstance(param, tuple) else (param,), marks=pytest.mark.slow)


# The catalog ops that the torch-integration sweeps (opcheck, torch.compile) take in the default run: one
# per kind of generated code (a matrix product, a batched product, a kink, a fused kernel, an integer gather,
# a loss with the one-hot kernel, a normalization). `-m slow` (CI) runs every op.
REPRESENTATIVE_OPS = [name for name in ("linear", "matmul", "relu", "softmax", "embedding", "cross_entropy",
                                        "layer_norm") if name in OPS]


def representative(names) -> list:
    """Catalog op names, all but REPRESENTATIVE_OPS marked `slow`."""
    return [name if name in REPRESENTATIVE_OPS else pytest.param(name, marks=pytest.mark.slow) for name in names]


def generated_module(op_name: str, style: str = "contraction"):
    from derive.testing import load_module
    return load_module(GENERATED / MODULE_STYLES[style].directory / f"{op_name}.py")


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
    """render_catalog(*args, **kwargs), computed once per session for each distinct set of arguments (the
    progress callback, which each command makes anew, is left out)."""
    from derive.build import render_catalog
    call = inspect.signature(render_catalog).bind(*args, **kwargs)
    call.apply_defaults()
    call.arguments["progress"] = None       # a callback for the terminal: no part of what is rendered
    key = tuple(call.arguments.items())
    if key not in _RENDERED:
        with shared_builds():
            _RENDERED[key] = render_catalog(*call.args, **call.kwargs)
    return dict(_RENDERED[key])


@pytest.fixture
def render_once(monkeypatch):
    """The command line and the bench render through `rendered`: a test that runs `derive generate` and
    `derive check` five times on the built-in catalog renders it once in the whole session."""
    import derive.bench
    import derive.cli
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

    from derive.cli import main

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


def written_specs(directory: Path, specs: dict[str, str], namespace: str):
    """written(name, style) -> (op, module, path) of the spec body `specs[name]` as op `name`, derived and
    written under `directory` once in both styles (the custom ops in namespace `<namespace>_<name>`)."""
    from derive.build import render_catalog
    from derive.spec import parse_catalog
    from derive.testing import load_module
    made = {}

    def written(name, style="contraction"):
        if name not in made:
            catalog = parse_catalog(f"[ops.{name}]\n{specs[name]}", f"{name}.toml")
            for path, source in render_catalog(catalog, ("contraction", "broadcast"),
                                               namespace=f"{namespace}_{name}").items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(source)
            made[name] = catalog.op(name)
        path = directory / (f"{name}.py" if style == "contraction" else f"broadcast/{name}.py")
        return made[name], load_module(path), path
    return written
