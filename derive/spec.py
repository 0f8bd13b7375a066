"""Stage 1, spec -> model: read a TOML catalog and parse each op into SymPy.

Nothing in a spec is ever executed. Equations are parsed with `ast` and the SymPy
tree is built node by node from a whitelist; torch reference expressions are
checked against a whitelist and re-printed from their AST.
"""

from __future__ import annotations

import ast
import functools
import io
import keyword
import math
import re
import tokenize
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import sympy

from . import functions, naming
from .model import (INFINITY, AffineRead, Catalog, OpSpec, Param, SpecError, TensorInput, index_symbol, param_symbol,
                    scalar_symbol, size_symbol, size_text, tensor_symbol)
from .layers import parse_layer
from .naming import BATCH, default_catalog_path
from .optional import substitute
from .reading import parse_toml, read_text
from .stamp import spec_digest

MAX_SOURCE_CHARS = 4000
MAX_AST_NODES = 600
MAX_AST_DEPTH = 40
MAX_WHERE = 2                 # where() calls per equation: their derivatives' cases multiply
MAX_BRANCHES = 6              # where, Max, Min and Abs calls per equation
MAX_NESTED_REDUCTIONS = 6     # sum/mean/logsumexp/softmax inside each other (five nested sums: ~3 s to derive)
MAX_NESTED_NORMALIZED = 3     # logsumexp/softmax inside each other: each level ~2.5x the derivation time
MAX_BRANCHES_NORMALIZED = 2   # where, Max, Min and Abs inside softmax/logsumexp: 3 take ~36 s, 6 over a minute
MAX_EXPONENT = 1000           # |constant exponent|; larger powers overflow float64 anyway
MAX_CONSTANT_BITS = 4096      # numerator and denominator of any constant
MAX_OPS = 200                 # ops per catalog
MAX_ARGUMENTS = 32            # inputs and params of one op: a custom op's schema allows 64 arguments in all
MAX_RANK = 8                  # indices of one input or of the result (the batch '...' counts as one)

OP_KEYS = {"doc", "inputs", "equation", "reference", "differentiable", "integer", "params", "ranges", "sizes", "pad",
           "pad_value", "optional", "layer", "saving"}
SAVING_POLICIES = ("auto", "save", "recompute")   # the `saving` key: see derive/saving.py, worth_saving
MAX_FIXED_SIZE = 1 << 20      # a size the spec sets (`sizes`), or zeros it pads with (`pad`)
RETIRED_KEYS = {
    "step_at_zero": "'step_at_zero' is retired: a kink's value is set where it is written, as the first argument's "
                    "share of the gradient at a tie: Max(x[i], 0, tie=0) is relu (0 at 0), Max(x[i], lo, tie=1) "
                    "is clamp_min (passes at the bound); without tie= Max and Min split a tie evenly",
}
REQUIRED_KEYS = ("inputs", "equation")    # without a `reference`, verify_op has no ground truth


# Spec function name -> SymPy constructor. Everything else is refused.
FUNCTIONS = {
    "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt, "tanh": sympy.tanh,
    "sin": sympy.sin, "cos": sympy.cos, "erf": sympy.erf,
    "tan": sympy.tan, "atan": sympy.atan, "asin": sympy.asin, "acos": sympy.acos, "atan2": functions.atan2,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "asinh": sympy.asinh, "acosh": sympy.acosh, "atanh": sympy.atanh,
    "sign": functions.sign,
    "sigmoid": functions.sigmoid, "softplus": functions.softplus, "log1p": functions.log1p,
    "Abs": functions.Abs, "abs": functions.Abs,
    "Max": sympy.Max, "max": sympy.Max, "Min": sympy.Min, "min": sympy.Min,
}
TIED = {"max": functions.max_tie, "min": functions.min_tie}    # Max/Min with tie=
REDUCTIONS = ("sum", "mean", "logsumexp", "softmax")
EXTREMA = {"max": True, "Max": True, "min": False, "Min": False}    # max(expr, i, ...): a reduction; True: max
EXTREMUM_TIES = ("split", "first")
NOT_DIFFERENTIABLE = {"floor", "ceil", "round", "trunc", "argmax", "argmin"}
ARGUMENTS = {"atan2": 2}       # functions of more than one argument (Max and Min take any number from two)
CONSTANTS = {"pi": sympy.pi, "inf": INFINITY}    # inf: masks, where(s <= t, a, -inf)
COMPARISONS = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge}
# comparisons of index positions (where(k <= t, ...)): a constant mask, so equality is allowed too
INDEX_COMPARISONS = COMPARISONS | {ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}


def _not_float64(value: sympy.Expr) -> sympy.Expr | None:
    """The first constant in `value` that generated code could not hold as a finite float, or None."""
    if value.is_number:
        try:
            return None if math.isfinite(float(sympy.N(value, 20))) else value
        except (OverflowError, TypeError):    # an int too large for a float; a complex number
            return value
    return next((found for arg in value.args if isinstance(arg, sympy.Expr)
                 and (found := _not_float64(arg)) is not None), None)


def _short(value: sympy.Expr) -> str:
    text = sympy.sstr(value)
    return text if len(text) <= 40 else sympy.sstr(sympy.N(value, 3))


@dataclass
class _Locator:
    """Finds the line (and column) of an op's key in the TOML text, for messages."""

    path: str
    lines: list[str]

    def line_of(self, op: str, key: str | None = None) -> int | None:
        header = re.compile(rf"^\s*\[\s*ops\s*\.\s*\"?{re.escape(op)}\"?\s*\]")
        start = next((i for i, text in enumerate(self.lines) if header.match(text)), None)
        if start is None or key is None:
            return None if start is None else start + 1
        key_line = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, len(self.lines)):
            if self.lines[i].lstrip().startswith("["):
                break
            if key_line.match(self.lines[i]):
                return i + 1
        return start + 1

    def error(self, message: str, op: str, key: str | None = None, node: ast.AST | None = None):
        line = self.line_of(op, key)
        column = None
        if node is not None and line is not None and hasattr(node, "col_offset"):
            text = self.lines[line - 1]
            quote = min((i for i in (text.find('"'), text.find("'")) if i >= 0), default=-1)
            if quote >= 0:
                column = quote + 2 + node.col_offset
        return SpecError(message, path=self.path, line=line, column=column, op=op)


def line_of_op(source: str, op: str, key: str | None = None) -> int | None:
    """The line of an op's key in the spec file `source` names (as in messages), when that file can be read."""
    candidates = [Path(source)]
    if source == default_catalog_path().name:
        candidates.append(default_catalog_path())
    for path in candidates:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        line = _Locator(str(path), lines).line_of(op, key)
        if line is not None:
            return line
    return None


def load_catalog(path: str | Path | None = None) -> Catalog:
    path = Path(path) if path is not None else default_catalog_path()
    shown = path.name if path == default_catalog_path() else str(path)
    return parse_catalog(read_text(path, shown, "spec file"), shown)


def parse_catalog(text: str, path: str = "<spec>") -> Catalog:
    text = text.removeprefix("\ufeff")     # a UTF-8 byte order mark, as some editors write
    data = parse_toml(text, path)
    extra = set(data) - {"ops"}
    if extra:
        raise SpecError(f"unknown top-level key(s) {sorted(extra)}; ops go under [ops.<name>]", path=path)
    ops = data.get("ops")
    if not isinstance(ops, dict) or not ops:
        raise SpecError("empty catalog: no [ops.<name>] tables", path=path)
    if len(ops) > MAX_OPS:
        raise SpecError(f"{len(ops)} ops in one catalog; the limit is {MAX_OPS} (split it into several specs)",
                        path=path)
    locator = _Locator(path, text.splitlines())
    by_folded: dict[str, str] = {}
    for name in ops:
        other = by_folded.setdefault(name.casefold(), name)
        if other != name:
            raise locator.error(f"op names '{other}' and '{name}' differ only in case; their files would "
                                f"collide on case-insensitive file systems", name)
    parsed = [_parse_op(name, entry, locator) for name, entry in ops.items()]
    return Catalog(path=path, ops=tuple(sorted(parsed, key=lambda op: op.name)))


