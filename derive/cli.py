"""The `derive` command line: generate, check, list, bench, explain."""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .errors import SpecError
from .files import compare, is_temporary, refuse_foreign, write_tree
from .naming import (ALL_STYLES, DEFAULT_NAMESPACE, MODULE_STYLES, default_catalog_path, namespace_problem,
                     spec_namespace)
from .reading import parse_toml, read_text
from .stamp import Owner, Survey, header, survey

# Everything above is the standard library and derive's light modules: `derive --help` and a `derive check`
# of an unchanged tree never import SymPy or torch. The stages are imported where code is rendered.


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):     # a terminal that cannot show a character gets an escape
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = _parser(argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    commands = ["generate", "check", "list", *LAZY_COMMANDS]
    if chosen is not None and chosen not in commands and difflib.get_close_matches(chosen, commands, n=1):
        parser.error(f"unknown command '{chosen}'; did you mean '{difflib.get_close_matches(chosen, commands, n=1)[0]}'?")
    args = parser.parse_args(argv)
    try:
        apply_config(args, Path.cwd())
        return args.handler(args)
    except SpecError as exc:
        if args.debug or args.debug_anywhere:
            traceback.print_exc()
        print(f"derive: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:     # an output file that cannot be read or written
        if args.debug or args.debug_anywhere:
            traceback.print_exc()
        print(f"derive: error: {exc}", file=sys.stderr)
        return 2


# [tool.derive] keys -> their defaults when neither the command line nor pyproject.toml sets them.
CONFIG_DEFAULTS = {"spec": None, "out": "generated", "style": "all", "namespace": DEFAULT_NAMESPACE,
                   "budget": None}    # budget None: derive's own, 60 seconds of derivation per op


def apply_config(args: argparse.Namespace, cwd: Path) -> None:
    """Fill each option the command line left unset from [tool.derive] of the nearest pyproject.toml,
    then from CONFIG_DEFAULTS. Paths in pyproject.toml are relative to its directory; the generated
    headers name them as written there, so output does not depend on the directory derive runs in."""
    config, root = load_config(cwd)
    spec = getattr(args, "spec", None) or config.get("spec")
    if hasattr(args, "namespace") and args.namespace is None and "namespace" not in config and spec:
        # a user's catalog must not register its ops over the built-in derive::<op> of the same name, nor two
        # catalogs over each other's: the namespace follows the spec's path in the project
        in_project = Path(spec) if "spec" in config and not getattr(args, "spec", None) else cwd / spec
        args.namespace = spec_namespace(Path(os.path.relpath(root / in_project, root)).as_posix()
                                        if root.drive == cwd.drive else Path(spec).name)
    namespace = getattr(args, "namespace", None) or hasattr(args, "namespace") and config.get("namespace")
    problem = namespace and namespace_problem(namespace, builtin=not spec)
    if problem and args.namespace:
        raise SpecError(f"{problem}; choose another", path="--namespace")
    if problem:     # [tool.derive]'s namespace, for a spec given on the command line
        raise SpecError(f"[tool.derive]: {problem}; choose another", path=os.path.relpath(root / "pyproject.toml", cwd))
    args.given = []    # options set on the command line, to repeat in hints
    for key, default in CONFIG_DEFAULTS.items():
        if not hasattr(args, key) or getattr(args, key) is not None:
            setattr(args, f"{key}_label", getattr(args, key, None))
            if getattr(args, key, None) is not None:
                args.given.append(f"--{key} {getattr(args, key)}")
            continue
        value = config.get(key, default)
        setattr(args, f"{key}_label", value)
        # paths are the project's: relative to the directory of its pyproject.toml, set there or not
        if key in ("spec", "out") and value is not None and root != cwd:
            value = os.path.relpath(root / value, cwd) if root.drive == cwd.drive else str(root / value)
        setattr(args, key, value)


def configured(command: str, cwd: Path) -> argparse.Namespace:
    """The arguments of `derive <command>` run in `cwd` with no option given: [tool.derive]'s."""
    args = _parser([command]).parse_args([command])
    apply_config(args, cwd)
    return args


def load_config(cwd: Path) -> tuple[dict, Path]:
    """[tool.derive] of the nearest pyproject.toml at or above `cwd` (empty if none) and that file's directory."""
    for folder in (cwd, *cwd.parents):
        path = folder / "pyproject.toml"
        if path.is_file():
            break
    else:
        return {}, cwd
    shown = str(path) if folder != cwd else path.name
    data = parse_toml(read_text(path, shown, "pyproject.toml"), shown)
    table = data.get("tool", {}).get("derive", {})
    if not isinstance(table, dict):
        raise SpecError("[tool.derive] must be a table", path=shown)
    for key, value in table.items():
        if key not in CONFIG_DEFAULTS:
            raise SpecError(f"[tool.derive]: unknown key '{key}' (known: {', '.join(CONFIG_DEFAULTS)})", path=shown)
        if key == "budget":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise SpecError("[tool.derive]: 'budget' must be a positive number of seconds", path=shown)
        elif not isinstance(value, str) or not value:
            raise SpecError(f"[tool.derive]: '{key}' must be a non-empty string", path=shown)
    if table.get("style", "all") not in ("all", *ALL_STYLES):
        raise SpecError(f"[tool.derive]: style must be one of {', '.join(('all', *ALL_STYLES))}", path=shown)
    if not table.get("namespace", "derive").isidentifier():
        raise SpecError("[tool.derive]: namespace must be a Python identifier", path=shown)
    if "namespace" in table and namespace_problem(table["namespace"], builtin="spec" not in table):
        raise SpecError(f"[tool.derive]: {namespace_problem(table['namespace'], builtin='spec' not in table)}; "
                        f"choose another", path=shown)
    return table, folder


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="derive", description="Derive readable, verified PyTorch backward code "
                                     "from index-notation specs.")
    parser.add_argument("--debug", dest="debug_anywhere", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"derive {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def catalog_command(name, help_text, handler):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--spec", metavar="FILE", help="TOML catalog (default: the built-in one)")
        command.set_defaults(handler=handler, debug=False)
        command.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        return command

    for name, help_text, handler in (("generate", "write the generated modules", _generate),
                                     ("check", "exit 0 when the generated modules are up to date, 1 when stale, "
                                               "2 on a spec error", _check)):
        command = catalog_command(name, help_text, handler)
        command.add_argument("--out", metavar="DIR", type=_directory, help="output directory (default: generated)")
        command.add_argument("--style", choices=("all", *ALL_STYLES),
                             help="contraction (matrix products, into DIR), broadcast (the seed's "
                                  "unsqueeze/sum form, into DIR/broadcast) or fused (the contraction code run as "
                                  "kernels torch.compile fuses, into DIR/fused); default: all, every one")
        command.add_argument("--namespace", metavar="NAME",
                             help=f"torch.library namespace of the generated custom ops (default: {DEFAULT_NAMESPACE})")
        command.add_argument("--budget", metavar="SECONDS", type=_seconds,
                             help="stop when one op's derivation takes longer (default: 60)")
        command.add_argument("--jobs", metavar="N", type=_jobs,
                             help="render ops in N processes at once (default: $DERIVE_JOBS, else one per CPU; "
                                  "--debug renders in this one)")
        if name == "check":
            command.add_argument("--diff", action="store_true", help="also print a unified diff of what would change")
    catalog_command("list", "list the ops of a catalog", _list)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)    # the top level takes only flags
    for name, (module, help_text) in LAZY_COMMANDS.items():
        if name == "bench" and importlib.util.find_spec("torch") is None:
            continue    # generate, check, list and explain need no torch; bench runs it
        command = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:      # its module (SymPy, torch) is imported only when it runs
            importlib.import_module(f".{module}", __package__).add_arguments(command)
    return parser


