"""`pytest --derive`: derive's own verification of a project's catalog, one test item per op.

With the catalog named in [tool.derive] of the project's pyproject.toml (as `derive check` finds it), the run
gains a `verify[<op>]` item per op, which runs `derive.testing.verify_op` on each generated module of that op,
and a `check` item, which fails as `derive check` does when a generated file is stale, missing or left over.
Registered through the `pytest11` entry point; without --derive it adds nothing, and importing it loads
neither SymPy nor torch.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest


def pytest_addoption(parser) -> None:
    parser.getgroup("derive").addoption(
        "--derive", action="store_true",
        help="verify every op of the catalog in [tool.derive] against autograd of its reference (verify_op) "
             "and check that its generated files are current (derive check)")


@pytest.hookimpl(tryfirst=True)     # before -k and -m deselect: they apply to these items too
def pytest_collection_modifyitems(session, config, items) -> None:
    if not config.getoption("derive"):
        return
    from .cli import configured
    from .errors import SpecError
    try:
        arguments = configured("check", Path.cwd())
    except SpecError as error:
        raise pytest.UsageError(f"--derive: {error}") from None
    from .naming import default_catalog_path
    spec = Path(arguments.spec) if arguments.spec is not None else default_catalog_path()
    catalog = Catalog.from_parent(session, path=spec.resolve(), arguments=arguments)
    items[:0] = list(session.genitems(catalog))     # reported as collected, as pytest's own collectors are


class Catalog(pytest.File):
    """The catalog [tool.derive] names: an item per op, and the check of its generated files."""

    def __init__(self, *, arguments, **kwargs):
        super().__init__(**kwargs)
        self.arguments = arguments     # `derive check`'s, as configured

    def collect(self):
        from .spec import load_catalog
        for op in load_catalog(self.arguments.spec).ops:
            yield VerifyItem.from_parent(self, name=f"verify[{op.name}]", op=op.name)
        yield CheckItem.from_parent(self, name="check")

    def repr_failure(self, excinfo):
        from .errors import SpecError
        return str(excinfo.value) if excinfo.errisinstance(SpecError) else super().repr_failure(excinfo)


class _Item(pytest.Item):
    def reportinfo(self):
        return self.path, None, self.name

    def repr_failure(self, excinfo):
        from .errors import SpecError
        if excinfo.errisinstance((SpecError, CheckFailed)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class VerifyItem(_Item):
    """verify_op on each generated module of one op."""

    def __init__(self, *, op: str, **kwargs):
        super().__init__(**kwargs)
        self.op = op

    def runtest(self) -> None:
        from . import naming
        from .cli import _styles
        from .testing import verify_op
        arguments = self.parent.arguments
        for style in _styles(arguments):
            module = Path(arguments.out) / (naming.STYLE_DIRS[style] + naming.module_file(self.op))
            if not module.is_file():
                raise CheckFailed(f"{module} is missing: run `derive generate`")
            verify_op(arguments.spec, self.op, module)


class CheckItem(_Item):
    """`derive check`: the generated files are what the catalog renders to now."""

    def runtest(self) -> None:
        from .cli import _check
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = _check(self.parent.arguments)
        if status != 0:
            raise CheckFailed(output.getvalue().strip())


class CheckFailed(Exception):
    """A failure whose message says all (no traceback)."""