def _parse_op(name: str, entry, locator: _Locator) -> OpSpec:
    _check_entry(name, entry, locator)
    arguments = len(entry["inputs"]) + len(entry.get("params", {}))
    if arguments > MAX_ARGUMENTS:
        raise locator.error(f"{arguments} inputs and params; the limit is {MAX_ARGUMENTS}", name, "inputs")
    inputs = [_parse_declaration(text, name, locator) for text in entry["inputs"]]
    squares, square_sizes = _square_dims([t for t, _ in inputs], str(entry["equation"]))
    inputs = [(square, extra) for square, (_, extra) in zip(squares, inputs)]
    names = [tensor.name for tensor, _ in inputs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise locator.error(f"input '{duplicated[0]}' is declared twice", name, "inputs")
    params = _parse_params(entry, names, name, locator)
    integer, differentiable = _parse_roles(entry, names, name, locator)
    ranges = _parse_ranges(entry, names, name, locator)
    tensors = tuple(TensorInput(t.name, t.indices, t.name in differentiable, t.name in integer) for t, _ in inputs)
    fixed = _parse_fixed_sizes(entry, tensors, name, locator)
    pads = _parse_pads(entry, tensors, name, locator)
    pad_values = _parse_pad_values(entry, tensors, pads, name, locator)
    parser = _EquationParser(name, tensors, tuple(p.name for p in params), locator, sizes=dict(square_sizes),
                             fixed=fixed)
    output, output_indices, rhs = parser.parse(entry["equation"])
    tensors = _check_equation(parser, tensors, params, output, rhs, name, locator)
    unused = sorted(set(fixed) - {i.name for i in rhs.atoms(sympy.Idx)})
    if unused:
        raise locator.error(f"'sizes' sets index '{unused[0]}', which the equation does not use", name, "sizes")
    affine = _infer_ranges(parser, tensors, output, output_indices, fixed, pads, name, locator)
    reference = _check_reference(entry["reference"], names, [p.name for p in params], name, locator) \
        if "reference" in entry else ""
    optional = _parse_optional(entry, tensors, rhs, dict(parser.sizes), name, locator)
    layer = parse_layer(entry, tensors, optional, name, locator) if "layer" in entry else None
    return OpSpec(
        name=name,
        doc=entry.get("doc", "").strip(),
        inputs=tensors,
        params=tuple(params),
        output=output,
        output_indices=output_indices,
        rhs=rhs,
        equation=entry["equation"].strip(),
        reference=reference,
        index_sizes=tuple(sorted(parser.sizes.items())),
        ranges=tuple(sorted((k, float(v[0]), float(v[1])) for k, v in ranges.items())),
        source=locator.path,
        digest=spec_digest(name, entry),
        fixed_sizes=tuple(sorted(fixed.items())),
        pads=tuple(sorted((tensor, index, before, after) for (tensor, index), (before, after) in pads.items())),
        pad_values=tuple(sorted(pad_values.items())),
        optional=optional,
        layer=layer,
        saving=entry.get("saving", "auto"),
        **affine,
    )


def _parse_optional(entry: dict, tensors: tuple[TensorInput, ...], rhs: sympy.Expr, sizes: dict[str, str],
                    name: str, locator: _Locator) -> tuple[tuple[str, float], ...]:
    """The `optional` table: input -> the value None stands for (see optional.py). Every set of them may be
    None at once, so each must leave the sizes of its indices known and every other gradient defined."""
    raw = entry.get("optional", {})
    if not isinstance(raw, dict):
        raise locator.error("'optional' must be a table of input = the value None stands for, such as { b = 0 }",
                            name, "optional")
    by_name = {t.name: t for t in tensors}
    for item, value in raw.items():
        if item not in by_name or by_name[item].integer:
            raise locator.error(f"'optional' names '{item}', which is not a floating input", name, "optional")
        if not _is_finite_number(value):
            raise locator.error(f"optional input '{item}' needs a finite number: the value None stands for",
                                name, "optional")
    required = [t for t in tensors if t.name not in raw]
    if not any(t.differentiable for t in required):
        raise locator.error("every differentiable input is optional: with all of them None there is no "
                            "backward", name, "optional")
    known = {sizes.get(i, i) for t in required for i in t.indices}
    for item in raw:
        unknown = next((i for i in by_name[item].indices if sizes.get(i, i) not in known), None)
        if unknown is not None:
            raise locator.error(f"optional input '{item}' has index '{unknown}', which no other input has: "
                                f"without '{item}' its size would be unknown", name, "optional")
    values = {item: float(value) for item, value in raw.items()}
    used = _value_names(substitute(rhs, values))
    lost = next((t.name for t in required if t.differentiable and t.name not in used), None)
    if lost is not None:
        raise locator.error(f"with {', '.join(f'{k} = {v:g}' for k, v in values.items())} for None the equation "
                            f"no longer depends on '{lost}'", name, "optional")
    return tuple((t.name, values[t.name]) for t in tensors if t.name in values)


def _check_entry(name: str, entry, locator: _Locator) -> None:
    """The op's name, its keys and their types, before anything is parsed."""
    problem = naming.name_problem(name)
    if problem:
        raise locator.error(f"bad op name: {problem}", name)
    if not isinstance(entry, dict):
        raise locator.error("an op must be a table of keys", name)
    retired = sorted(set(entry) & set(RETIRED_KEYS))
    if retired:
        raise locator.error(RETIRED_KEYS[retired[0]], name, retired[0])
    unknown = set(entry) - OP_KEYS
    if unknown:
        raise locator.error(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(OP_KEYS)}", name, sorted(unknown)[0])
    for key in REQUIRED_KEYS:
        if key not in entry:
            raise locator.error(f"missing required key '{key}'", name)
    _expect(entry, "doc", str, name, locator)
    _expect(entry, "equation", str, name, locator)
    _expect(entry, "reference", str, name, locator)
    _expect(entry, "saving", str, name, locator)
    if entry.get("saving", "auto") not in SAVING_POLICIES:
        raise locator.error(f"'saving' is {entry['saving']!r}; expected one of {', '.join(SAVING_POLICIES)}",
                            name, "saving")
    _check_text(entry, name, locator)
    if not isinstance(entry["inputs"], list) or not entry["inputs"] or not all(isinstance(s, str) for s in entry["inputs"]):
        raise locator.error("'inputs' must be a non-empty list of strings such as \"x[n, k]\"", name, "inputs")


def _parse_params(entry: dict, names: list[str], name: str, locator: _Locator) -> list[Param]:
    """The `params` table: hyperparameters with a finite default, named apart from the inputs."""
    params = []
    raw_params = entry.get("params", {})
    if not isinstance(raw_params, dict):
        raise locator.error("'params' must be a table of name = default value", name, "params")
    for param, default in raw_params.items():
        problem = naming.name_problem(param)
        if problem:
            raise locator.error(f"bad param name: {problem}", name, "params")
        if param in names:
            raise locator.error(f"param '{param}' has the name of an input", name, "params")
        if not _is_finite_number(default):
            raise locator.error(f"param '{param}' needs a finite number as default", name, "params")
        params.append(Param(param, float(default)))
    return params


def _parse_roles(entry: dict, names: list[str], name: str, locator: _Locator) -> tuple[list[str], list[str]]:
    """(integer inputs, differentiable inputs): by default every input that is not integer gets a gradient."""
    integer = entry.get("integer", [])
    if not isinstance(integer, list) or not all(isinstance(d, str) and d in names for d in integer):
        raise locator.error("'integer' must be a list of input names", name, "integer")
    differentiable = entry.get("differentiable", [n for n in names if n not in integer])
    if not isinstance(differentiable, list) or not all(isinstance(d, str) for d in differentiable):
        raise locator.error("'differentiable' must be a list of input names", name, "differentiable")
    for item in differentiable:
        if item not in names:
            raise locator.error(f"'differentiable' names '{item}', which is not an input", name, "differentiable")
        if item in integer:
            raise locator.error(f"integer input '{item}' cannot be differentiable", name, "differentiable")
    if not differentiable:
        raise locator.error("no differentiable input: there is no backward to derive", name, "differentiable")
    return integer, differentiable


def _parse_ranges(entry: dict, names: list[str], name: str, locator: _Locator) -> dict:
    """The `ranges` table: input -> [low, high] where the op is defined, for test inputs."""
    ranges = entry.get("ranges", {})
    if not isinstance(ranges, dict):
        raise locator.error("'ranges' must be a table of input = [low, high]", name, "ranges")
    for item, bounds in ranges.items():
        if item not in names or not (isinstance(bounds, list) and len(bounds) == 2
                                     and all(_is_finite_number(b) for b in bounds)
                                     and bounds[0] < bounds[1]):
            raise locator.error(f"'ranges' entry '{item}' must name an input and give finite [low, high] with "
                                f"low < high",
                                name, "ranges")
    return ranges


def _parse_fixed_sizes(entry: dict, tensors: tuple[TensorInput, ...], name: str, locator: _Locator) -> dict:
    """The `sizes` table: index -> size, for an index whose size no input's shape gives (`k` of a pooling)."""
    fixed = entry.get("sizes", {})
    if not isinstance(fixed, dict):
        raise locator.error("'sizes' must be a table of index = size, such as { k = 2 }", name, "sizes")
    for index, size in fixed.items():
        owner = next((t.name for t in tensors if index in t.indices), None)
        if owner is not None:
            raise locator.error(f"'sizes' sets index '{index}', a dim of input '{owner}': its size is read off "
                                f"{owner}'s shape", name, "sizes")
        if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_FIXED_SIZE):
            raise locator.error(f"'sizes' entry '{index}' must be a whole number from 1 to {MAX_FIXED_SIZE}",
                                name, "sizes")
    return dict(fixed)


