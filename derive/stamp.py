"""Stage 6a, the stamp: each generated file records what it was rendered from, and a hash of its own text.

The line after a generated file's header comment reads

    # Fingerprint: derive 0.1.0, inputs 1f0c2a9b7d3e4c5a, text 9a4e7b1c0d2f3e6a

`inputs` hashes everything rendering reads: the op's TOML table as written (every op's, for
DERIVATIONS.md), the style, the namespace, the header's labels, and derive itself (its version and the
bytes of its code and templates). `text` hashes the file without this line. A file whose stamp matches
both is byte for byte what rendering would write now, so `derive check` and `derive generate` trust it
without importing SymPy or deriving anything (`survey`). A changed spec, option or derive, or an edit
anywhere in the file, breaks the match: such a file is stale, and only its op needs rendering (to report
a spec error), or the whole catalog for a diff or to write it.
Only the standard library is imported here: the command line reads this before anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import __version__, naming
from .errors import SpecError
from .files import MARKER, TreeStatus, owned_files
from .reading import parse_toml, read_text

COMMENTS = {".py": ("# ", ""), ".md": ("<!-- ", " -->")}   # a file type's one-line comment: opener, closer


def templates_dir() -> Path:
    shipped = Path(__file__).parent / "templates"     # inside an installed wheel
    if shipped.is_dir():
        return shipped
    return Path(__file__).parent.parent / "templates"  # source checkout or editable install


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@cache
def code_hash() -> str:
    """A hash of derive's own code and templates: another derive may render other text."""
    package = Path(__file__).parent
    sources = [(path.relative_to(package).as_posix(), path) for path in package.rglob("*.py")]
    sources += [(f"templates/{path.name}", path) for path in templates_dir().glob("*.jinja")]
    digest = hashlib.sha256()
    for name, path in sorted(sources):     # line endings as git may check them out on Windows
        digest.update(name.encode() + b"\0" + path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def spec_digest(name: str, entry) -> str:
    """A hash of one op's TOML table as written (key order kept: it orders params and arguments)."""
    return _hash(json.dumps([name, entry], ensure_ascii=False, default=repr))


def inputs_hash(*parts) -> str:
    return _hash(json.dumps([__version__, code_hash(), *parts], ensure_ascii=False))


def header(spec_arg: str | None, out_arg: str, namespace: str) -> tuple[str, str]:
    """What a generated header names: the spec it came from, and the command that regenerates it."""
    if spec_arg is None:
        source, command = "the built-in catalog (derive/catalog/ops.toml)", "derive generate"
    else:
        source, command = spec_arg, f"derive generate --spec {shlex.quote(spec_arg)} --out {shlex.quote(out_arg)}"
    if namespace != naming.DEFAULT_NAMESPACE:
        command += f" --namespace {namespace}"
    return source, command


def planned(digests: dict[str, str], styles, source: str, command: str, namespace: str) -> dict[str, str]:
    """Relative path -> inputs hash of every file a catalog renders to, from its ops' spec digests."""
    files = {}
    for name, digest in sorted(digests.items()):
        for style in styles:
            files[naming.MODULE_STYLES[style].directory + naming.module_file(name)] = inputs_hash(
                "module", digest, style, namespace, source, command)
    if "contraction" in styles:    # beside the contraction-style modules, once per catalog
        files[naming.derivations_file(namespace)] = inputs_hash("derivations", sorted(digests.items()), source, command)
    return files


def _stamp_line(path: str, inputs: str, text: str) -> str:
    opener, closer = COMMENTS[Path(path).suffix]
    return f"{opener}Fingerprint: derive {__version__}, inputs {inputs}, text {_hash(text)}{closer}"


def _header_end(path: str, lines: list[str]) -> int:
    """The index of the first line after the file's leading comment lines."""
    opener, _ = COMMENTS[Path(path).suffix]
    return next((i for i, line in enumerate(lines) if not line.startswith(opener)), len(lines))


def stamped(path: str, text: str, inputs: str) -> str:
    """`text` with its stamp inserted after its header comment."""
    lines = text.split("\n")
    end = _header_end(path, lines)
    return "\n".join([*lines[:end], _stamp_line(path, inputs, text), *lines[end:]])


def matches(path: str, data: bytes, inputs: str) -> bool:
    """Whether a file's bytes are exactly what `stamped` wrote for these inputs."""
    if Path(path).suffix not in COMMENTS:
        return False
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return False
    end = _header_end(path, lines)
    if end == 0:
        return False
    text = "\n".join(lines[:end - 1] + lines[end:])
    return lines[end - 1] == _stamp_line(path, inputs, text)


@dataclass(frozen=True)
class Owner:
    """The spec a generated file belongs to, as its first line names it: derive overwrites a file only when
    that line is the spec's header, and removes one only when, besides, the file is whole as derive wrote it
    (its fingerprint's text hash matches), so never a file of another type, another spec's, or a hand-tuned copy."""

    source: str     # the spec as the header names it (`header`)

    def claims(self, path: str, first_line: bytes) -> bool:
        """Whether `first_line` is the header derive renders into a file of this type for this spec."""
        if Path(path).suffix not in COMMENTS:
            return False
        opener, closer = COMMENTS[Path(path).suffix]    # DERIVATIONS.md's one line goes on with its command
        header = f"{re.escape(opener + MARKER + self.source)}\\. Do not edit by hand\\.( Regenerate with: .*)?"
        return re.fullmatch(header + re.escape(closer), first_line.rstrip(b"\r\n").decode("utf-8", "replace")) \
            is not None

    def wrote(self, path: str, data: bytes) -> bool:
        if not self.claims(path, data.split(b"\n", 1)[0]):
            return False
        lines = data.decode("utf-8", errors="replace").split("\n")
        end = _header_end(path, lines)
        opener, closer = COMMENTS[Path(path).suffix]
        stamp = re.fullmatch(re.escape(opener) + r"Fingerprint: derive \S+, inputs [0-9a-f]{16}, text ([0-9a-f]{16})"
                             + re.escape(closer), lines[end - 1])
        return stamp is not None and stamp[1] == _hash("\n".join(lines[:end - 1] + lines[end:]))


@dataclass(frozen=True)
class Survey:
    """What the stamps tell of an output directory, without rendering anything."""

    files: dict[str, str]   # relative path -> the op that renders it (DERIVATIONS.md: "")
    status: TreeStatus      # stale: on disk, but not as rendered from the current inputs (no diff)

    def changed_ops(self) -> list[str]:
        """The ops with a module that is stale or missing: rendering them is what can still fail."""
        return sorted({self.files[path] for path in self.status.stale + self.status.missing} - {""})


def survey(out: Path, spec: Path, styles, source: str, command: str, namespace: str) -> Survey | None:
    """Which files the catalog in `spec` renders to, and which of them are in `out` as rendered from these
    same inputs (a file whose stamp does not match differs from what rendering would write: the rendered
    stamp always matches); None when the catalog is one the parser would refuse as a whole, to let it say so."""
    try:
        catalog = parse_toml(read_text(spec, str(spec), "spec file"), str(spec))
    except SpecError:
        return None
    ops = catalog.get("ops")
    if set(catalog) != {"ops"} or not isinstance(ops, dict) or not ops \
            or len({name.casefold() for name in ops}) != len(ops) or any(map(naming.name_problem, ops)):
        return None
    inputs = planned({name: spec_digest(name, entry) for name, entry in ops.items()},
                     styles, source, command, namespace)
    status = TreeStatus()
    owner = Owner(source)
    for relative, expected in sorted(inputs.items()):     # in the order `files.compare` lists them
        try:
            data = (out / relative).read_bytes()
        except FileNotFoundError:
            status.missing.append(relative)
            continue
        except OSError:
            return None
        if not matches(relative, data, expected):
            (status.stale if owner.claims(relative, data.split(b"\n", 1)[0]) else status.foreign).append(relative)
    scopes = [naming.MODULE_STYLES[style].directory for style in styles]
    status.extra = [path for path in owned_files(out, scopes, owner) if path not in inputs]
    files = {naming.MODULE_STYLES[style].directory + naming.module_file(name): name for name in ops for style in styles}
    return Survey({path: files.get(path, "") for path in inputs}, status)
