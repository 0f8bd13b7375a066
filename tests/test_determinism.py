"""Byte-identical output whatever the hash seed, the working directory or the order of ops in the catalog."""

import os
import re
import subprocess
import sys

import pytest

from derive.build import render_catalog
from derive.spec import default_catalog_path, load_catalog, parse_catalog

from conftest import GENERATED, rendered

# Contractions over batch dims, both kinds of fused kernel, an integer input and saved statistics: the ops
# with the most indices, sets and dicts to iterate over, so an order that depends on hashing shows here.
FEW_OPS = ("linear_batched", "cross_entropy", "layer_norm")


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tables(text: str) -> tuple[str, list[str]]:
    """The catalog's leading comment and its [ops.*] tables (an op's sub-tables, [ops.<op>.layer], with it),
    each ending in one blank line."""
    head, *ops = re.split(r"(?m)^(?=\[ops\.\w+\]$)", text)
    return head, [t if t.endswith("\n\n") else t.rstrip("\n") + "\n\n" for t in ops]


def catalog_of(names: tuple[str, ...] | None) -> str:
    """The built-in catalog's text, or only the named ops of it."""
    head, ops = tables(default_catalog_path().read_text(encoding="utf-8"))
    if names is not None:
        ops = [t for t in ops if re.match(r"\[ops\.(\w+)\]", t).group(1) in names]
        assert len(ops) == len(names)
    return head + "".join(ops).rstrip("\n") + "\n"


def reordered(text: str) -> str:
    """The catalog with its [ops.*] tables in reverse order (the leading comment stays first)."""
    head, ops = tables(text)
    return head + "".join(reversed(ops)).rstrip("\n") + "\n"


@pytest.mark.parametrize("names", [pytest.param(FEW_OPS, id="three-ops"),
                                   pytest.param(None, id="catalog", marks=pytest.mark.slow)])
def test_output_does_not_depend_on_hash_seed_or_op_order(tmp_path, derive_cli, names):
    """Another process, with another hash seed, generates the ops in reverse order; this one generates them
    in order: the same bytes. A real process, because the hash seed is fixed when a process starts; the
    whole catalog runs with `-m slow` (CI does)."""
    catalog = catalog_of(names)
    flipped = reordered(catalog)
    assert flipped != catalog and parse_catalog(flipped).ops == parse_catalog(catalog).ops
    in_order, reversed_ = tmp_path / "in-order", tmp_path / "reversed"
    for folder in (in_order, reversed_):
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
    assert len(snapshot(in_order / "out")) > 2 * len(parse_catalog(catalog).ops)
    assert snapshot(in_order / "out") == snapshot(reversed_ / "out")


def test_output_does_not_depend_on_the_directory(tmp_path, derive_cli, render_once):
    """The built-in catalog generated from a deeper directory is the golden record, byte for byte."""
    deeper = tmp_path / "b" / "deeper"
    deeper.mkdir(parents=True)
    assert derive_cli("generate", "--out", "generated", cwd=deeper).returncode == 0
    assert snapshot(deeper / "generated") == snapshot(GENERATED)


@pytest.mark.parametrize("names", [pytest.param(FEW_OPS, id="three-ops"),
                                   pytest.param(None, id="whole-catalog", marks=pytest.mark.slow)])
def test_render_is_pure(names):
    """Rendering a catalog twice in one process gives the same text (no state carried between runs). The
    first rendering is the session's shared one, which the command-line tests also use; `-m slow` (CI)
    renders the whole built-in catalog."""
    catalog = load_catalog() if names is None else parse_catalog(catalog_of(names), str(default_catalog_path()))
    first = rendered(catalog)
    assert render_catalog(catalog) == first