def _parse_pads(entry: dict, tensors: tuple[TensorInput, ...], name: str, locator: _Locator) -> dict:
    """The `pad` table: { x = { l = 1 } } or { x = { l = [1, 2] } }: reads of x's dim l may reach that many
    zeros before (and after) its range. (input, index) -> (before, after)."""
    table = entry.get("pad", {})
    shape = "'pad' must be a table of input = { index = zeros or [before, after] }, such as { x = { l = 1 } }"
    if not isinstance(table, dict):
        raise locator.error(shape, name, "pad")
    pads = {}
    for tensor_name, dims in table.items():
        tensor = next((t for t in tensors if t.name == tensor_name), None)
        if tensor is None:
            raise locator.error(f"'pad' names '{tensor_name}', which is not an input", name, "pad")
        if not isinstance(dims, dict):
            raise locator.error(shape, name, "pad")
        for index, amount in dims.items():
            if index not in tensor.indices or index == BATCH:
                raise locator.error(f"'pad' entry '{tensor_name}.{index}': '{index}' is not a dim of "
                                    f"{tensor_name}[{', '.join(tensor.indices)}]", name, "pad")
            amounts = amount if isinstance(amount, list) else [amount, amount]
            if len(amounts) != 2 or not all(isinstance(a, int) and not isinstance(a, bool)
                                            and 0 <= a <= MAX_FIXED_SIZE for a in amounts):
                raise locator.error(f"'pad' entry '{tensor_name}.{index}' must be a number of zeros (0 to "
                                    f"{MAX_FIXED_SIZE}) or [before, after]", name, "pad")
            pads[(tensor_name, index)] = tuple(amounts)
    return pads


