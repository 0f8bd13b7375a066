"""Bounded work and no traceback on any input: the limits on reading, the derivation budget, output that
does not depend on the terminal, and the command line's answers to mistyped names and paths."""

import contextlib
import io
import os
import shlex
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest
import sympy
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sympy.printing.pretty.pretty_symbology import pretty_use_unicode

from derive import explain
from derive.build import render_catalog
from derive.cli import Progress, main
from derive.naming import namespace_problem, spec_namespace
from derive.model import SpecError
from derive.pipeline import build_op
from derive.reading import MAX_TOML_BYTES
from derive.spec import load_catalog, parse_catalog
from derive.stamp import header
from derive.testing import load_module

ONE_OP = textwrap.dedent('''
    [ops.tanh_act]
    inputs = ["x[b, f]"]
    equation = "y[b, f] = tanh(x[b, f])"
    reference = "torch.tanh(x)"
''')


def nested_softmax(levels: int) -> str:
    equation = "x[n, m]"
    for _ in range(levels):
        equation = f"softmax({equation}, m)"
    return f'[ops.deep]\ninputs = ["x[n, m]"]\nequation = "y[n, m] = {equation}"\nreference = "x"\n'


def run(argv, stdout=None):
    """main(argv) in this process: (status, stdout, stderr)."""
    out, err = stdout or io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue() if stdout is None else "", err.getvalue()


# --- reading -----------------------------------------------------------------------------------

def test_a_byte_order_mark_is_accepted(tmp_path):
    spec = tmp_path / "bom.toml"
    spec.write_bytes(b"\xef\xbb\xbf" + ONE_OP.encode())
    assert [op.name for op in load_catalog(spec).ops] == ["tanh_act"]


def test_a_spec_is_read_only_up_to_its_size_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("big.toml").write_bytes(b"#" * (MAX_TOML_BYTES + 1))
    message = f"derive: error: {{}}: spec file is larger than the limit of {MAX_TOML_BYTES} bytes\n"
    assert run(["check", "--spec", "big.toml", "--out", "out"]) == (2, "", message.format("big.toml"))
    if os.path.exists("/dev/zero"):     # endless: only a bounded read ends
        assert run(["generate", "--spec", "/dev/zero", "--out", "out"]) == (2, "", message.format("/dev/zero"))
    assert not Path("out").exists()


def test_a_deeply_nested_pyproject_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.other]\nx = " + "[" * 3000 + "]" * 3000 + "\n")
    monkeypatch.chdir(tmp_path)
    assert run(["check"]) == (2, "", "derive: error: pyproject.toml: TOML nested too deeply (arrays or inline "
                                     "tables inside each other)\n")


# --- the derivation budget ---------------------------------------------------------------------

def test_a_derivation_over_its_budget_stops_with_one_line():
    op = parse_catalog(nested_softmax(3), "deep.toml").ops[0]
    with pytest.raises(SpecError) as error:
        build_op(op, budget=0.05)
    assert str(error.value) == (
        "deep.toml: op 'deep': derivation exceeded 0.05 s of CPU time (while deriving the gradients; the "
        "equation's reductions nest 3 deep in 8 operations); simplify it, or raise the budget with --budget or "
        "[tool.derive] budget")
    assert build_op(op, budget=None).op is op       # the same op within its budget is fine: the timer is gone


def test_the_budget_covers_rendering_too(monkeypatch):
    """An op's whole turn is bounded: its modules and its explanation (SymPy's printers) as well."""
    import time

    import derive.build

    def slow_explain(built):
        start = time.process_time()
        while time.process_time() - start < 4:
            pass
        return None

    monkeypatch.setattr(derive.build, "explain", slow_explain)
    with pytest.raises(SpecError, match=r"^tanh.toml: op 'tanh_act': derivation exceeded 2 s of CPU time \(while "
                                        r"rendering the modules and the derivations document; "):
        derive.build.render_catalog(parse_catalog(ONE_OP, "tanh.toml"), budget=2)


