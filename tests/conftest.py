import dataclasses
import inspect
from pathlib import Path

import pytest

import derive.bench
import derive.cli
import derive.testing
from derive.build import STYLE_DIRS, render_catalog
from derive.cli import main
from derive.spec import load_catalog
from derive.testing import has_kinks, load_module


ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
CATALOG = load_catalog()
OPS = [op.name for op in CATALOG.ops]
STYLES = list(STYLE_DIRS)
KINK_OPS = [op.name for op in CATALOG.ops if has_kinks(op)]


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
