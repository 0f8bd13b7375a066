"""Byte-identical output whatever the hash seed, the working directory or the order of ops in the catalog."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from derive.build import render_catalog
from derive.spec import default_catalog_path, parse_catalog

from conftest import GENERATED


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reordered(text: str) -> str:
    """The catalog with its [ops.*] tables in reverse order (the leading comment stays first)."""
    head, *tables = re.split(r"(?m)^(?=\[ops\.)", text)
    tables = [t if t.endswith("\n\n") else t.rstrip("\n") + "\n\n" for t in tables]
    return head + "".join(reversed(tables)).rstrip("\n") + "\n"


def generate(cwd, seed, *args):
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    result = subprocess.run([sys.executable, "-m", "derive", "generate", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return cwd


def test_output_does_not_depend_on_hash_seed_directory_or_op_order(tmp_path):
    catalog = default_catalog_path().read_text(encoding="utf-8")
    flipped = reordered(catalog)
    assert flipped != catalog and parse_catalog(flipped).ops == parse_catalog(catalog).ops
    runs = []
    for seed, folder in ((0, "a"), (1, "b/deeper"), (12345, "c")):    # the built-in catalog, --out relative
        (tmp_path / folder).mkdir(parents=True)
        runs.append((tmp_path / folder, seed, "--out", "out"))
    for seed, folder, text in ((0, "in-order", catalog), (12345, "reversed", flipped)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ops.toml").write_text(text, encoding="utf-8")
        runs.append((tmp_path / folder, seed, "--spec", "ops.toml", "--out", "out"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        folders = list(pool.map(lambda run: generate(*run), runs))

    built_in = [snapshot(folder / "out") for folder in folders[:3]]
    assert all(files == snapshot(GENERATED) for files in built_in)
    in_order, flipped_out = (snapshot(folder / "out") for folder in folders[3:])
    assert in_order == flipped_out


def test_render_is_pure():
    """Rendering twice in one process gives the same text (no state carried between runs)."""
    catalog = parse_catalog(default_catalog_path().read_text(encoding="utf-8"), "ops.toml")
    assert render_catalog(catalog, spec_arg="ops.toml") == render_catalog(catalog, spec_arg="ops.toml")