def test_the_budget_is_set_by_flag_and_by_pyproject(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("deep.toml").write_text(nested_softmax(3))
    code, out, err = run(["generate", "--spec", "deep.toml", "--out", "out", "--budget", "0.05"])
    assert (code, out) == (2, "") and "derivation exceeded 0.05 s of CPU time" in err and err.count("\n") == 1
    Path("pyproject.toml").write_text('[tool.derive]\nspec = "deep.toml"\nbudget = 0.05\n')
    code, out, err = run(["check"])
    assert (code, out) == (2, "") and "derivation exceeded 0.05 s of CPU time" in err and err.count("\n") == 1
    Path("pyproject.toml").write_text('[tool.derive]\nbudget = "soon"\n')
    assert run(["check"]) == (2, "", "derive: error: pyproject.toml: [tool.derive]: 'budget' must be a positive "
                                     "number of seconds\n")
    assert not Path("out").exists()


# --- output that does not depend on the terminal ----------------------------------------------------

def test_explain_draws_the_same_whatever_the_terminal_can_show():
    n = sympy.Idx("n", sympy.Symbol("size_n"))
    expr = sympy.Sum(sympy.IndexedBase("x")[n] ** 2, (n, 0, n.upper))
    previous = pretty_use_unicode(False)    # what SymPy picks for a stdout that cannot encode unicode
    try:
        ascii_terminal = explain._pretty(expr)
    finally:
        pretty_use_unicode(previous)
    assert ascii_terminal == explain._pretty(expr) and "╲" in ascii_terminal


def test_explain_writes_to_an_ascii_stdout():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    code, _, err = run(["explain", "mse"], stdout=stream)
    stream.flush()
    text = stream.buffer.getvalue().decode("ascii")
    assert (code, err) == (0, "") and "\\u2572" in text and text.startswith("mse: loss = ")


# --- the command line's answers to mistakes ---------------------------------------------------------

def test_version(capsys):
    from derive import __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"derive {__version__}\n"


def test_an_unknown_op_gets_a_suggestion():
    code, _, err = run(["explain", "relux"])
    assert (code, err) == (2, "derive: error: ops.toml: no op named 'relux'; did you mean 'relu'?\n")


def test_an_unknown_command_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["genrate"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("derive: error: unknown command 'genrate'; did you mean 'generate'?\n")


def test_an_empty_output_directory_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--out", ""])
    assert exit_.value.code == 2 and "the output directory must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_regenerate_command_quotes_paths():
    _, command = header("my specs/ops.toml", "out dir", "derive")
    assert command == "derive generate --spec 'my specs/ops.toml' --out 'out dir'"
    assert shlex.split(command)[3:] == ["my specs/ops.toml", "--out", "out dir"]


def test_check_finds_the_project_from_a_subdirectory(tmp_path, monkeypatch):
    (tmp_path / "ops.toml").write_text(ONE_OP)
    (tmp_path / "pyproject.toml").write_text('[tool.derive]\nspec = "ops.toml"\nstyle = "contraction"\n')
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert run(["generate"])[0] == 0
    monkeypatch.chdir(tmp_path / "src" / "pkg")
    assert run(["check"]) == (0, f"{os.path.join('..', '..', 'generated')}: 2 files up to date\n", "")


# --- any bytes as a spec ---------------------------------------------------------------------

VALID = ONE_OP.encode()


@st.composite
def spec_bytes(draw):
    """Arbitrary bytes, or the valid spec with a few bytes inserted, deleted or replaced."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        data[at:at + draw(st.integers(0, 3))] = draw(st.binary(max_size=4))
    return bytes(data)


@settings(max_examples=int(os.environ.get("DERIVE_FUZZ_BYTES_EXAMPLES", "25")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=spec_bytes())
@example(data=b"a = " + b"[" * 3000 + b"]" * 3000)      # tomllib recurses once per level
@example(data=VALID.replace(b"tanh(x[b, f])", b"tanh(x[b, f]) * " + str(2 ** 1030).encode()))
def test_any_bytes_as_a_spec_give_exit_0_or_one_line_and_exit_2(tmp_path, data):
    spec = tmp_path / "any.toml"
    spec.write_bytes(data)
    code, _, err = run(["generate", "--spec", str(spec), "--out", str(tmp_path / "out"), "--style", "contraction"])
    assert "Traceback" not in err
    assert code == 0 and err == "" or code == 2 and err.count("\n") == 1 and err.startswith("derive: error: ")
    assert "internal error" not in err, err


# --- the output directory: leftovers and turns -------------------------------------------------------

def test_a_leftover_temporary_file_is_listed_by_check_and_removed_by_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ops.toml").write_text(ONE_OP)
    argv = ["--spec", "ops.toml", "--out", "out", "--style", "contraction"]
    assert run(["generate", *argv])[0] == 0
    Path("out/.tanh_act.py.k3x_9q2a.tmp").write_bytes(b"")     # what a kill before the first write leaves
    Path("out/.notes.tmp").write_text("mine")                      # not a name derive gives its files
    code, _, err = run(["check", *argv])
    assert code == 1 and err.splitlines()[0] == f"leftover: {os.path.join('out', '.tanh_act.py.k3x_9q2a.tmp')}"
    code, out, _ = run(["generate", *argv])
    assert code == 0 and "(left by an interrupted run)" in out
    assert sorted(p.name for p in Path("out").iterdir()) == [".notes.tmp", "DERIVATIONS.ops.md", "tanh_act.py"]


@pytest.mark.skipif(sys.platform == "win32", reason="the lock is POSIX flock")
def test_a_second_writer_waits_for_the_first(tmp_path):
    import fcntl
    import threading

    from derive.files import write_tree
    from derive.stamp import Owner
    out = tmp_path / "out"
    out.mkdir()
    handle = os.open(out, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)      # a first run, in the middle of writing
    module = {"a.py": "# Generated by derive from x. Do not edit by hand.\n"}
    writer = threading.Thread(target=write_tree, args=(out, module, [""], Owner("x")))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and list(out.iterdir()) == []
    os.close(handle)
    writer.join(10)
    assert not writer.is_alive() and [p.name for p in out.iterdir()] == ["a.py"]


# --- namespaces that cannot collide ----------------------------------------------------------------------

@pytest.mark.parametrize("relative, expected", [
    ("ops.toml", "ops"), ("specs/ops.toml", "specs__ops"), ("specs/my_ops.toml", "specs__my_ops"),
    ("./a/b.toml", "a__b"),
])
def test_a_plain_spec_path_gives_a_readable_namespace(relative, expected):
    assert spec_namespace(relative) == expected


PATH_PART = st.text(alphabet="ab_-1. é", min_size=1, max_size=4).filter(lambda part: part not in (".", ".."))


@given(st.lists(st.lists(PATH_PART, min_size=1, max_size=3).map("/".join), min_size=2, max_size=6, unique=True))
@example(["ops.toml", "a/ops.toml", "b/ops.toml", "a_ops.toml", "a/b_c.toml", "a_b/c.toml", "a__b/c.toml",
          "my-ops.toml", "my_ops.toml", "my.ops.toml", "ops", "derive.toml", "class.toml", "prim.toml",
          "__init__.toml", "опс.toml", "ops ops.toml", "2d.toml", "../ops.toml", "a/b__c.toml", "a/b/c.toml"])
@settings(max_examples=200, deadline=None)
def test_two_spec_paths_never_share_a_namespace(paths):
    """Whatever the paths (after ./ is dropped), their namespaces differ and none is derive's, torch's or a keyword."""
    paths = {str(PurePosixPath(path)) for path in paths}
    names = {spec_namespace(path) for path in paths}
    assert len(names) == len(paths) and all(namespace_problem(name) is None for name in names)


def test_two_specs_named_alike_register_their_ops_apart(tmp_path, monkeypatch):
    """a/ops.toml and b/ops.toml both define `act`; imported in one process, each module runs its own formula."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "two-catalogs"\n')
    for folder, function in (("a", "tanh"), ("b", "exp")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ops.toml").write_text(ONE_OP.replace("tanh_act", "act").replace("tanh", function))
        assert run(["generate", "--spec", f"{folder}/ops.toml", "--out", f"{folder}/out",
                    "--style", "contraction"])[0] == 0
    first, second = (load_module(tmp_path / folder / "out" / "act.py") for folder in ("a", "b"))
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(first.act_op(x), torch.tanh(x))
    torch.testing.assert_close(second.act_op(x), torch.exp(x))


def test_a_user_spec_named_derive_does_not_replace_the_built_in_ops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "derive.toml").write_text(ONE_OP.replace("tanh_act", "relu"))
    assert run(["generate", "--spec", "derive.toml", "--out", "out", "--style", "contraction"])[0] == 0
    text = (tmp_path / "out" / "relu.py").read_text()
    assert '"derive::relu"' not in text and f'"{spec_namespace("derive.toml")}::relu"' in text


def test_a_module_does_not_register_over_another_specs_op(tmp_path):
    """Two specs, one namespace, one op name: importing the second module fails with a clear error, and the
    first module still runs its own formula; importing the same module again (another copy) still works."""
    namespace = f"collide_{os.getpid()}"
    for folder, function in (("a", "tanh"), ("b", "exp")):
        catalog = parse_catalog(ONE_OP.replace("tanh(", f"{function}("), f"{folder}.toml")
        text = render_catalog(catalog, ("contraction",), spec_arg=f"{folder}.toml", namespace=namespace)["tanh_act.py"]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tanh_act.py").write_text(text)
        (tmp_path / folder / "copy.py").write_text(text)
    first = load_module(tmp_path / "a" / "tanh_act.py")
    with pytest.raises(ImportError, match=f"^custom op {namespace}::tanh_act is already registered by another spec "
                                          r"\(module derive_generated_tanh_act_\w+\); generate one of them with "
                                          "another --namespace$"):
        load_module(tmp_path / "b" / "tanh_act.py")
    again = load_module(tmp_path / "a" / "copy.py")
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(first.tanh_act_op(x), torch.tanh(x))
    torch.testing.assert_close(again.tanh_act_op(x), torch.tanh(x))


# --- progress ------------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_per_op_only_on_a_terminal_or_once_the_run_is_slow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ops.toml").write_text(ONE_OP + ONE_OP.replace("tanh_act", "exp_act").replace("tanh(", "exp("))
    argv = ["generate", "--spec", "ops.toml", "--style", "contraction"]
    lines = ["derive: op 'exp_act' (1/2)...", "derive: op 'tanh_act' (2/2)..."]     # in the catalog's order
    assert run([*argv, "--out", "fast"])[::2] == (0, "")         # not a terminal, and fast: silent
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--out", "on_a_terminal"]) == 0
    assert terminal.getvalue().splitlines() == lines
    monkeypatch.setattr(Progress, "SLOW", 0.0)      # every run is slow now
    assert run([*argv, "--out", "slow"])[::2] == (0, "\n".join(lines) + "\n")
