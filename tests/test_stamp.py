"""The stamp in each generated header lets `derive check` and `derive generate` skip an unchanged tree without
importing SymPy or torch, while a changed spec, option or derive, and a hand edit anywhere, are still caught;
and the command line imports the heavy stages only when it renders."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import derive.build
import derive.stamp
from derive.cli import main

from conftest import first_by_default

# Two invented ops: params whose order is the order of the generated arguments, indices of equal size.
SPEC = textwrap.dedent('''
    [ops.scaled_pow]
    doc = "A power, scaled."
    inputs = ["x[a, b]"]
    params = { alpha = 2.0, beta = 3.0 }
    equation = "y[a, b] = alpha * x[a, b] ** beta"
    reference = "alpha * x ** beta"

    [ops.row_dot]
    inputs = ["u[a, b]", "v[a, b]"]
    equation = "y[a] = sum(u[a, b] * v[a, b], b)"
    reference = "(u * v).sum(-1)"
''')
FILES = ["DERIVATIONS.ops.md", "broadcast/row_dot.py", "broadcast/scaled_pow.py", "fused/row_dot.py",
         "fused/scaled_pow.py", "row_dot.py", "scaled_pow.py"]
HEAVY = ("sympy", "torch", "jinja2")


def run(*args) -> int:
    """`derive <args>` in this process; its output goes to capsys."""
    return main([str(a) for a in args])


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "ops.toml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    assert run("generate", "--spec", "ops.toml", "--out", "out") == 0
    return tmp_path


@pytest.fixture
def derivations(monkeypatch):
    """Counts the ops derive derives; the fast path derives none."""
    derived = []
    build_op = derive.build.build_op
    monkeypatch.setattr(derive.build, "build_op", lambda op, *rest: derived.append(op.name) or build_op(op, *rest))
    return derived


def check(capsys):
    capsys.readouterr()
    code = run("check", "--spec", "ops.toml", "--out", "out")
    return code, capsys.readouterr()


def stale_files(err: str) -> list[str]:
    return sorted(line.removeprefix("stale: out/") for line in err.splitlines() if line.startswith("stale: "))


def test_an_unchanged_tree_is_checked_and_generated_without_deriving(project, derivations, capsys):
    before = {name: (project / "out" / name).read_bytes() for name in FILES}
    code, output = check(capsys)
    assert (code, output.out) == (0, "out: 7 files up to date\n")
    assert run("generate", "--spec", "ops.toml", "--out", "out") == 0
    assert capsys.readouterr().out == "out: 7 files up to date\n"
    assert derivations == []
    assert {name: (project / "out" / name).read_bytes() for name in FILES} == before


def test_a_toml_comment_or_layout_change_keeps_the_fast_path(project, derivations, capsys):
    (project / "ops.toml").write_text("# my ops\n" + re.sub(r"(?m)^(\w+) = ", r"\1   =   ", SPEC) + "\n\n")
    assert check(capsys)[0] == 0
    assert derivations == []


EDITS = [
    lambda text: text.replace("return", "return  ", 1),                     # the body (the header: test_files)
    lambda text: text + "# a note\n",                                         # a line at the end
    lambda text: "\n".join(line for line in text.split("\n") if "Fingerprint:" not in line),   # the stamp
]


# Every edit of a contraction-style module, and an edit of the body of a broadcast-style one; `-m slow` (CI)
# also the other edits of the broadcast-style module.
@pytest.mark.parametrize("name, edit", [*[("scaled_pow.py", edit) for edit in EDITS],
                                        *first_by_default([("broadcast/row_dot.py", edit) for edit in EDITS], 1)])
def test_a_hand_edited_module_is_stale(project, derivations, capsys, edit, name):
    path = project / "out" / name
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    code, output = check(capsys)
    assert code == 1 and stale_files(output.err) == [name]
    assert derivations == [name.removeprefix("broadcast/").removesuffix(".py")]
    capsys.readouterr()
    assert run("check", "--spec", "ops.toml", "--out", "out", "--diff") == 1    # a diff renders the catalog
    assert f"+++ b/{name}" in capsys.readouterr().out
    assert run("generate", "--spec", "ops.toml", "--out", "out") == 0
    assert path.read_text() == text and check(capsys)[0] == 0


def test_a_forged_stamp_is_stale(project, capsys):
    """Editing the body and the text hash together still fails: the stamp hashes the rest of the file."""
    path = project / "out" / "row_dot.py"
    text = path.read_text()
    line = next(line for line in text.split("\n") if "Fingerprint:" in line)
    forged = line[:-16] + ("0" * 16 if not line.endswith("0" * 16) else "1" * 16)
    path.write_text(text.replace(line, forged))
    assert stale_files(check(capsys)[1].err) == ["row_dot.py"]


def test_a_hand_edited_derivations_document_is_stale(project, derivations, capsys):
    path = project / "out" / "DERIVATIONS.ops.md"
    path.write_text(path.read_text().replace("# Derivations", "# My derivations"))
    assert stale_files(check(capsys)[1].err) == ["DERIVATIONS.ops.md"]
    assert derivations == []     # every op's modules are as rendered: none can fail


@pytest.mark.parametrize("old, new", [
    ('doc = "A power, scaled."', 'doc = "A scaled power."'),
    ("alpha = 2.0, beta = 3.0", "beta = 3.0, alpha = 2.0"),     # the same values, params in another order
])
def test_a_changed_spec_is_stale_for_its_op_and_the_derivations(project, derivations, capsys, old, new):
    (project / "ops.toml").write_text(SPEC.replace(old, new))
    code, output = check(capsys)
    assert code == 1
    assert stale_files(output.err) == ["DERIVATIONS.ops.md", "broadcast/scaled_pow.py", "fused/scaled_pow.py",
                                       "scaled_pow.py"]
    assert derivations == ["scaled_pow"]     # row_dot's stamps match: it is not derived again


def test_a_spec_error_in_a_changed_op_is_still_reported(project, capsys):
    (project / "ops.toml").write_text(SPEC.replace("reference = \"(u * v).sum(-1)\"", "reference = \"open('x')\""))
    code, output = check(capsys)
    assert code == 2 and "op 'row_dot'" in output.err and output.err.count("\n") == 1


def test_another_namespace_makes_every_file_stale(project, capsys):
    capsys.readouterr()
    assert run("check", "--spec", "ops.toml", "--out", "out", "--namespace", "other") == 1
    err = capsys.readouterr().err
    assert stale_files(err) == FILES[1:]    # every module; the derivations document is named for the namespace
    assert "missing: out/DERIVATIONS.other.md\n" in err and "extra: out/DERIVATIONS.ops.md\n" in err


def test_one_style_of_an_unchanged_tree_is_checked_without_deriving(project, derivations, capsys):
    capsys.readouterr()
    assert run("check", "--spec", "ops.toml", "--out", "out", "--style", "contraction") == 0
    assert capsys.readouterr().out == "out: 3 files up to date\n" and derivations == []


def test_another_derive_version_or_code_makes_every_file_stale(project, monkeypatch, capsys):
    for name, value in (("__version__", "99.0"), ("code_hash", lambda: "0" * 16)):
        with monkeypatch.context() as patch:
            patch.setattr(derive.stamp, name, value)
            assert stale_files(check(capsys)[1].err) == FILES
        assert check(capsys)[0] == 0


def test_the_code_hash_covers_every_template_and_module(tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    shutil.copytree(derive.stamp.templates_dir(), templates)
    derive.stamp.code_hash.cache_clear()
    monkeypatch.setattr(derive.stamp, "templates_dir", lambda: templates)
    try:
        before = derive.stamp.code_hash()
        (templates / "module.py.jinja").write_text((templates / "module.py.jinja").read_text() + "\n")
        derive.stamp.code_hash.cache_clear()
        assert derive.stamp.code_hash() != before
    finally:
        derive.stamp.code_hash.cache_clear()


def test_a_missing_or_extra_file_is_reported(project, capsys):
    (project / "out" / "row_dot.py").unlink()
    shutil.copy(project / "out" / "scaled_pow.py", project / "out" / "gone.py")
    code, output = check(capsys)
    assert code == 1 and "missing: out/row_dot.py" in output.err and "extra: out/gone.py" in output.err


def in_a_process(code: str, cwd) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_command_line_imports_no_sympy_or_torch_for_help_or_an_unchanged_check_and_no_torch_to_render(project):
    seen = in_a_process(textwrap.dedent(f'''
        import io, json, sys, contextlib
        import derive.cli
        imported = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        help = io.StringIO()
        with contextlib.redirect_stdout(help):
            try:
                derive.cli.main(["--help"])
            except SystemExit:
                pass
        after_help = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        with contextlib.redirect_stdout(io.StringIO()):
            code = derive.cli.main(["check", "--spec", "ops.toml", "--out", "out"])
        after_check = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        with open("ops.toml", "a") as spec:
            spec.write('\\n[ops.row_sum]\\ninputs = ["u[a, b]"]\\nequation = "y[a] = sum(u[a, b], b)"\\n'
                       'reference = "u.sum(-1)"\\n')
        class Terminal(io.StringIO):
            encoding = "utf-8"      # DERIVATIONS.md's pretty printer asks sys.stdout for Unicode

        with contextlib.redirect_stdout(Terminal()):
            generated = derive.cli.main(["generate", "--spec", "ops.toml", "--out", "out"])
        after_render = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps([imported, help.getvalue(), after_help, code, after_check, generated, after_render]))
    '''), project)
    imported, help_text, after_help, code, after_check, generated, after_render = seen
    assert imported == after_help == after_check == [] and code == 0
    assert generated == 0 and (project / "out" / "row_sum.py").is_file()
    assert after_render == ["jinja2", "sympy"]      # rendering code needs no torch
    assert all(command in help_text for command in ("generate", "check", "list", "bench", "explain"))


def test_bench_and_explain_import_their_modules_when_they_run(project, capsys):
    assert run("explain", "row_dot", "--spec", "ops.toml") == 0
    assert "row_dot" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        run("bench", "--help")
    assert exit_.value.code == 0 and "--quick" in capsys.readouterr().out


def test_without_torch_every_command_but_bench_works(tmp_path):
    (tmp_path / "ops.toml").write_text(SPEC.split("[ops.row_dot]")[0])
    results = in_a_process(textwrap.dedent('''
        import io, json, sys, contextlib
        sys.modules["torch"] = None     # what an environment without torch gives: import torch fails
        import derive.cli

        class Terminal(io.StringIO):
            encoding = "utf-8"      # explain's pretty printer asks for Unicode

        results = []
        for args in (["--help"], ["generate", "--spec", "ops.toml", "--out", "out"],
                     ["check", "--spec", "ops.toml", "--out", "out"], ["list", "--spec", "ops.toml"],
                     ["explain", "scaled_pow", "--spec", "ops.toml"], ["bench", "--quick"]):
            output = Terminal()
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                try:
                    code = derive.cli.main(args)
                except SystemExit as exit_:
                    code = exit_.code
            results.append([code, output.getvalue()])
        print(json.dumps(results))
    '''), tmp_path)
    (help_code, help_text), generate, check, listed, explained, bench = results
    assert help_code == 0 and "explain" in help_text and "bench" not in help_text
    assert generate[0] == 0 and check == [0, "out: 4 files up to date\n"]
    assert listed[0] == explained[0] == 0 and "scaled_pow" in listed[1] and "scaled_pow" in explained[1]
    assert bench[0] == 2 and "invalid choice: 'bench'" in bench[1]
