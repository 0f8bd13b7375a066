"""The command line, the golden record in generated/, and a new op from a user's spec file.

Commands run in this process through `derive.cli.main` (the `derive_cli` fixture); the built-in catalog is
rendered once for all of them (`render_once`). Real processes run only where the process itself is the
point: an installed wheel, run as `python -m derive`, exits with check's status.
"""

import os
import subprocess
import sys
import textwrap

from derive.files import compare
from derive.naming import spec_namespace
from derive.spec import load_catalog
from derive.stamp import Owner, header
from derive.testing import verify_op

from conftest import GENERATED, ROOT, rendered

TANH_SPEC = textwrap.dedent('''
    [ops.tanh_act]
    doc = "Hyperbolic tangent, written only as a spec."
    inputs = ["x[b, f]"]
    equation = "y[b, f] = tanh(x[b, f])"
    reference = "torch.tanh(x)"
''')
SOFTSIGN_SPEC = textwrap.dedent('''
    [ops.scaled_softsign]
    inputs = ["x[b, f]", "w[f]"]
    equation = "y[b, f] = w[f] * x[b, f] / (1 + Abs(x[b, f]))"
    reference = "w * x / (1 + x.abs())"
''')


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_golden_generated_is_reproduced_byte_for_byte(tmp_path, derive_cli, render_once):
    result = derive_cli("generate", "--out", "generated", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "generated") == snapshot(GENERATED)


def test_check_is_clean_in_memory():
    owner = Owner(header(None, "generated", "derive")[0])
    status = compare(GENERATED, rendered(load_catalog()), ["", "broadcast/"], owner)
    assert status.clean, status.diff


def test_check_exit_codes(tmp_path, derive_cli, render_once):
    out = tmp_path / "generated"
    assert derive_cli("generate", "--out", "generated", cwd=tmp_path).returncode == 0
    assert derive_cli("check", "--out", "generated", cwd=tmp_path).returncode == 0

    (out / "relu.py").write_text((out / "relu.py").read_text() + "# edited by hand\n")
    stale = derive_cli("check", "--out", "generated", cwd=tmp_path)
    assert stale.returncode == 1
    assert stale.stdout == "" and "stale" in stale.stderr
    stale = derive_cli("check", "--diff", "--out", "generated", cwd=tmp_path)
    assert stale.returncode == 1
    assert "+# edited by hand" not in stale.stdout and "-# edited by hand" in stale.stdout
    assert "stale" in stale.stderr

    (out / "relu.py").unlink()
    assert derive_cli("check", "--out", "generated", cwd=tmp_path).returncode == 1

    bad = tmp_path / "bad.toml"
    bad.write_text("[ops.bad\n")
    error = derive_cli("check", "--spec", bad, "--out", "generated", cwd=tmp_path)
    assert error.returncode == 2
    assert "TOML syntax error" in error.stderr and "Traceback" not in error.stderr


def test_generate_writes_nothing_the_second_time(tmp_path, derive_cli, render_once):
    assert derive_cli("generate", "--out", "generated", cwd=tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.py")}
    second = derive_cli("generate", "--out", "generated", cwd=tmp_path)
    assert "up to date" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.py")} == before


def test_generate_removes_only_its_own_stale_files(tmp_path, derive_cli, render_once):
    out = tmp_path / "generated"
    assert derive_cli("generate", "--out", "generated", cwd=tmp_path).returncode == 0
    orphan = out / "gone.py"
    orphan.write_text((out / "relu.py").read_text())
    mine = out / "handwritten.py"
    mine.write_text("x = 1\n")
    assert derive_cli("check", "--out", "generated", cwd=tmp_path).returncode == 1
    assert derive_cli("generate", "--out", "generated", cwd=tmp_path).returncode == 0
    assert not orphan.exists() and mine.exists()


def test_list_names_every_op(derive_cli):
    result = derive_cli("list")
    assert result.returncode == 0
    for op in load_catalog().ops:
        assert op.name in result.stdout


def test_new_elementwise_op_from_a_spec_file(tmp_path, derive_cli):
    spec = tmp_path / "my_ops.toml"
    spec.write_text(TANH_SPEC)
    out = tmp_path / "grads"
    result = derive_cli("generate", "--spec", spec, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module = out / "tanh_act.py"
    assert "def tanh_act_backward(grad_y, x" in module.read_text()
    verify_op(spec, "tanh_act", module)
    verify_op(spec, "tanh_act", out / "broadcast" / "tanh_act.py")
    assert derive_cli("check", "--spec", spec, "--out", out, cwd=tmp_path).returncode == 0


def test_spec_error_leaves_output_untouched(tmp_path, derive_cli, render_once):
    assert derive_cli("generate", "--out", "generated", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path)
    spec = tmp_path / "bad.toml"
    spec.write_text(TANH_SPEC.replace("tanh(x[b, f])", "frobnicate(x[b, f])"))
    result = derive_cli("generate", "--spec", spec, "--out", "generated", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "op 'tanh_act'" in result.stderr and "unknown function 'frobnicate'" in result.stderr
    assert str(spec) in result.stderr
    snapshot_after = snapshot(tmp_path)
    del snapshot_after[spec.relative_to(tmp_path)]
    assert snapshot_after == before


def test_installed_wheel_finds_its_templates_and_its_process_exits_with_checks_status(tmp_path, derive_cli):
    """A non-editable install, run as `python -m derive` from another directory, renders from the templates
    in the wheel: `check` against what this checkout generates for a small spec, with one hand edit, finds
    exactly that edit, and the process exits 1 (the one real process of these tests: main's status must
    become the exit status). A two-op spec, not the built-in catalog: a fresh process renders all it checks."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--quiet", "--target", str(target), str(ROOT)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (target / "derive" / "templates" / "module.py.jinja").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ops.toml").write_text(TANH_SPEC + SOFTSIGN_SPEC)
    assert derive_cli("generate", "--spec", "ops.toml", "--out", "out", cwd=elsewhere).returncode == 0
    edited = elsewhere / "out" / "tanh_act.py"
    edited.write_text(edited.read_text() + "# edited by hand\n")
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-m", "derive", "check", "--diff", "--spec", "ops.toml", "--out", "out"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    # every other file is byte for byte what this checkout generates, and tanh_act.py is but for the edited line
    assert result.stderr.splitlines()[:-1] == [f"stale: {os.path.join('out', 'tanh_act.py')}"], result.stderr
    changed = [line for line in result.stdout.splitlines()
               if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    assert changed == ["-# edited by hand"], result.stdout


def test_a_user_catalog_registers_its_custom_ops_in_its_own_namespace(tmp_path, derive_cli):
    """An op of my-ops.toml named like a built-in one must not replace derive::<op>."""
    spec = tmp_path / "my-ops.toml"
    spec.write_text(TANH_SPEC.replace("tanh_act", "relu"))
    assert derive_cli("generate", "--spec", spec, "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "relu.py").read_text()
    namespace = spec_namespace("my-ops.toml")     # with a hash of its path: "my_ops" is my_ops.toml's
    assert namespace.startswith("my_ops___")
    assert f'@torch.library.custom_op("{namespace}::relu"' in text
    assert f"--namespace {namespace}" in text.splitlines()[1]
