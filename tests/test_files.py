"""Writing generated/: nothing is ever half-written, a failure or a kill midway leaves whole files, a second
run writes nothing, and only derive's own files are ever removed."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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


# --- ownership: derive touches only the files it wrote for this spec -----------------------------------

def render_other(version: str = "other") -> dict[str, str]:
    """Another spec's files: its own op, in the same output directory."""
    other = SPEC.replace("VERSION", version).replace("[ops.first]", "[ops.third]").replace("[ops.second]",
                                                                                             "[ops.fourth]")
    return render_catalog(parse_catalog(other, "other.toml"), spec_arg="other.toml", out_arg="out",
                          namespace=spec_namespace("other.toml"))


def test_only_whole_files_this_spec_wrote_are_removed(out):
    """Removed: an orphan of this spec, as derive wrote it. Kept: files whose first line merely contains the
    marker (a README, a CSV), a hand-tuned copy, this spec's header on a file derive never stamped, another
    spec's module, a temporary file of another spec's run."""
    module = (out / "first.py").read_text()
    header = module.split("\n")[0]
    (out / "gone.py").write_text(module)
    (out / "broadcast" / "gone.py").write_text(module)
    kept = {
        "README.md": f"<!-- {MARKER}ops.toml. Do not edit by hand. (a note of the user's) -->\nread me\n",
        "table.csv": f"{MARKER}ops.toml. Do not edit by hand.\n1,2\n",
        "first_tuned.py": module.replace("return", "return  ", 1),                # a hand-tuned copy
        "unstamped.py": f"{header}\nx = 1\n",
        "third.py": render_other()["third.py"],
        ".third.py.abcd1234.tmp": render_other()["third.py"],
    }
    for name, text in kept.items():
        (out / name).write_text(text)
    status = compare(out, render("old"), SCOPES, OWNER)
    assert sorted(status.extra) == ["broadcast/gone.py", "gone.py"] and not status.foreign
    write_tree(out, render("old"), SCOPES, OWNER)
    assert not (out / "gone.py").exists() and not (out / "broadcast" / "gone.py").exists()
    assert {name: (out / name).read_text() for name in kept} == kept


def test_specs_sharing_an_output_directory_keep_each_others_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old"))
    (tmp_path / "other.toml").write_text(SPEC.replace("VERSION", "old").replace("first", "third")
                                         .replace("second", "fourth"))
    for spec in ("ops.toml", "other.toml", "ops.toml"):
        assert main(["generate", "--spec", spec, "--out", "out"]) == 0
    assert "removed" not in capsys.readouterr().out
    everything = snapshot(tmp_path / "out")
    assert {"DERIVATIONS.ops.md", "DERIVATIONS.other.md", "first.py", "third.py", "broadcast/fourth.py"} \
        <= set(everything)
    for spec in ("ops.toml", "other.toml"):
        assert main(["check", "--spec", spec, "--out", "out"]) == 0
    # one spec drops an op: its own modules go, the other's stay
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old").split("[ops.second]")[0])
    capsys.readouterr()
    assert main(["check", "--spec", "ops.toml", "--out", "out"]) == 1
    assert capsys.readouterr().err.splitlines()[:2] == ["stale: out/DERIVATIONS.ops.md", "extra: out/second.py"]
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 0
    after = snapshot(tmp_path / "out")
    assert set(everything) - set(after) == {"second.py", "broadcast/second.py", "fused/second.py"}
    assert all(after[name] == everything[name] for name in after if "third" in name or "fourth" in name)
    assert main(["check", "--spec", "other.toml", "--out", "out"]) == 0