def _parse_pad_values(entry: dict, tensors: tuple[TensorInput, ...], pads: dict, name: str,
                      locator: _Locator) -> dict[str, float]:
    """The `pad_value` table: { x = -inf }: what reads of x in its padding are instead of zeros."""
    table = entry.get("pad_value", {})
    if not isinstance(table, dict):
        raise locator.error("'pad_value' must be a table of input = number, such as { x = -inf }", name, "pad_value")
    values = {}
    for tensor_name, value in table.items():
        tensor = next((t for t in tensors if t.name == tensor_name), None)
        if tensor is None or tensor.integer:
            raise locator.error(f"'pad_value' names '{tensor_name}', which is not a float input", name, "pad_value")
        if not any(t == tensor_name for t, _ in pads):
            raise locator.error(f"'pad_value' names '{tensor_name}', which 'pad' does not pad", name, "pad_value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise locator.error(f"'pad_value' entry '{tensor_name}' must be a number or -inf/inf", name, "pad_value")
        if value != 0:
            values[tensor_name] = float(value)
    return values


def _infer_ranges(parser: _EquationParser, tensors: tuple[TensorInput, ...], output: str,
                  output_indices: tuple[str, ...], fixed: dict, pads: dict, name: str, locator: _Locator) -> dict:
    """Range inference: the size of every index no input's shape gives and `sizes` does not set is the
    largest for which every affine read that uses it stays within its input (and the zeros `pad` allows).
    Then the conditions on the sizes the generated code checks: each inferred size is at least 1, and
    each read whose sizes are all given stays in range."""
    declared = {i for t in tensors for i in t.indices} | set(fixed)
    value = {index: sympy.Integer(size) for index, size in fixed.items()}
    reads = parser.affine_reads
    padded = {(tensor, position): pads.get((tensor, parser.declared_of(tensor)[position]), (0, 0))
              for tensor, access in reads for position in range(len(access.indices))}

    def size(index: str) -> sympy.Expr:
        representative = parser.sizes[index]
        return value.get(representative, size_symbol(representative))

    def extent(tensor: str, position: int) -> sympy.Expr:
        return size(parser.declared_of(tensor)[position])

    unknown = sorted({i.name for _, a in reads for e in a.indices for i in e.atoms(sympy.Idx)
                      if parser.sizes[i.name] == i.name and i.name not in declared})
    exact: dict[tuple[int, int], str] = {}
    sources: dict[str, list[str]] = {}
    while unknown:
        progress = False
        for index in list(unknown):
            bounds = []
            for number, (tensor, access) in enumerate(reads):
                for position, element in enumerate(access.indices):
                    coefficients = _coefficients(element)
                    others = [i for i in coefficients if i.name != index]
                    if coefficients.get(_idx_named(element, index), 0) <= 0 or any(
                            parser.sizes[i.name] in unknown for i in others):
                        continue
                    a = coefficients[_idx_named(element, index)]
                    offset = element.subs({i: 0 for i in element.atoms(sympy.Idx)})
                    reach = sum((c * (size(i.name) - 1) for i, c in coefficients.items() if i.name != index and c > 0),
                                sympy.Integer(0))
                    after = padded[(tensor, position)][1]
                    bounds.append((sympy.floor((extent(tensor, position) + after - 1 - offset - reach) / a) + 1,
                                   (number, position), access))
            if not bounds:
                continue
            value[index] = sympy.Min(*[b for b, _, _ in bounds])
            if len(bounds) == 1:
                exact[bounds[0][1]] = index
            sources[index] = [index_text(access) for _, _, access in bounds]
            unknown.remove(index)
            progress = True
        if not progress:
            index = unknown[0]
            raise locator.error(f"the size of index '{index}' cannot be inferred: no read x[..., a*{index} + ...] "
                                f"with a positive a and the other indices' sizes known bounds it; set it with "
                                f"sizes = {{ {index} = N }} or declare an input with it", name, "equation")
    checks = []
    for index in sorted(set(value) - set(fixed)):
        checks.append((value[index] >= 1,
                       f"the size of index {index} inferred from {' and '.join(sources[index])}, "
                       f"{size_text(value[index])}, is below 1: an input is too short for the reads"))
    sized = {size_symbol(i): v for i, v in value.items()}
    for number, (tensor, access) in enumerate(reads):
        for position, element in enumerate(access.indices):
            if isinstance(element, sympy.Idx):
                continue
            coefficients = _coefficients(element)
            offset = element.subs({i: 0 for i in element.atoms(sympy.Idx)})
            high = offset + sum((c * (size(i.name) - 1) for i, c in coefficients.items() if c > 0), sympy.Integer(0))
            low = offset + sum((c * (size(i.name) - 1) for i, c in coefficients.items() if c < 0), sympy.Integer(0))
            before, after = padded[(tensor, position)]
            dim = parser.declared_of(tensor)[position]
            sides = [(low >= -before, "below 0")]
            if (number, position) not in exact:     # (the reads an index's size was inferred from reach its end)
                sides.append((high <= extent(tensor, position) - 1 + after, f"past the end of dim {dim}"))
            for condition, side in sides:
                condition = condition.xreplace(sized)
                if condition is sympy.false:
                    raise locator.error(f"{index_text(access)} reads {side} of {tensor} (declare zeros there with "
                                        f"pad = {{ {tensor} = {{ {dim} = [before, after] }} }})", name, "equation")
                if condition is not sympy.true:
                    checks.append((condition, f"{index_text(access)} would read {side} of {tensor}"))
    return dict(
        inferred_sizes=tuple((i, value[i]) for i in sorted(set(value) - set(fixed))),
        affine_reads=tuple(AffineRead(access, tuple(sorted(p for (n, p) in exact if n == number)))
                           for number, (_, access) in enumerate(reads)),
        size_checks=tuple(checks),
    )




def _coefficients(element: sympy.Expr) -> dict[sympy.Idx, int]:
    """The integer coefficient of each index in an affine subscript."""
    return {i: int(element.coeff(i)) for i in element.atoms(sympy.Idx)}


def _idx_named(element: sympy.Expr, name: str):
    return next((i for i in element.atoms(sympy.Idx) if i.name == name), None)


def index_text(access: sympy.Indexed) -> str:
    """x[n, c, 2*t + k]: a read as the spec writes it."""
    return f"{access.base.label.name}[{', '.join(sympy.sstr(i) for i in access.indices)}]"


def _check_equation(parser: _EquationParser, tensors: tuple[TensorInput, ...], params: list[Param], output: str,
                    rhs: sympy.Expr, name: str, locator: _Locator) -> tuple[TensorInput, ...]:
    """What the parsed equation must agree with in the declarations; the inputs with their value ranges."""
    names = [t.name for t in tensors]
    for tensor in tensors:
        if tensor.integer and tensor.name not in parser.value_ranges and tensor.name not in parser.integer_values:
            raise locator.error(f"integer input '{tensor.name}' is never used", name, "integer")
    tensors = tuple(TensorInput(t.name, t.indices, t.differentiable, t.integer, parser.value_ranges.get(t.name))
                    for t in tensors)
    if output in names or output in {p.name for p in params}:
        raise locator.error(f"the result '{output}' has the name of an input or param", name, "equation")
    taken = naming.module_names(name)
    for item in sorted({*names, *(p.name for p in params), output, *parser.sizes} & taken):
        raise locator.error(f"'{item}' is a name the generated module defines for op '{name}' "
                            f"(its function, Function class or custom op)", name, "equation")
    for index in set(parser.sizes) - {BATCH}:
        problem = naming.name_problem(index)
        if problem:
            raise locator.error(f"bad index name: {problem}", name, "equation")
        if index in names or index == output or index in {p.name for p in params}:
            raise locator.error(f"index '{index}' has the name of a tensor or param", name, "equation")
    used = _value_names(rhs)
    for tensor in tensors:
        if tensor.differentiable and tensor.name not in used:
            how = ("depends on it only through where() conditions, and comparisons are not differentiable"
                   if tensor.name in _names(rhs) else "does not use it")
            raise locator.error(f"input '{tensor.name}' is differentiable but the equation {how} (its gradient "
                                f"would be zero everywhere); list only inputs that get a gradient in "
                                f"'differentiable'", name, "equation")
    return tensors


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_text(entry: dict, op: str, locator: _Locator) -> None:
    """Refuse control characters (other than newline and tab) in every string of an op's entry."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from strings(item)

    for key, value in entry.items():
        for text in strings(value):
            bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t"), None)
            if bad is not None:
                raise locator.error(f"'{key}' contains the control character U+{ord(bad):04X}", op, key)
            # format characters (bidirectional overrides such as U+202E, zero-width spaces) and line separators
            # make text read differently from what it is, in the spec and in the code it is copied into
            hidden = next((c for c in text if unicodedata.category(c) in ("Cf", "Zl", "Zp")), None)
            if hidden is not None:
                raise locator.error(f"'{key}' contains the invisible or direction-changing character "
                                    f"U+{ord(hidden):04X} ({unicodedata.name(hidden, 'unnamed')})", op, key)


def _names(expr: sympy.Expr) -> set[str]:
    """Names of the tensors and scalars in `expr`."""
    return {a.name for a in expr.atoms(sympy.Symbol, sympy.IndexedBase)}


def _value_names(expr: sympy.Expr) -> set[str]:
    """Names of the tensors and scalars `expr` depends on other than through where() conditions."""
    if isinstance(expr, sympy.Piecewise):
        return set().union(*(_value_names(value) for value, _ in expr.args))
    if isinstance(expr, (sympy.Symbol, sympy.IndexedBase)):
        return {expr.name}
    return set().union(*(_value_names(arg) for arg in expr.args))


def _expect(entry, key, kind, op, locator):
    if key in entry and not isinstance(entry[key], kind):
        raise locator.error(f"'{key}' must be a {kind.__name__}", op, key)


def _parse_declaration(text: str, op: str, locator: _Locator):
    """`x[n, k]` -> TensorInput(x, (n, k)); a bare `s` is a 0-d tensor."""
    try:
        node = _parse_python(text, "eval").body
    except (SyntaxError, ValueError) as exc:
        problem = _keyword_in(text) if isinstance(exc, SyntaxError) else None
        raise locator.error(f"bad input declaration {text!r}: {problem or 'expected name[index, ...]'}",
                            op, "inputs") from None
    if isinstance(node, ast.Name):
        name, indices = node.id, ()
    elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        indices = _index_names(node)
        if indices is None:
            raise locator.error(f"bad input declaration {text!r}: indices must be names, "
                                f"optionally after a leading '...'", op, "inputs")
        name = node.value.id
    else:
        raise locator.error(f"bad input declaration {text!r}: expected name[index, ...]", op, "inputs")
    for item in (name, *[i for i in indices if i != BATCH]):
        problem = naming.name_problem(item)
        if problem:
            raise locator.error(f"bad input declaration {text!r}: {problem}", op, "inputs")
    if len(indices) > MAX_RANK:
        raise locator.error(f"input '{name}' has {len(indices)} indices; the limit is {MAX_RANK}", op, "inputs")
    return TensorInput(name, indices, True), None


def _square_dims(inputs: list[TensorInput], equation: str) -> tuple[list[TensorInput], dict[str, str]]:
    """A declaration that repeats an index, `a[i, i]`, is a square input: each repeat is renamed apart
    (`i_1`), and ranges over the first's size. Returns the inputs and {renamed index: index}."""
    taken = {i for t in inputs for i in t.indices} | set(re.findall(r"\w+", equation))
    renamed, result = {}, []
    for tensor in inputs:
        indices = []
        for index in tensor.indices:
            if index in indices:
                fresh = next(f"{index}_{k}" for k in range(1, len(taken) + 2) if f"{index}_{k}" not in taken)
                taken.add(fresh)
                renamed[fresh] = index
                index = fresh
            indices.append(index)
        result.append(TensorInput(tensor.name, tuple(indices), tensor.differentiable))
    return result, renamed


def _parse_python(source: str, mode: str) -> ast.AST:
    """`ast.parse` of spec text, without the SyntaxWarnings (such as "invalid escape sequence") that Python
    would print on stderr: a spec problem is reported once, as a SpecError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source.strip(), mode=mode)


def _keyword_in(source: str) -> str | None:
    """'<kw>' is a Python keyword ...: why a spec text that fails to parse may have failed."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NAME and keyword.iskeyword(token.string):
                return f"'{token.string}' is a Python keyword and cannot be a name"
    except (tokenize.TokenError, SyntaxError):
        pass
    return None


def _column(offset: int) -> ast.AST:
    """A stand-in node that carries only a column, for messages."""
    return ast.Pass(col_offset=offset)


def _first_use(tree: ast.AST, name: str) -> ast.AST | None:
    """The leftmost use of `name` in `tree`, for the column of a message."""
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == name]
    return min(uses, key=lambda n: (n.lineno, n.col_offset), default=None)


def _index_names(node: ast.Subscript) -> tuple[str, ...] | None:
    """The index names of `t[i, j]` or `t[..., i]`; None when something else is inside the brackets."""
    elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    names = []
    for position, element in enumerate(elements):
        if isinstance(element, ast.Constant) and element.value is Ellipsis and position == 0:
            names.append(BATCH)
        elif isinstance(element, ast.Name):
            names.append(element.id)
        else:
            return None
    return tuple(names)


