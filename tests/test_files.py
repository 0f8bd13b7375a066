"""Writing generated/: nothing is ever half-written, a failure or a kill midway leaves whole files, a second
run writes nothing, and only derive's own files are ever removed."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import derive.files
from derive.build import render_catalog
from derive.cli import main, spec_namespace
from derive.files import MARKER, compare, write_tree
from derive.spec import parse_catalog
from derive.stamp import Owner

SPEC = textwrap.dedent('''
    [ops.first]
    doc = "VERSION"
    inputs = ["x[n]"]
    equation = "y[n] = tanh(x[n])"
    reference = "torch.tanh(x)"

    [ops.second]
    doc = "VERSION"
    inputs = ["x[n]"]
    equation = "y[n] = exp(x[n])"
    reference = "torch.exp(x)"
''')
SCOPES = ["", "broadcast/"]
OWNER = Owner("ops.toml")     # what the header of render()'s files names


def render(version: str) -> dict[str, str]:
    return render_catalog(parse_catalog(SPEC.replace("VERSION", version), "ops.toml"), spec_arg="ops.toml",
                          out_arg="out", namespace=spec_namespace("ops.toml"))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    write_tree(folder, render("old"), SCOPES, OWNER)
    return folder


def test_every_file_is_written_and_a_second_run_writes_nothing(out):
    new = render("new")
    status = write_tree(out, new, SCOPES, OWNER)
    assert sorted(status.stale) == sorted(new) and not status.missing
    assert snapshot(out) == {k: v.encode() for k, v in new.items()}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = write_tree(out, new, SCOPES, OWNER)
    assert again.clean and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def test_a_failure_after_the_first_file_puts_every_file_back(out, monkeypatch):
    before = snapshot(out)
    real_replace = os.replace
    calls = []

    def replace_then_fail(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise RuntimeError("injected failure after the first file")
        real_replace(source, target)

    monkeypatch.setattr(derive.files.os, "replace", replace_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        write_tree(out, render("new"), SCOPES, OWNER)
    assert len(calls) > 2       # the first file was replaced, then put back
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_a_failure_while_writing_the_temporary_files_touches_nothing(out, monkeypatch):
    before = snapshot(out)
    real_stage = derive.files.stage
    calls = []

    def stage_then_fail(target, content):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_stage(target, content)

    monkeypatch.setattr(derive.files, "stage", stage_then_fail)
    with pytest.raises(OSError):
        write_tree(out, render("new"), SCOPES, OWNER)
    assert snapshot(out) == before and leftovers(out) == []


def test_the_command_line_reports_a_write_failure_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old"))
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 0
    before = snapshot(tmp_path / "out")
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "new"))
    real_replace = os.replace
    calls = []

    def replace_then_fail(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(derive.files.os, "replace", replace_then_fail)
    capsys.readouterr()
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 2
    assert capsys.readouterr().err == "derive: error: [Errno 28] No space left on device\n"
    assert snapshot(tmp_path / "out") == before and leftovers(tmp_path) == []


KILLED_RUN = textwrap.dedent('''
    import os, signal, sys
    real_replace = os.replace
    def replace_then_die(source, target):
        real_replace(source, target)
        os.kill(os.getpid(), signal.SIGKILL)     # killed right after the first file is replaced
    os.replace = replace_then_die
    from derive.cli import main, spec_namespace
    main(["generate", "--spec", "ops.toml", "--out", "out"])
''')


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_kill_midway_leaves_whole_files_and_the_next_run_repairs(tmp_path, derive_cli):
    """The killed `generate` is a real process (a kill is about the process); the runs around it are not."""
    def derive_(command):
        return derive_cli(command, "--spec", "ops.toml", "--out", "out", cwd=tmp_path).returncode

    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old"))
    assert derive_("generate") == 0
    old = snapshot(tmp_path / "out")
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "new"))
    new = {k: v.encode() for k, v in render("new").items()}

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN], cwd=tmp_path, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    after = {k: v for k, v in snapshot(tmp_path / "out").items() if not k.endswith(".tmp")}
    assert set(after) == set(old)
    assert sum(after[k] == new[k] for k in after) == 1            # exactly the first file is new ...
    assert all(after[k] in (old[k], new[k]) for k in after)       # ... and every file is whole
    # Temporary files the kill left behind carry the marker: check reports them, generate removes them.
    assert leftovers(tmp_path / "out") and all(MARKER in p.read_text().splitlines()[0]
                                               for p in leftovers(tmp_path / "out"))
    assert derive_("check") == 1
    assert derive_("generate") == 0
    assert snapshot(tmp_path / "out") == new and leftovers(tmp_path) == []
    assert derive_("check") == 0


def test_only_files_with_the_marker_are_extra(out):
    (out / "gone.py").write_text((out / "first.py").read_text())
    (out / "broadcast" / "gone.py").write_text((out / "first.py").read_text())
    (out / "handwritten.py").write_text("x = 1\n")
    (out / "notes.md").write_text(f"notes: the marker is not on the first line\n{MARKER}\n")
    (out / "binary.bin").write_bytes(b"\xff\xfe")
    status = compare(out, render("old"), SCOPES, OWNER)
    assert sorted(status.extra) == ["broadcast/gone.py", "gone.py"]
    write_tree(out, render("old"), SCOPES, OWNER)
    assert not (out / "gone.py").exists() and not (out / "broadcast" / "gone.py").exists()
    assert (out / "handwritten.py").exists() and (out / "notes.md").exists() and (out / "binary.bin").exists()


def test_a_stale_file_that_is_not_utf8_is_reported_not_a_crash(out):
    header = (out / "first.py").read_bytes().split(b"\n")[0]
    (out / "first.py").write_bytes(header + b"\n# \xff\xfe hand-edited in latin-1\n")
    status = compare(out, render("old"), SCOPES, OWNER)
    assert status.stale == ["first.py"] and "\ufffd" in status.diff
    write_tree(out, render("old"), SCOPES, OWNER)
    assert compare(out, render("old"), SCOPES, OWNER).clean
