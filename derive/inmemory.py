"""Ops derived in the running process: `derive.op(...)` for one equation, `derive.load(path)` for a catalog.

The same pipeline as `derive generate`, with no file in between: the spec is written as TOML text, parsed,
built and rendered to the module text `generate` would write (`Op.source`, byte for byte), and that text is
executed into a fresh module object. Each spec gets its own custom-op namespace (`naming.in_memory_namespace`),
so an in-memory op never replaces a generated module's op or another spec's. Results are kept per spec text:
running a notebook cell again derives nothing.
"""

from __future__ import annotations

import json
import linecache
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path

from . import naming
from .build import module_file
from .errors import SpecError
from .explain import Explanation, explain, parse_shapes, render_explanation
from .model import Catalog, OpSpec
from .pipeline import DEFAULT_BUDGET, Built, build_op
from .reading import read_text
from .spec import parse_catalog
from .stamp import header, planned

DEFAULT_NAME = "op"           # of an op `derive.op` is not given a name for: op_forward, OpFunction, ...
IN_MEMORY = "<derive.op>"     # where the spec of `op()` comes from, in messages
STYLE = "contraction"         # the style of the in-memory modules (what `derive generate` writes into --out)
OUT = "generated"             # the --out of the command `Op.command` that writes `Op.source` to a file

_built: dict[tuple[str, str], dict[str, Op]] = {}    # (spec label, spec text) -> its ops, by name


class Op:
    """An op derived in this process: calling it runs the generated autograd.Function; every name of its
    generated module is an attribute (`<op>_forward`, `<Op>Function`, `<op>_op`, ...), and so are the
    short names below."""

    def __init__(self, built: Built, module: types.ModuleType, spec: str, source: str, command: str,
                 namespace: str):
        self.name = built.op.name
        self.spec = spec            # the TOML text of the spec (`derive.op`: of this op alone)
        self.source = source        # the module text, as `command` writes it
        self.command = command      # the `derive generate` command that writes `source` from `spec`
        self.namespace = namespace  # the torch.library namespace of the custom op
        self.module = module
        self._built = built
        name = self.name
        self.forward = getattr(module, naming.forward(name))
        self.backward = getattr(module, naming.backward(name))
        self.jvp = getattr(module, naming.jvp(name))
        self.Function = getattr(module, naming.function_class(name))
        self.apply = self.Function.apply
        self.custom_op = getattr(module, naming.custom_op(name))

    @property
    def op_spec(self) -> OpSpec:
        return self._built.op

    def __call__(self, *args, **kwargs):
        return getattr(self.module, self.name)(*args, **kwargs)

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        try:
            return getattr(self.__dict__["module"], attribute)
        except (KeyError, AttributeError):
            raise AttributeError(f"op '{self.__dict__.get('name')}' has no attribute {attribute!r}") from None

    def __dir__(self):
        return sorted(set(super().__dir__()) | {n for n in vars(self.module) if not n.startswith("_")})

    def explain(self, format: str | None = None, inputs: tuple[str, ...] | None = None,
                shapes: str | None = None) -> Explanation | str:
        """The derivation step by step: an Explanation (shown as Markdown in a notebook, as text in a terminal),
        or its text in `format` (text, markdown, latex, html); `inputs` and `shapes` as `derive explain` takes them."""
        explanation = explain(self._built, tuple(inputs) if inputs else None, parse_shapes(shapes, self.op_spec))
        return explanation if format is None else render_explanation(explanation, format)

    def verify(self) -> None:
        """derive's checks of the op against autograd of its `reference` (`testing.verify_op`'s)."""
        from .testing import verify_module
        verify_module(self.op_spec, self.module)

    def __repr__(self) -> str:
        return f"<derive op {self.name}: {self.op_spec.equation}>"


def op(equation: str, inputs: list[str], params: dict[str, float] | None = None, reference: str | None = None,
       *, name: str | None = None, **spec_keys) -> Op:
    """Derive one op in this process from its equation, as a spec's [ops.<name>] table would declare it;
    `name` (default "op") names its functions (`<name>_forward`, ...), and `spec_keys` are the table's other
    keys (doc, differentiable, ranges, ...). A spec it cannot derive raises SpecError."""
    name = DEFAULT_NAME if name is None else name
    entry = {"equation": equation, "inputs": inputs}
    if params is not None:
        entry["params"] = params
    if reference is not None:
        entry["reference"] = reference
    entry.update(spec_keys)
    text = f"[ops.{_toml_key(name)}]\n" + "".join(f"{_toml_key(key)} = {_toml_value(value, name, key)}\n"
                                                    for key, value in entry.items())
    try:
        return _derive(f"{name}.toml", text, IN_MEMORY)[name]
    except SpecError as error:    # the TOML is ours: its lines would point nowhere the user wrote
        raise SpecError(error.message, path=IN_MEMORY, op=error.op or name) from None


def load(spec_path: str | Path) -> dict[str, Op]:
    """Derive every op of a spec file in this process: op name -> Op."""
    shown = str(spec_path)
    return dict(_derive(shown, read_text(Path(spec_path), shown, "spec file"), shown))


def _derive(label: str, text: str, path: str) -> Mapping[str, Op]:
    """The ops of the catalog `text`, built once per (label, text); `path` names it in messages."""
    key = (label, text)
    if key not in _built:
        catalog = parse_catalog(text, path)
        namespace = naming.in_memory_namespace(label, text)
        source, command = header(label, OUT, namespace)
        _built[key] = {op.name: _build(op, catalog, text, source, command, namespace) for op in catalog.ops}
    return _built[key]


def _build(op: OpSpec, catalog: Catalog, text: str, source: str, command: str, namespace: str) -> Op:
    built = build_op(op, budget=DEFAULT_BUDGET)     # every style: explain shows both
    inputs = planned({other.name: other.digest for other in catalog.ops}, (STYLE,), source, command, namespace)
    _, module_text = module_file(built, STYLE, source, command, namespace, inputs)
    return Op(built, _execute(module_text, f"{namespace}_{op.name}", f"<derive op {op.name} ({namespace})>"),
              text, module_text, command, namespace)


def _execute(text: str, module_name: str, filename: str) -> types.ModuleType:
    """A fresh module from `text`; its lines are kept in linecache, so tracebacks and inspect show them."""
    module = types.ModuleType(module_name)
    module.__file__ = filename
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    sys.modules[module_name] = module     # where pickle and torch look a function's module up
    try:
        exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102 -- derive's own rendering
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# --- the spec as TOML text ------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value, op: str, key: str) -> str:
    """A TOML value of the spec table (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)     # 1.5, 1e-05, inf, -inf, nan: each TOML's spelling too
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item, op, key) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v, op, key)}" for k, v in value.items()) + " }"
    raise SpecError(f"'{key}': a {type(value).__name__} cannot be written in a spec (strings, numbers, lists "
                    f"and dicts only)", path=IN_MEMORY, op=op)