@dataclass
class _EquationParser:
    """Builds the SymPy right-hand side from the equation's AST, checking indices as it goes."""

    op: str
    inputs: tuple[TensorInput, ...]
    params: tuple[str, ...]
    locator: _Locator
    sizes: dict[str, str] = field(default_factory=dict)   # index -> declared index whose size it has
    value_ranges: dict[str, str] = field(default_factory=dict)  # integer input -> size its values index
    integer_values: set[str] = field(default_factory=set)   # integer inputs read as values (mask[i] * x[i])
    branches: dict[str, int] = field(default_factory=dict)   # 'where' / 'kink' / 'normalized' -> how many
    reductions: int = 0     # reductions around the node being parsed
    normalized: int = 0     # softmax and logsumexp calls around it
    fixed: dict[str, int] = field(default_factory=dict)    # index -> size the spec's `sizes` sets
    affine_reads: list = field(default_factory=list)       # (input, access) of each read with an affine subscript

    def declared_of(self, name: str) -> tuple[str, ...]:
        return next(t.indices for t in self.inputs if t.name == name)
    positions: int = 0      # > 0 inside a comparison of index positions (where(k <= t, ...))
    merged: dict[str, str] = field(default_factory=dict)    # size -> the size a diagonal a[i, i] made it

    def error(self, message: str, node: ast.AST | None = None) -> SpecError:
        return self.locator.error(message, self.op, "equation", node)

    def parse(self, source: str):
        for tensor in self.inputs:
            for index in tensor.indices:
                self.sizes.setdefault(index, index)
        for index in self.fixed:
            self.sizes.setdefault(index, index)
        if len(source) > MAX_SOURCE_CHARS:
            raise self.error(f"equation is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}")
        try:
            tree = _parse_python(source, "exec")
        except SyntaxError as exc:
            at = _column(exc.offset - 1 + len(source) - len(source.lstrip())) if exc.offset and exc.lineno == 1 else None
            raise self.error(f"equation is not valid syntax: {_keyword_in(source) or exc.msg}", at) from None
        except ValueError as exc:
            raise self.error(f"equation is not valid syntax: {exc}") from None
        except (RecursionError, MemoryError):
            raise self.error(f"equation is nested too deeply (limit {MAX_AST_DEPTH} levels)") from None
        _check_size(tree, self.error)
        comment = next((t for t in tokenize.generate_tokens(io.StringIO(source.strip()).readline)
                        if t.type == tokenize.COMMENT), None)
        if comment is not None:
            raise self.error("comments are not allowed in an equation (it is copied into the generated docstrings)",
                             _column(comment.start[1] + len(source) - len(source.lstrip()))
                             if comment.start[0] == 1 else None)
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign) or len(tree.body[0].targets) != 1:
            raise self.error("equation must be one assignment: out[i, ...] = expression")
        statement = tree.body[0]
        output, output_indices = self._target(statement.targets[0])
        rhs, free = self._expr(statement.value)
        rhs = rhs.xreplace({size_symbol(old): size_symbol(new) for old, new in self.merged.items()})
        missing = [index for index in output_indices if index not in free]
        if missing:
            raise self.error(f"index '{missing[0]}' on the left-hand side is not provided by any right-hand term",
                             _first_use(statement.targets[0], missing[0]))
        extra = sorted(free - set(output_indices))
        if extra:
            index = extra[0]
            owners = sorted({a.base.name for a in rhs.atoms(sympy.Indexed)
                             if any(getattr(i, "name", None) == index for i in a.indices)})
            owner = owners[0] if owners else "the tensor"
            raise self.error(f"index '{index}' of {owner} is neither on the left-hand side nor summed over: add it "
                             f"to the result or reduce it with sum/mean (for a size-1 dim, declare {owner} without "
                             f"it: derive does not broadcast (N, 1) against (N))",
                             _first_use(statement.value, index))
        return output, output_indices, rhs

    def _target(self, node):
        if isinstance(node, ast.Name):
            return node.id, ()
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            indices = _index_names(node)
            if indices is not None:
                if len(set(indices)) != len(indices):
                    raise self.error("the left-hand side repeats an index", node)
                if len(indices) > MAX_RANK:
                    raise self.error(f"the result has {len(indices)} indices; the limit is {MAX_RANK}", node)
                problem = naming.name_problem(node.value.id)
                if problem:
                    raise self.error(f"bad result name: {problem}", node)
                return node.value.id, indices
        raise self.error("left-hand side must be name or name[index, ...]", node)

    def _expr(self, node) -> tuple[sympy.Expr, set[str]]:
        """SymPy expression for `node` and the set of its free index names."""
        value, free = self._node(node)
        if value.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            raise self.error(f"{ast.unparse(node)} is infinite or undefined", node)
        if any(max(abs(n.p).bit_length(), n.q.bit_length()) > MAX_CONSTANT_BITS for n in value.atoms(sympy.Rational)):
            raise self.error(f"a constant in {ast.unparse(node)[:40]} is too large (over {MAX_CONSTANT_BITS} bits)", node)
        constant = _not_float64(value)
        if constant is not None and not sympy.N(constant, 20).is_extended_real:
            raise self.error(f"constant {_short(constant)} in {ast.unparse(node)[:40]} is not a real number "
                             f"(generated code computes in real floats)", node)
        if constant is not None:
            raise self.error(f"constant {_short(constant)} in {ast.unparse(node)[:40]} is not a finite float64 "
                             f"(generated code computes in floats)", node)
        return value, free

    def _node(self, node) -> tuple[sympy.Expr, set[str]]:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.error(f"constant {node.value!r} is not a number", node)
            # (an int of 2**1024 or more cannot even be converted to a float to be checked)
            if isinstance(node.value, int) and abs(node.value) >= 2 ** 1024 or not math.isfinite(node.value):
                raise self.error("number is too large for a float (it overflows to infinity)", node)
            # the decimal as written (repr): nsimplify would round 0.7978845608028654 to 15 digits
            return sympy.Rational(repr(node.value)) if isinstance(node.value, float) else sympy.Integer(node.value), set()
        if isinstance(node, ast.Name):
            if node.id in self.params:
                return param_symbol(node.id), set()
            if node.id in CONSTANTS and all(t.name != node.id for t in self.inputs):
                return CONSTANTS[node.id], set()
            if self.positions and node.id in self.sizes and all(t.name != node.id for t in self.inputs):
                return index_symbol(node.id, self.sizes[node.id]), {node.id}
            tensor = self._tensor(node.id, node)
            if tensor.indices:
                raise self.error(f"input '{node.id}' has {len(tensor.indices)} dim(s); index it as "
                                 f"{node.id}[{', '.join(tensor.indices)}]", node)
            if tensor.integer:
                self.integer_values.add(node.id)
            return scalar_symbol(node.id), set()
        if isinstance(node, ast.Subscript):
            access, free = self._access(node)
            if self._tensor(node.value.id, node).integer:
                self.integer_values.add(node.value.id)
            return access, free
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value, free = self._expr(node.operand)
            return (-value if isinstance(node.op, ast.USub) else value), free
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Compare):
            raise self.error("comparisons are not differentiable; use them only as where(condition, a, b)", node)
        raise self.error(f"'{type(node).__name__}' is not allowed in an equation", node)

    def _tensor(self, name: str, node) -> TensorInput:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        if name in FUNCTIONS or name in REDUCTIONS:
            raise self.error(f"'{name}' is a function; call it as {name}(...)", node)
        if name in self.sizes:
            raise self.error(f"index '{name}' is a position, not a value: use it as a subscript, compare it with "
                             f"another index in a where() condition (as in where(k <= t, ...)), or write its "
                             f"size as size({name})", node)
        raise self.error(f"unknown name '{name}' (not an input, param or index)", node)

    def _access(self, node: ast.Subscript):
        if not isinstance(node.value, ast.Name):
            raise self.error("only inputs can be indexed, as name[index, ...]", node)
        tensor = self._tensor(node.value.id, node)
        elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        gathered = {p: e for p, e in enumerate(elements) if isinstance(e, ast.Subscript)}
        if gathered:
            return self._gather(node, tensor, elements, gathered)
        if any(not isinstance(e, (ast.Name, ast.Constant)) for e in elements):
            return self._affine_access(node, tensor, elements)
        indices = _index_names(node)
        if indices is None:
            raise self.error(f"'{tensor.name}' must be indexed by index names (and a leading '...')", node)
        if (BATCH in indices) != (BATCH in tensor.indices):
            raise self.error(f"input '{tensor.name}' is declared {'with' if BATCH in tensor.indices else 'without'} "
                             f"batch dims '...' and must be indexed the same way", node)
        if len(indices) != len(tensor.indices):
            raise self.error(f"input '{tensor.name}' is declared with {len(tensor.indices)} dim(s) "
                             f"[{', '.join(tensor.indices)}] but indexed with {len(indices)}", node)
        for index, declared in zip(indices, tensor.indices):
            if index != BATCH and indices.count(index) > 1 and index not in (t.name for t in self.inputs):
                # a diagonal, a[i, i]: the dims it reads along must have one size
                first = tensor.indices[indices.index(index)]
                self._same_size(self.sizes[first], self.sizes[declared])
            if (index == BATCH) != (declared == BATCH):
                raise self.error(f"'...' must stand where '{tensor.name}' declares it", node)
            if index in (t.name for t in self.inputs) or index in self.params:
                raise self.error(f"'{index}' is a tensor or param, not an index", node)
            size = self.sizes.setdefault(index, self.sizes[declared])
            if size != self.sizes[declared]:
                raise self.error(f"index '{index}' is used with two different sizes: "
                                 f"'{size}' and '{self.sizes[declared]}' (dim of {tensor.name})", node)
        idx = [index_symbol(i, self.sizes[i]) for i in indices]
        return tensor_symbol(tensor.name)[tuple(idx)], set(indices)

    def _affine_access(self, node, tensor: TensorInput, elements):
        """`x[n, c, 2*t + k - 1]`: subscripts affine in index names with integer coefficients. An index that
        no input declares and `sizes` does not set ranges over its own size, inferred later (_infer_ranges)."""
        if len(elements) != len(tensor.indices):
            raise self.error(f"input '{tensor.name}' is declared with {len(tensor.indices)} dim(s) "
                             f"[{', '.join(tensor.indices)}] but indexed with {len(elements)}", node)
        subscripts, free, seen = [], set(), []
        for element, declared in zip(elements, tensor.indices):
            if (declared == BATCH) != (isinstance(element, ast.Constant) and element.value is Ellipsis):
                raise self.error(f"'...' must stand where '{tensor.name}' declares it", node)
            if declared == BATCH:    # the batch dims, read as they are: an affine read of the named dims after them
                value, names = index_symbol(BATCH, self.sizes[BATCH]), {BATCH}
            elif isinstance(element, ast.Name):
                value, names = self._affine_subscript(element, declared)
            else:
                value, names = self._affine_subscript(element, None)
            seen += sorted(names)
            subscripts.append(value)
            free |= names
        if len(set(seen)) != len(seen):
            raise self.error(f"'{tensor.name}' uses an index in two of its subscripts (diagonals are not "
                             f"supported)", node)
        access = tensor_symbol(tensor.name)[tuple(subscripts)]
        self.affine_reads.append((tensor.name, access))
        return access, free

    def _affine_subscript(self, element, declared: str | None) -> tuple[sympy.Expr, set[str]]:
        """One subscript: a*i + b*j + c. A bare name at a dim ranges over that dim (`declared`)."""
        names: set[str] = set()

        def build(node) -> sympy.Expr:
            if isinstance(node, ast.Name):
                if node.id in (t.name for t in self.inputs) or node.id in self.params:
                    raise self.error(f"'{node.id}' is a tensor or param: a subscript is affine in index names "
                                     f"with whole-number coefficients, such as 2*t + k - 1", node)
                problem = naming.name_problem(node.id)
                if problem:
                    raise self.error(f"bad index name: {problem}", node)
                size = self.sizes.setdefault(node.id, self.sizes[declared] if declared else node.id)
                if declared and size != self.sizes[declared]:
                    raise self.error(f"index '{node.id}' is used with two different sizes", node)
                names.add(node.id)
                return index_symbol(node.id, size)
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool) \
                    and abs(node.value) <= MAX_FIXED_SIZE:
                return sympy.Integer(node.value)
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
                inner = build(node.operand)
                return -inner if isinstance(node.op, ast.USub) else inner
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
                left, right = build(node.left), build(node.right)
                if isinstance(node.op, ast.Mult):
                    if left.atoms(sympy.Idx) and right.atoms(sympy.Idx):
                        raise self.error("a subscript must be affine: a product of two indices is not", node)
                    return left * right
                return left + right if isinstance(node.op, ast.Add) else left - right
            raise self.error(f"a subscript is an index name or affine in index names with whole-number "
                             f"coefficients (2*t + k - 1), not {ast.unparse(node)!r}", node)

        value = sympy.expand(build(element))
        if not value.atoms(sympy.Idx):
            raise self.error(f"subscript {ast.unparse(element)!r} is a constant; a subscript needs an index", element)
        if any(c == 0 for c in value.as_coefficients_dict().values()):
            raise self.error(f"subscript {ast.unparse(element)!r} cancels an index", element)
        return value, {i.name for i in value.atoms(sympy.Idx)}
    def _same_size(self, kept: str, merged: str) -> None:
        """Every index that ranges over the size `merged` ranges over `kept` from now on (and, once the
        equation is parsed, before: `parse` renames the size in what it built)."""
        if kept == merged:
            return
        self.merged[merged] = kept
        for mapping in (self.sizes, self.value_ranges, self.merged):
            for key, value in mapping.items():
                if value == merged:
                    mapping[key] = kept

    def _gather(self, node, tensor: TensorInput, elements, gathered):
        """`w[idx[n], d]`: positions indexed by the values of an integer input."""
        if len(elements) != len(tensor.indices):
            raise self.error(f"input '{tensor.name}' is declared with {len(tensor.indices)} dim(s) "
                             f"but indexed with {len(elements)}", node)
        indices, free = [], set()
        for position, (element, declared) in enumerate(zip(elements, tensor.indices)):
            if position in gathered:
                index_tensor = self._tensor(getattr(element.value, "id", ""), element)
                if not index_tensor.integer:
                    raise self.error(f"'{index_tensor.name}' indexes '{tensor.name}' but is not listed in 'integer'",
                                     element)
                value, value_free = self._access(element)
                previous = self.value_ranges.setdefault(index_tensor.name, self.sizes[declared])
                if previous != self.sizes[declared]:
                    raise self.error(f"integer input '{index_tensor.name}' indexes dims of two different sizes",
                                     element)
                indices.append(value)
                free |= value_free
            elif isinstance(element, ast.Constant) and element.value is Ellipsis and declared == BATCH:
                indices.append(index_symbol(BATCH, self.sizes[BATCH]))
                free.add(BATCH)
            elif isinstance(element, ast.Name):
                size = self.sizes.setdefault(element.id, self.sizes[declared])
                if size != self.sizes[declared]:
                    raise self.error(f"index '{element.id}' is used with two different sizes", element)
                indices.append(index_symbol(element.id, size))
                free.add(element.id)
            else:
                raise self.error(f"'{tensor.name}' must be indexed by index names or integer inputs", element)
        return tensor_symbol(tensor.name)[tuple(indices)], free

    def _binop(self, node: ast.BinOp):
        left, left_free = self._expr(node.left)
        right, right_free = self._expr(node.right)
        free = left_free | right_free
        if isinstance(node.op, ast.Add):
            return left + right, free
        if isinstance(node.op, ast.Sub):
            return left - right, free
        if isinstance(node.op, ast.Mult):
            return left * right, free
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise self.error("division by zero", node)
            return left / right, free
        if isinstance(node.op, ast.Pow):
            if right.is_number and abs(right) > MAX_EXPONENT:
                raise self.error(f"exponent {right} is too large (the limit is {MAX_EXPONENT})", node)
            return left ** right, free
        raise self.error(f"operator '{type(node.op).__name__}' is not allowed", node)

    def _call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            raise self.error("only plain function names can be called (no attributes or methods)", node)
        name = node.func.id
        if name in EXTREMA and len(node.args) >= 2 and any(self._is_index(a, node.args[0]) for a in node.args[1:]):
            return self._extremum(name, node)
        tie = self._tie(name, node)
        if name in REDUCTIONS:
            return self._reduction(name, node)
        if name == "size":
            return self._size(node)
        if name in ("where", "Max", "max", "Min", "min", "Abs", "abs"):
            self._count_branch("where" if name == "where" else "kink", node)
        if name == "where":
            if len(node.args) != 3:
                raise self.error("where(condition, a, b) takes three arguments", node)
            a, a_free = self._expr(node.args[1])
            b, b_free = self._expr(node.args[2])
            condition, condition_free = self._condition(node.args[0])
            return sympy.Piecewise((a, condition), (b, True)), condition_free | a_free | b_free
        if name in NOT_DIFFERENTIABLE:
            raise self.error(f"'{name}' is not differentiable (its derivative is zero almost everywhere "
                             f"and undefined at its jumps)", node)
        if name not in FUNCTIONS:
            known = ", ".join(sorted(set(FUNCTIONS) | set(REDUCTIONS) | {"where", "size"}))
            raise self.error(f"unknown function '{name}' (known: {known})", node)
        if not node.args:
            raise self.error(f"{name}() needs an argument", node)
        args = [self._expr(arg) for arg in node.args]
        free = set().union(*(f for _, f in args))
        values = [v for v, _ in args]
        if name in ("Max", "max", "Min", "min"):
            if len(values) < 2:
                raise self.error(f"{name}() needs at least two arguments", node)
        elif len(values) != ARGUMENTS.get(name, 1):
            count = ARGUMENTS.get(name, 1)
            raise self.error(f"{name}() takes {'one argument' if count == 1 else f'{count} arguments'}", node)
        try:
            if tie is not None:
                return TIED[name.lower()](*values, tie), free
            if name in EXTREMA:     # pairwise from the left, as torch.maximum nests: a tie splits at each level
                return functools.reduce(lambda a, b: TIED[name.lower()](a, b, sympy.S.Half), values), free
            return FUNCTIONS[name](*values), free
        except (TypeError, ValueError) as exc:   # SymPy refusing its arguments, e.g. values it cannot order
            raise self.error(f"{name}() cannot take these arguments: {exc}", node) from None

    def _tie(self, name: str, node: ast.Call) -> sympy.Expr | None:
        """The number of `Max(a, b, tie=t)` / `Min(a, b, tie=t)`: a's share of the gradient where a == b."""
        if not node.keywords:
            return None
        if name not in ("Max", "max", "Min", "min"):
            raise self.error(f"{name}() takes no keyword arguments", node)
        keyword_node = node.keywords[0]
        if len(node.keywords) != 1 or keyword_node.arg != "tie":
            raise self.error(f"{name}() takes one keyword, tie= (the first argument's share of the gradient "
                             f"where the two are equal)", node)
        value = keyword_node.value
        if not (isinstance(value, ast.Constant) and _is_finite_number(value.value) and 0 <= value.value <= 1):
            raise self.error(f"{name}(a, b, tie=t) takes a number t from 0 to 1: a's share of the gradient "
                             f"where a == b (b gets 1 - t)", value)
        if len(node.args) != 2:
            raise self.error(f"tie= needs {name}() of exactly two arguments", node)
        return sympy.nsimplify(value.value)

    def _count_branch(self, kind: str, node) -> None:
        """Each piecewise function multiplies the cases SymPy must reconcile: a fixed limit, not a hang."""
        self.branches[kind] = self.branches.get(kind, 0) + 1
        if self.normalized:
            self.branches["normalized"] = self.branches.get("normalized", 0) + 1
            if self.branches["normalized"] > MAX_BRANCHES_NORMALIZED:
                raise self.error(f"too many piecewise functions inside softmax or logsumexp (the limit is "
                                 f"{MAX_BRANCHES_NORMALIZED}: their cases multiply in the derivative)", node)
        if self.branches.get("where", 0) > MAX_WHERE:
            raise self.error(f"too many where() calls (the limit is {MAX_WHERE} per equation)", node)
        if self.branches.get("where", 0) + self.branches.get("kink", 0) > MAX_BRANCHES:
            raise self.error(f"too many piecewise functions: where, Max, Min and Abs together "
                             f"(the limit is {MAX_BRANCHES} per equation)", node)

    def _condition(self, node):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in INDEX_COMPARISONS \
                and self._positions(node):
            return self._index_condition(node)
        if self._integer_access(node):   # where(mask[i], a, b): true where the integer or bool input is not 0
            value, free = self._expr(node)
            return sympy.Ne(value, 0), free
        if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARISONS):
            raise self.error("a where() condition must be one comparison: <, <=, > or >= (or, between "
                             "indices, == and !=), or an integer input (true where it is not 0)", node)
        left, left_free = self._expr(node.left)
        right, right_free = self._expr(node.comparators[0])
        tensors = {t.name for t in self.inputs}
        if not ((left - right).atoms(sympy.Indexed)
                or {s.name for s in (left - right).free_symbols} & tensors):
            raise self.error("a where() condition must compare a tensor: one on params and numbers alone "
                             "is the same everywhere, so write the branch it picks directly", node)
        return COMPARISONS[type(node.ops[0])](left, right), left_free | right_free

    def _is_index(self, node, body) -> bool:
        """Whether `node` names an index (or the batch `...`): the second argument of a max or min reduction.
        An index no input declares is one where `body` reads an input at it (max(x[n, s], s) of x[n, t])."""
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return True
        if not isinstance(node, ast.Name) or node.id in self.params or any(t.name == node.id for t in self.inputs):
            return False
        read = {name.id for access in ast.walk(body) if isinstance(access, ast.Subscript)
                for name in ast.walk(access.slice) if isinstance(name, ast.Name)}
        return node.id in self.sizes or node.id in read

    def _extremum(self, name: str, node: ast.Call):
        """max(expression, i, ...) / min(expression, i, ...): the largest (smallest) value over the indices, with
        tie="split" (default: equal maxima share the gradient evenly, as torch.amax) or tie="first" (the first
        maximal position, in the order the indices are listed, takes it all, as torch.max(x, dim))."""
        first = False
        for keyword_node in node.keywords:
            value = keyword_node.value
            if keyword_node.arg != "tie" or len(node.keywords) != 1:
                raise self.error(f"{name}(expression, index, ...) takes one keyword, tie=\"split\" or tie=\"first\"",
                                 node)
            if not (isinstance(value, ast.Constant) and value.value in EXTREMUM_TIES):
                raise self.error(f"{name}(expression, index, ..., tie=...) takes tie=\"split\" (equal maxima share the "
                                 f"gradient evenly, as torch.amax) or tie=\"first\" (the first one takes it all, as "
                                 f"torch.max(x, dim))", value)
            first = value.value == "first"
        for arg in node.args[1:]:
            if not self._is_index(arg, node.args[0]):
                raise self.error(f"{name}(expression, index, ...) reduces over index names; {ast.unparse(arg)} is not "
                                 f"one (to compare values elementwise, write {name}(a, b) of values alone)", arg)
        if self.reductions == MAX_NESTED_REDUCTIONS:
            raise self.error(f"reductions are nested too deeply (sum, mean, logsumexp, softmax, max and min inside "
                             f"each other: the limit is {MAX_NESTED_REDUCTIONS})", node)
        self.reductions += 1
        try:
            body, free = self._expr(node.args[0])
        finally:
            self.reductions -= 1
        indices = []
        for arg in node.args[1:]:
            index = BATCH if isinstance(arg, ast.Constant) else arg.id      # `...`: all the batch dims
            if index not in free:
                what = "the batch dims '...'" if index == BATCH else f"index '{index}'"
                raise self.error(f"{name}() over {what}, which its operand does not use", arg)
            if index in {i.name for i in indices}:
                raise self.error(f"{name}() lists index '{index}' twice", arg)
            indices.append(index_symbol(index, self.sizes[index]))
        extremum = EXTREMA[name]
        if first:   # the first position in the listed order: the last index innermost
            for index in reversed(indices):
                body = functions.EXTREMA[extremum, True](body, index)
        else:
            body = functions.EXTREMA[extremum, False](body, *indices)
        return body, free - {i.name for i in indices}

    def _size(self, node: ast.Call):
        """`size(d)`: the size of index d, a number (a constant for differentiation)."""
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name) or node.args[0].id not in self.sizes \
                or any(node.args[0].id == t.name for t in self.inputs):
            raise self.error("size() takes one index name, as in size(d)", node)
        return size_symbol(self.sizes[node.args[0].id]), set()

    def _positions(self, node: ast.Compare) -> bool:
        """Whether a comparison reads index positions (where(k <= t, ...)) rather than tensor values."""
        tensors = {t.name for t in self.inputs} | set(self.params) | set(CONSTANTS)
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        return bool(names & set(self.sizes) - tensors) and not any(isinstance(n, ast.Subscript) for n in ast.walk(node))

    def _index_condition(self, node: ast.Compare):
        """`k <= t`, `s + 1 < t`, `i == j`: a comparison of positions, the same for every input value. An
        index that nothing else gives a size (one only on the left and in conditions) ranges over the
        size of the index it is compared with."""
        sides = (node.left, node.comparators[0])
        names = [[n for n in ast.walk(side) if isinstance(n, ast.Name) and n.id != "size"] for side in sides]
        for side, other in ((0, 1), (1, 0)):
            for name in names[side]:
                if name.id in self.sizes or name.id in self.params or name.id in CONSTANTS:
                    continue
                if any(name.id == t.name for t in self.inputs):
                    raise self.error(f"a where() condition compares either tensor values or index positions, "
                                     f"not '{name.id}' with indices", name)
                known = [n.id for n in names[other] if n.id in self.sizes]
                if len(known) != 1 or not isinstance(sides[other], ast.Name):
                    raise self.error(f"index '{name.id}' has no size: no input declares it and it is compared "
                                     f"with no single index that has one (write it as an input's index, or "
                                     f"compare it with one, as in where(k <= {name.id}, ...))", name)
                self.sizes[name.id] = self.sizes[known[0]]
        self.positions += 1
        try:
            left, left_free = self._expr(node.left)
            right, right_free = self._expr(node.comparators[0])
        finally:
            self.positions -= 1
        condition = INDEX_COMPARISONS[type(node.ops[0])](left, right)
        if condition in (sympy.true, sympy.false):
            raise self.error(f"the condition {ast.unparse(node)} is always {condition == sympy.true}: write the "
                             f"branch it picks directly", node)
        if not (left_free | right_free):
            raise self.error("a where() condition must compare a tensor or indices: one on params and numbers "
                             "alone is the same everywhere, so write the branch it picks directly", node)
        return condition, left_free | right_free

    def _integer_access(self, node) -> bool:
        """Whether `node` reads an integer input as it is: mask[i, j], or a 0-d one by its name."""
        name = node.value.id if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) else \
            node.id if isinstance(node, ast.Name) else None
        return any(t.name == name and t.integer for t in self.inputs)

    def _reduction(self, name: str, node: ast.Call):
        if len(node.args) < 2:
            raise self.error(f"{name}(expression, index, ...) needs an expression and at least one index", node)
        if self.reductions == MAX_NESTED_REDUCTIONS:
            raise self.error(f"reductions are nested too deeply (sum, mean, logsumexp and softmax inside each other: "
                             f"the limit is {MAX_NESTED_REDUCTIONS}, as the derivation's work grows with each)", node)
        if name in ("logsumexp", "softmax") and self.normalized == MAX_NESTED_NORMALIZED:
            raise self.error(f"softmax and logsumexp are nested too deeply (inside each other: the limit is "
                             f"{MAX_NESTED_NORMALIZED}, as the derivation's work grows about 2.5x with each)", node)
        self.reductions += 1
        self.normalized += name in ("logsumexp", "softmax")
        try:
            body, free = self._expr(node.args[0])
        finally:
            self.reductions -= 1
            self.normalized -= name in ("logsumexp", "softmax")
        limits, count = [], sympy.Integer(1)
        for arg in node.args[1:]:
            if isinstance(arg, ast.Constant) and arg.value is Ellipsis:
                index = BATCH
            elif isinstance(arg, ast.Name):
                index = arg.id
            else:
                raise self.error(f"{name}() reduces over index names, not expressions", arg)
            if index not in free:
                raise self.error(f"{name}() over index '{index}', which its operand does not use", arg)
            idx = index_symbol(index, self.sizes[index])
            limits.append((idx, 0, idx.upper))
            count *= idx.upper + 1
            free = free - {index}
        if name in ("logsumexp", "softmax"):
            if len(limits) != 1:
                raise self.error(f"{name}() takes an expression and exactly one index", node)
            index = limits[0][0]
            if name == "softmax" and index.name == BATCH:
                raise self.error("softmax() over the batch dims '...' is not supported (their number varies); "
                                 "name the index it normalizes over", node)
            if name == "softmax":
                return functions.softmax(body, index), free | {index.name}
            return functions.logsumexp(body, index), free
        total = functions.Sum(body, *limits)
        return (total / count if name == "mean" else total), free