# Subcommands whose modules import SymPy or torch: name -> (module, help). `derive --help` lists them from
# here; the module adds its arguments and handler only when its command is the one given.
LAZY_COMMANDS = {
    "bench": ("composite", "time the generated backward code against torch.autograd (--composite: user-style "
                           "ops against torch eager, torch.compile and native kernels)"),
    "explain": ("explain", "show every step of an op's derivation, from its equation to the emitted code"),
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _jobs(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of processes")
    return int(text)


def _directory(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the output directory must not be empty (use . for this one)")
    return text


def _styles(args) -> tuple[str, ...]:
    return ALL_STYLES if args.style == "all" else (args.style,)


def render_catalog(*args, **kwargs) -> dict[str, str]:
    """build.render_catalog, imported on first use: it brings SymPy and Jinja2."""
    from .build import render_catalog
    return render_catalog(*args, **kwargs)


def _render(args, only: list[str] | None = None):
    """Every file of the catalog, text by path, or the files of the ops named in `only`."""
    from .model import Catalog
    from .spec import load_catalog
    catalog = load_catalog(args.spec)
    if only is not None:
        catalog = Catalog(catalog.path, tuple(op for op in catalog.ops if op.name in only))
    styles = _styles(args)
    budget = {} if args.budget is None else {"budget": float(args.budget)}
    jobs = 1 if args.debug or args.debug_anywhere else args.jobs    # a traceback from this process
    files = render_catalog(catalog, styles, spec_arg=args.spec_label, out_arg=args.out_label,
                           namespace=args.namespace, progress=Progress(sys.stderr), jobs=jobs, **budget)
    return files, [MODULE_STYLES[s].directory for s in styles]


class Progress:
    """One line per op on `stream` as it begins: from the first when the stream is a terminal, otherwise once
    deriving has taken SLOW seconds of CPU time since the first began (CPU time, as the budget counts: a fast
    run on a loaded CI machine or in a test prints nothing). Each process that renders ops counts its own."""

    SLOW = 2.0

    def __init__(self, stream):
        self.stream = stream
        self.start: float | None = None

    def __call__(self, op: str, number: int, total: int) -> None:
        self.start = time.process_time() if self.start is None else self.start
        if self.stream.isatty() or time.process_time() - self.start >= self.SLOW:
            print(f"derive: op '{op}' ({number}/{total})...", file=self.stream, flush=True)


def _survey(args) -> Survey | None:
    """What the stamps under --out tell, or None when the spec must be parsed to say what is wrong."""
    spec = Path(args.spec) if args.spec is not None else default_catalog_path()
    source, command = header(args.spec_label, args.out_label, args.namespace)
    return survey(Path(args.out), spec, _styles(args), source, command, args.namespace)


def _owner(args) -> Owner:
    """What proves a file under --out is this spec's: the header its generated files start with."""
    return Owner(header(args.spec_label, args.out_label, args.namespace)[0])


def _generate(args) -> int:
    known = _survey(args)
    if known is not None and known.status.clean:
        print(f"{args.out}: {len(known.files)} files up to date")
        return 0
    if known is not None:       # before deriving anything: a file derive may not overwrite stops the run
        refuse_foreign(Path(args.out), known.status, _owner(args))
    files, scopes = _render(args)
    status = write_tree(Path(args.out), files, scopes, _owner(args))
    changed = status.missing + status.stale
    for relative in changed:
        print(f"wrote {Path(args.out) / relative}")
    for relative in status.extra:
        why = "left by an interrupted run" if is_temporary(relative) else "the spec no longer produces it"
        print(f"removed {Path(args.out) / relative} ({why})")
    if not changed and not status.extra:
        print(f"{args.out}: {len(files)} files up to date")
    return 0


def _check(args) -> int:
    known = _survey(args)
    if known is not None and known.status.clean:
        print(f"{args.out}: {len(known.files)} files up to date")
        return 0
    if known is not None and not args.diff:     # the stamps tell what is stale; only what changed can fail
        refuse_foreign(Path(args.out), known.status, _owner(args))     # as generate would
        if known.changed_ops():
            _render(args, only=known.changed_ops())
        status = known.status
    else:
        files, scopes = _render(args)
        status = compare(Path(args.out), files, scopes, _owner(args))
        refuse_foreign(Path(args.out), status, _owner(args))
        if status.clean:
            print(f"{args.out}: {len(files)} files up to date")
            return 0
    if args.diff:
        sys.stdout.write(status.diff)
    leftover = [relative for relative in status.extra if is_temporary(relative)]
    for label, paths in (("stale", status.stale), ("missing", status.missing),
                         ("extra", [relative for relative in status.extra if relative not in leftover]),
                         ("leftover", leftover)):
        for relative in paths:
            print(f"{label}: {Path(args.out) / relative}", file=sys.stderr)
    print(f"derive: generated code is out of date; run `{' '.join(['derive generate', *args.given])}`",
          file=sys.stderr)
    return 1


def _list(args) -> int:
    from .spec import load_catalog
    catalog = load_catalog(args.spec)
    width = max(len(op.name) for op in catalog.ops)
    for op in catalog.ops:
        print(f"{op.name:<{width}}  {op.equation}")
    return 0