@pytest.mark.parametrize("occupant", [
    "another spec's module",
    "a file derive did not write",
    "this spec's module with its header edited",
])
def test_a_file_this_spec_does_not_own_is_never_overwritten(tmp_path, monkeypatch, capsys, occupant):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old"))
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 0
    first = tmp_path / "out" / "first.py"
    if occupant == "another spec's module":     # other.toml has an op named `first` too
        (tmp_path / "other.toml").write_text(SPEC.replace("VERSION", "other's"))
        assert main(["generate", "--spec", "other.toml", "--out", "out"]) == 2
        first.write_text(render_catalog(parse_catalog(SPEC.replace("VERSION", "other's"), "other.toml"),
                                        spec_arg="other.toml", out_arg="out", namespace="other")["first.py"])
    elif occupant == "a file derive did not write":
        first.write_text("def first(x):\n    return x\n")
    else:
        first.write_text(first.read_text().replace("Do not edit by hand.", "Edited by hand."))
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    for command in ("generate", "check"):
        assert main([command, "--spec", "ops.toml", "--out", "out"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"derive: error: {os.path.join('out', 'first.py')}: derive overwrites only the files "
                              f"it wrote for ops.toml, and ") and err.count("\n") == 1, err
        assert ("header names another spec or was edited ('# Generated by derive from " in err) \
            == (occupant != "a file derive did not write")
    assert snapshot(tmp_path / "out") == before


def emulate_read_only(folder, monkeypatch):
    """Make every attempt to create, rename or remove a file in `folder` fail, as in a read-only directory
    (the tests run as root, for whom chmod does not)."""
    def guarded(real, *path_arguments):
        def call(*args, **kwargs):
            paths = [args[i] for i in path_arguments]
            if kwargs.get("dir") is not None:     # mkstemp's folder
                paths.append(os.path.join(kwargs["dir"], "new"))
            if any(os.path.dirname(os.path.abspath(path)) == str(folder) for path in paths):
                raise PermissionError(13, "Permission denied", str(paths[0]))
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(os, "replace", guarded(os.replace, 0, 1))
    monkeypatch.setattr(os, "rename", guarded(os.rename, 0, 1))
    monkeypatch.setattr(os, "unlink", guarded(os.unlink, 0))
    monkeypatch.setattr(derive.files.tempfile, "mkstemp", guarded(derive.files.tempfile.mkstemp))


def test_a_read_only_folder_midway_leaves_every_file_as_it_was(tmp_path, monkeypatch, capsys):
    """The spec drops an op: DERIVATIONS.ops.md is rewritten and second.py removed before broadcast/second.py,
    in a read-only folder, cannot be: the run fails, and every file is put back, the removed ones too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old"))
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 0
    before = snapshot(tmp_path / "out")
    (tmp_path / "ops.toml").write_text(SPEC.replace("VERSION", "old").split("[ops.second]")[0])
    emulate_read_only(tmp_path / "out" / "broadcast", monkeypatch)
    capsys.readouterr()
    assert main(["generate", "--spec", "ops.toml", "--out", "out"]) == 2
    assert capsys.readouterr().err.startswith("derive: error: [Errno 13] Permission denied")
    monkeypatch.undo()
    assert snapshot(tmp_path / "out") == before and leftovers(tmp_path) == []


def test_a_failure_while_removing_puts_back_what_was_removed(out, monkeypatch):
    new = {path: text for path, text in render("new").items() if "second" not in path}
    before = snapshot(out)
    real_replace = os.replace
    removals = []

    def fail_at_the_second_removal(source, target):
        if Path(source).name == "second.py":
            removals.append(source)
            if len(removals) == 2:
                raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(derive.files.os, "replace", fail_at_the_second_removal)
    with pytest.raises(OSError):
        write_tree(out, new, SCOPES, OWNER)
    assert len(removals) == 2 and snapshot(out) == before and leftovers(out) == []


def test_every_rendered_file_is_owned_by_its_spec():
    """The templates' header and stamp.Owner agree, for every type of file and a source that needs quoting."""
    for source in ("ops.toml", "my specs/ops [v2].toml"):
        files = render_catalog(parse_catalog(SPEC.replace("VERSION", "old"), source), spec_arg=source,
                               out_arg="out", namespace="owned")
        assert {path for path, text in files.items() if Owner(source).wrote(path, text.encode())} == set(files)
        assert not any(Owner("other.toml").claims(path, text.encode().split(b"\n")[0]) for path, text in files.items())
