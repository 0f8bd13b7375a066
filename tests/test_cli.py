"""The command line, the golden record in generated/, and a new op from a user's spec file."""

import os
import subprocess
import sys
import textwrap


from derive.build import render_catalog
from derive.files import compare
from derive.spec import load_catalog
from derive.testing import verify_op

from conftest import GENERATED, ROOT

TANH_SPEC = textwrap.dedent('''
    [ops.tanh_act]
    doc = "Hyperbolic tangent, written only as a spec."
    inputs = ["x[b, f]"]
    equation = "y[b, f] = tanh(x[b, f])"
    reference = "torch.tanh(x)"
''')


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "derive", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_golden_generated_is_reproduced_byte_for_byte(tmp_path):
    result = run("generate", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path) == snapshot(GENERATED)


def test_check_is_clean_in_memory():
    status = compare(GENERATED, render_catalog(load_catalog()), ["", "broadcast/"])
    assert status.clean, status.diff


def test_check_exit_codes(tmp_path):
    assert run("generate", "--out", str(tmp_path)).returncode == 0
    assert run("check", "--out", str(tmp_path)).returncode == 0

    (tmp_path / "relu.py").write_text((tmp_path / "relu.py").read_text() + "# edited by hand\n")
    stale = run("check", "--out", str(tmp_path))
    assert stale.returncode == 1
    assert stale.stdout == "" and "stale" in stale.stderr
    stale = run("check", "--diff", "--out", str(tmp_path))
    assert stale.returncode == 1
    assert "+# edited by hand" not in stale.stdout and "-# edited by hand" in stale.stdout
    assert "stale" in stale.stderr

    (tmp_path / "relu.py").unlink()
    assert run("check", "--out", str(tmp_path)).returncode == 1

    bad = tmp_path / "bad.toml"
    bad.write_text("[ops.bad\n")
    error = run("check", "--spec", str(bad), "--out", str(tmp_path))
    assert error.returncode == 2
    assert "TOML syntax error" in error.stderr and "Traceback" not in error.stderr


def test_generate_writes_nothing_the_second_time(tmp_path):
    assert run("generate", "--out", str(tmp_path)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.py")}
    second = run("generate", "--out", str(tmp_path))
    assert "up to date" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.py")} == before


def test_generate_removes_only_its_own_stale_files(tmp_path):
    assert run("generate", "--out", str(tmp_path)).returncode == 0
    orphan = tmp_path / "gone.py"
    orphan.write_text((tmp_path / "relu.py").read_text())
    mine = tmp_path / "handwritten.py"
    mine.write_text("x = 1\n")
    assert run("check", "--out", str(tmp_path)).returncode == 1
    assert run("generate", "--out", str(tmp_path)).returncode == 0
    assert not orphan.exists() and mine.exists()


def test_list_names_every_op():
    result = run("list")
    assert result.returncode == 0
    for op in load_catalog().ops:
        assert op.name in result.stdout


def test_new_elementwise_op_from_a_spec_file(tmp_path):
    spec = tmp_path / "my_ops.toml"
    spec.write_text(TANH_SPEC)
    out = tmp_path / "grads"
    result = run("generate", "--spec", str(spec), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module = out / "tanh_act.py"
    assert "def tanh_act_backward(grad_y, x" in module.read_text()
    verify_op(spec, "tanh_act", module)
    verify_op(spec, "tanh_act", out / "broadcast" / "tanh_act.py")
    assert run("check", "--spec", str(spec), "--out", str(out), cwd=tmp_path).returncode == 0


def test_spec_error_leaves_output_untouched(tmp_path):
    assert run("generate", "--out", str(tmp_path)).returncode == 0
    before = snapshot(tmp_path)
    spec = tmp_path / "bad.toml"
    spec.write_text(TANH_SPEC.replace("tanh(x[b, f])", "frobnicate(x[b, f])"))
    result = run("generate", "--spec", str(spec), "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "op 'tanh_act'" in result.stderr and "unknown function 'frobnicate'" in result.stderr
    assert str(spec) in result.stderr
    snapshot_after = snapshot(tmp_path)
    del snapshot_after[spec.relative_to(tmp_path)]
    assert snapshot_after == before


def test_installed_wheel_finds_its_templates(tmp_path):
    """A non-editable install, run from another directory, renders from the templates in the wheel."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--quiet", "--target", str(target), str(ROOT)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (target / "derive" / "templates" / "module.py.jinja").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-m", "derive", "generate", "--out", "out"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert snapshot(elsewhere / "out") == snapshot(GENERATED)


def test_a_user_catalog_registers_its_custom_ops_in_its_own_namespace(tmp_path):
    """An op of my-ops.toml named like a built-in one must not replace derive::<op>."""
    spec = tmp_path / "my-ops.toml"
    spec.write_text(TANH_SPEC.replace("tanh_act", "relu"))
    assert run("generate", "--spec", str(spec), "--out", str(tmp_path / "out"), cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "relu.py").read_text()
    assert '@torch.library.custom_op("my_ops::relu"' in text
    assert "--namespace my_ops" in text.splitlines()[1]
