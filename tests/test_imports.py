"""derive's modules import one another in one direction: the stages form a line, with no cycle."""

import ast
import functools
import graphlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "derive"


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of derive/ it imports, anywhere in its text (inside functions and
    `if TYPE_CHECKING:` too: an import there is still a dependency)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("derive."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("derive.")}
        graph[module] = imported & modules - {module}
    return graph


def test_the_import_graph_of_derive_has_no_cycle():
    graph = import_graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"derive/ imports in a circle: {' -> '.join(error.args[1])}")


# The stages between parsing and emission: each reads the model, never the parser.
STAGES = ("derivation", "saving", "plan", "lower", "printing", "signature", "contracts", "emit")


@pytest.mark.parametrize("module", STAGES)
def test_no_stage_after_the_parser_imports_it(module):
    """The symbol constructors live in derive.model, which the stages import; the parser is the first stage."""
    assert "spec" not in import_graph()[module]


def test_the_model_imports_only_names():
    """The model reads names and the error type, both modules that import nothing of derive's."""
    assert import_graph()["model"] <= {"naming", "errors"}
    assert not import_graph()["errors"] and not import_graph()["naming"]
