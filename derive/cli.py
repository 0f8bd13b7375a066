"""The `derive` command line: generate, check, list, bench, explain."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from . import bench
from . import explain
from .build import STYLE_DIRS, render_catalog
from .files import compare, write_tree
from .lower import STYLES
from .model import SpecError
from .spec import load_catalog


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"derive: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="derive", description="Derive readable, verified PyTorch backward code "
                                     "from index-notation specs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def catalog_command(name, help_text, handler):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--spec", metavar="FILE", help="TOML catalog (default: the built-in one)")
        command.set_defaults(handler=handler, debug=False)
        command.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        return command

    for name, help_text, handler in (("generate", "write the generated modules", _generate),
                                     ("check", "exit 1 with a diff if the generated modules are stale", _check)):
        command = catalog_command(name, help_text, handler)
        command.add_argument("--out", metavar="DIR", default="generated", help="output directory (default: generated)")
        command.add_argument("--style", choices=("all", *STYLES), default="all",
                             help="contraction (matrix products, into DIR) or broadcast (the seed's "
                                  "unsqueeze/sum form, into DIR/broadcast); default: both")
    catalog_command("list", "list the ops of a catalog", _list)
    bench.add_parser(commands)
    explain.add_parser(commands)
    return parser


def _styles(args) -> tuple[str, ...]:
    return STYLES if args.style == "all" else (args.style,)


def _render(args):
    catalog = load_catalog(args.spec)
    styles = _styles(args)
    files = render_catalog(catalog, styles, spec_arg=args.spec, out_arg=args.out)
    return files, [STYLE_DIRS[s] for s in styles]


def _generate(args) -> int:
    files, scopes = _render(args)
    status = write_tree(Path(args.out), files, scopes)
    changed = status.missing + status.stale
    for relative in changed:
        print(f"wrote {Path(args.out) / relative}")
    for relative in status.extra:
        print(f"removed {Path(args.out) / relative} (no spec produces it)")
    if not changed and not status.extra:
        print(f"{args.out}: {len(files)} files up to date")
    return 0


def _check(args) -> int:
    files, scopes = _render(args)
    status = compare(Path(args.out), files, scopes)
    if status.clean:
        print(f"{args.out}: {len(files)} files up to date")
        return 0
    sys.stdout.write(status.diff)
    for label, paths in (("stale", status.stale), ("missing", status.missing), ("extra", status.extra)):
        for relative in paths:
            print(f"{label}: {Path(args.out) / relative}", file=sys.stderr)
    print("derive: generated code is out of date; run `derive generate`"
          + (f" --spec {args.spec} --out {args.out}" if args.spec else ""), file=sys.stderr)
    return 1


def _list(args) -> int:
    catalog = load_catalog(args.spec)
    width = max(len(op.name) for op in catalog.ops)
    for op in catalog.ops:
        print(f"{op.name:<{width}}  {op.equation}")
    return 0