def _check_size(tree: ast.AST, error) -> None:
    nodes = 0
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_AST_NODES:
            raise error(f"expression is too large (over {MAX_AST_NODES} syntax nodes)")
        if depth > MAX_AST_DEPTH:
            raise error(f"expression is nested too deeply (over {MAX_AST_DEPTH} levels; "
                        f"each operator of a chain such as a + b + c adds one)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


# --- torch reference expressions ------------------------------------------------------------

# Namespaces a reference may call into; everything there is pure tensor math.
REFERENCE_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.linalg")
# torch values (not functions) a reference may name.
REFERENCE_VALUES = {f"torch.{name}" for name in ("pi", "e", "inf", "nan", "float16", "bfloat16", "float32", "float64",
                                                 "half", "float", "double", "int32", "int64", "int", "long", "bool")}
# Tensor attributes that are values rather than methods, and the fields of what torch.max(x, 1) returns.
TENSOR_PROPERTIES = {"T", "mT", "H", "mH", "shape", "ndim", "dtype", "values", "indices"}
# Functions and methods that touch files, processes or global state, or lead from a tensor to another kind of
# object (a numpy array, a storage, a module): never allowed. So are classes (capitalized), in-place methods
# (trailing '_') and the prefixes below.
REFERENCE_DENIED = {"load", "save", "from_file", "frombuffer", "hub", "ops", "utils", "compile", "jit", "library",
                    "backends", "cuda", "xpu", "mps", "distributed", "autograd", "classes", "package", "onnx",
                    "export", "fx", "importlib", "serialization", "storage", "untyped_storage", "threading",
                    "warnings", "futures", "fork", "wait", "seed", "initial_seed", "compiler", "profiler", "mode",
                    "random", "testing", "overrides", "multiprocessing", "numpy", "tolist", "item",
                    "tofile", "data_ptr", "register_hook", "backward", "grad_fn", "grad", "pin_memory",
                    "record_stream", "retain_grad"}
REFERENCE_DENIED_PREFIXES = ("set_", "use_", "manual_", "get_", "import", "register", "sym_", "init_")
REFERENCE_NODES = (ast.Expression, ast.Call, ast.Name, ast.Attribute, ast.Load, ast.Constant, ast.BinOp,
                   ast.UnaryOp, ast.Tuple, ast.List, ast.keyword, ast.Subscript, ast.Slice,
                   ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.MatMult, ast.USub, ast.UAdd,
                   ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
# torch.einsum's equation, the one string a reference may hold besides option names: subscript letters,
# '...', commas, '->' and spaces
EINSUM_EQUATION = re.compile(r"(?:[A-Za-z,\s]|\.\.\.)*(?:->(?:[A-Za-z\s]|\.\.\.)*)?")


def _check_reference(source: str, inputs: list[str], params: list[str], op: str, locator: _Locator) -> str:
    """Validate a torch reference expression; return it re-printed from its AST.

    Only calls of torch functions (in REFERENCE_NAMESPACES) and of tensor methods, tensor properties, and the
    inputs and params by name: no other value can be reached, so nothing but tensor math can run.
    """
    def error(message, node=None):
        return locator.error(f"reference: {message}", op, "reference", node)

    if len(source) > MAX_SOURCE_CHARS:
        raise error(f"expression is longer than {MAX_SOURCE_CHARS} characters")
    try:
        tree = _parse_python(source, "eval")
    except SyntaxError as exc:
        raise error(f"not a valid expression: {_keyword_in(source) or exc.msg}") from None
    except ValueError as exc:
        raise error(f"not a valid expression: {exc}") from None
    except (RecursionError, MemoryError):
        raise error("nested too deeply") from None
    _check_size(tree, error)
    allowed_names = set(inputs) | set(params) | {"torch"}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    namespaces = {prefix for namespace in REFERENCE_NAMESPACES for prefix in _prefixes(namespace)}
    for node in ast.walk(tree):
        parent = parents.get(node)
        called = isinstance(parent, ast.Call) and parent.func is node
        qualified = isinstance(parent, ast.Attribute) and parent.value is node   # `node` is followed by `.name`
        if not isinstance(node, REFERENCE_NODES):
            raise error(f"'{type(node).__name__}' is not allowed", node)
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Attribute):
            raise error("only torch functions and tensor methods can be called", node)
        if isinstance(node, ast.Name):
            if node.id not in allowed_names:
                raise error(f"unknown name '{node.id}' (only inputs, params and torch)", node)
            if node.id == "torch" and not qualified:
                raise error("'torch' can only be used as torch.<function>", node)
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise error(f"attribute '{node.attr}' is not allowed", node)
            dotted = _dotted(node)
            if dotted is not None and dotted.startswith("torch."):
                namespace = dotted.rpartition(".")[0]
                if qualified and dotted in namespaces:
                    continue
                if called and namespace in REFERENCE_NAMESPACES and _callable_name(node.attr):
                    continue
                if not called and dotted in REFERENCE_VALUES:
                    continue
                raise error(f"'{dotted}' is not an allowed torch {'function' if called else 'value'}", node)
            if called and not _callable_name(node.attr):
                raise error(f"method '{node.attr}' is not allowed", node)
            if not called and node.attr not in TENSOR_PROPERTIES:
                raise error(f"attribute '{node.attr}' is not allowed (only {', '.join(sorted(TENSOR_PROPERTIES))} "
                            f"and method calls)", node)
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, type(None))):
            raise error(f"constant {node.value!r} is not allowed", node)
        if isinstance(node, ast.Compare) and len(node.ops) > 1:
            raise error("a chained comparison is not allowed (Python joins a < b < c with 'and', which a tensor "
                        "of several elements refuses): write torch.logical_and(a < b, b < c)", node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isidentifier() \
                and not _einsum_equation(node, parent):
            raise error(f"string {node.value!r} is not allowed (only option names such as 'sum', and the equation "
                        f"of torch.einsum such as 'ij,jk->ik' as its first argument)", node)
    return ast.unparse(tree)


def _einsum_equation(node: ast.Constant, parent: ast.AST | None) -> bool:
    """Whether a string constant is the equation of torch.einsum: its first argument, in einsum's syntax."""
    return isinstance(parent, ast.Call) and bool(parent.args) and parent.args[0] is node \
        and _dotted(parent.func) == "torch.einsum" and EINSUM_EQUATION.fullmatch(node.value) is not None


def _callable_name(name: str) -> bool:
    """Whether a reference may call a torch function or tensor method of this name."""
    return not (name[:1].isupper() or name.endswith("_") or name in REFERENCE_DENIED
                or name.startswith(REFERENCE_DENIED_PREFIXES))


def _prefixes(dotted: str) -> list[str]:
    """torch.nn.functional -> [torch.nn, torch.nn.functional]"""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None
