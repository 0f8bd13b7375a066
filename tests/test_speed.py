"""Rendering a catalog in worker processes (render_catalog's `jobs`, `--jobs`, $DERIVE_JOBS): the same files,
and the same one-line error naming the first op that fails, as rendering in one process."""

import subprocess
import sys
import textwrap

from derive.build import _processes

# An elementwise kink, and a matrix product with an optional bias (and its variant without it).
OPS = """\
[ops.clamp_low]
inputs = ["x[...]"]
equation = "y[...] = Max(x[...], 0, tie=0)"
reference = "torch.relu(x)"

[ops.affine]
inputs = ["x[n, k]", "w[m, k]", "b[m]"]
optional = {b = 0}
equation = "y[n, m] = sum(x[n, k] * w[m, k], k) + b[m]"
reference = "x @ w.T + b"
"""


def nested_softmax(name: str, levels: int) -> str:
    equation = "x[n, m]"
    for _ in range(levels):
        equation = f"softmax({equation}, m)"
    return f'[ops.{name}]\ninputs = ["x[n, m]"]\nequation = "y[n, m] = {equation}"\nreference = "x"\n'


# Run where torch is not imported (a process that has started torch's thread pools renders in itself).
SCRIPT = textwrap.dedent("""\
    import contextlib, io, os, sys
    from derive.build import _processes, render_catalog
    from derive.cli import main
    from derive.errors import SpecError
    from derive.spec import load_catalog

    good, slow = load_catalog("good.toml"), load_catalog("slow.toml")
    assert "torch" not in sys.modules and _processes(2, 2) == 2, _processes(2, 2)
    one = render_catalog(good, jobs=1)
    assert render_catalog(good, jobs=2) == one
    assert len(one) == 2 * 3 + 1     # three styles of each op, and DERIVATIONS.md

    def failure(**options):     # both ops run past the budget; in two processes, at once
        try:
            render_catalog(slow, budget=0.05, **options)
        except SpecError as error:
            return str(error)
    alone, shared = failure(jobs=1), failure(jobs=2)
    assert alone == shared and "op 'deep'" in alone, (alone, shared)

    def command(*args, **env):
        err = io.StringIO()
        os.environ.update(env)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["generate", "--spec", "slow.toml", "--budget", "0.05", *args])
            except SystemExit as exit_:
                code = exit_.code
        os.environ.pop("DERIVE_JOBS", None)
        return code, err.getvalue()

    in_one = command("--out", "one", "--jobs", "1")
    assert in_one[0] == 2 and in_one[1].count("\\n") == 1 and in_one[1].startswith("derive: error: slow.toml"), in_one
    assert command("--out", "two", "--jobs", "2") == in_one
    assert command("--out", "env", DERIVE_JOBS="2") == in_one
    code, err = command("--out", "bad", DERIVE_JOBS="two")
    assert code == 2 and err == "derive: error: DERIVE_JOBS: the number of processes must be a positive integer, " \\
        "not 'two'\\n", err
    code, err = command("--out", "bad", "--jobs", "0")
    assert code == 2 and "'0' is not a positive number of processes" in err, err
    print("ok")
    """)


def test_worker_processes_render_the_same_files_and_the_same_error(tmp_path):
    (tmp_path / "good.toml").write_text(OPS, encoding="utf-8")
    (tmp_path / "slow.toml").write_text(nested_softmax("deep", 3) + "\n" + nested_softmax("deep_too", 3),
                                        encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_a_process_with_torch_or_shared_builds_renders_in_itself(monkeypatch):
    """The tests import torch (whose thread pools do not survive a fork) and replace build_op to share builds:
    their renderings stay in their own process."""
    import derive.build
    import torch  # noqa: F401
    assert _processes(4, 10) == 1
    monkeypatch.delitem(sys.modules, "torch")
    assert _processes(4, 10) == 4 and _processes(None, 1) == 1 and _processes(4, 2) == 2
    monkeypatch.setattr(derive.build, "build_op", lambda *args, **kwargs: None)
    assert _processes(4, 10) == 1
