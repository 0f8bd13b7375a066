"""Reading a TOML file (a spec or pyproject.toml) within fixed limits, every failure a SpecError.

Light: the standard library and errors.py only, so that `derive check` of an unchanged tree reads the
spec through it without importing SymPy.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from .errors import SpecError

MAX_TOML_BYTES = 1_000_000    # checked while reading: a huge file, or /dev/zero, fails at once


def read_text(path: Path, shown: str, what: str) -> str:
    """The file's text: at most MAX_TOML_BYTES are read, and a UTF-8 byte order mark is dropped."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_TOML_BYTES + 1)
        if len(raw) > MAX_TOML_BYTES:
            raise SpecError(f"{what} is larger than the limit of {MAX_TOML_BYTES} bytes", path=shown)
        return raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {what}: {exc}", path=shown) from None


def parse_toml(text: str, path: str) -> dict:
    """tomllib.loads; tomllib recurses once per level of arrays nested in arrays, so a deep one is a limit."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, text, path) from None
    except (RecursionError, MemoryError):
        raise SpecError("TOML nested too deeply (arrays or inline tables inside each other)", path=path) from None


def toml_error(exc: tomllib.TOMLDecodeError, text: str, path: str) -> SpecError:
    """tomllib's message, with its position moved into the `path:line:col` prefix and duplicates named."""
    message = str(exc)
    match = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if match:
        line, column = int(match[1]), int(match[2])
    elif message.endswith(" (at end of document)"):
        line, column = max(1, len(text.splitlines())), None
    else:
        line, column = None, None
    message = re.sub(r" \(at (line \d+, column \d+|end of document)\)$", "", message)
    duplicate = re.fullmatch(r"Cannot declare \('ops', '([^']*)'\) twice", message)
    if duplicate:
        return SpecError(f"duplicate op name: [ops.{duplicate[1]}] is declared twice",
                         path=path, line=line, op=duplicate[1])
    if message == "Cannot overwrite a value" and line is not None:
        key = re.match(r"\s*([^\s=]+)\s*=", text.splitlines()[line - 1])
        if key:
            message = f"key '{key[1]}' is set twice"
    return SpecError(f"TOML syntax error: {message}", path=path, line=line, column=column)
