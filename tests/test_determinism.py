"""Byte-identical output whatever the hash seed, the working directory or the order of ops in the catalog."""

import os
import re
import subprocess
import sys

from derive.build import render_catalog
from derive.spec import default_catalog_path, parse_catalog

from conftest import GENERATED, rendered


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reordered(text: str) -> str:
    """The catalog with its [ops.*] tables in reverse order (the leading comment stays first)."""
    head, *tables = re.split(r"(?m)^(?=\[ops\.)", text)
    tables = [t if t.endswith("\n\n") else t.rstrip("\n") + "\n\n" for t in tables]
    return head + "".join(reversed(tables)).rstrip("\n") + "\n"


def test_output_does_not_depend_on_hash_seed_directory_or_op_order(tmp_path, derive_cli, render_once):
    """Another process, with another hash seed, generates the catalog with its ops in reverse order; this one
    generates it in order, and the built-in catalog from a deeper directory: the same bytes each time."""
    catalog = default_catalog_path().read_text(encoding="utf-8")
    flipped = reordered(catalog)
    assert flipped != catalog and parse_catalog(flipped).ops == parse_catalog(catalog).ops
    deeper, in_order, reversed_ = tmp_path / "b" / "deeper", tmp_path / "in-order", tmp_path / "reversed"
    for folder in (deeper, in_order, reversed_):
        folder.mkdir(parents=True)
    (in_order / "ops.toml").write_text(catalog, encoding="utf-8")
    (reversed_ / "ops.toml").write_text(flipped, encoding="utf-8")

    # The other process hashes with another seed than this one (which is random unless PYTHONHASHSEED is set).
    other_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    other = subprocess.run([sys.executable, "-m", "derive", "generate", "--spec", "ops.toml", "--out", "out"],
                           cwd=reversed_, env=dict(os.environ, PYTHONHASHSEED=other_seed), capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    assert derive_cli("generate", "--spec", "ops.toml", "--out", "out", cwd=in_order).returncode == 0
    assert derive_cli("generate", "--out", "generated", cwd=deeper).returncode == 0

    assert snapshot(deeper / "generated") == snapshot(GENERATED)
    assert snapshot(in_order / "out") == snapshot(reversed_ / "out")


def test_render_is_pure():
    """Rendering twice in one process gives the same text (no state carried between runs). The first
    rendering is the one `derive generate --spec ops.toml` above kept, when that test ran before."""
    catalog = parse_catalog(default_catalog_path().read_text(encoding="utf-8"), "ops.toml")
    options = dict(spec_arg="ops.toml", out_arg="out", namespace="ops")
    assert rendered(catalog, **options) == render_catalog(catalog, **options)
