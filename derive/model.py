"""The spec model: what an op is, once its TOML entry has been parsed and checked, and the SymPy
symbols every stage writes its expressions with (a size, an index, a tensor, a 0-d tensor, a param).

Every value here is frozen; later stages read it and never change it.
"""

from __future__ import annotations

import difflib
import functools

from dataclasses import dataclass

import sympy

from . import naming
from .errors import SpecError
from .naming import BATCH


@dataclass(frozen=True)
class TensorInput:
    """One tensor argument of an op."""

    name: str                    # argument name in the generated functions
    indices: tuple[str, ...]     # one index name per dim, as declared in `inputs`
    differentiable: bool         # whether the backward returns a gradient for it
    integer: bool = False        # an integer tensor whose values index another input (a gather)
    value_range: str | None = None  # for an integer input: the size its values range over


@dataclass(frozen=True)
class Param:
    """A scalar hyperparameter (keyword argument with a default)."""

    name: str
    default: float


@dataclass(frozen=True)
class OpSpec:
    """An op as the user wrote it, parsed into SymPy."""

    name: str                          # op name: module `<name>.py`, functions `<name>_forward/_backward`
    doc: str                           # one-paragraph description for the generated docstrings
    inputs: tuple[TensorInput, ...]    # tensor arguments, in call order
    params: tuple[Param, ...]          # scalar hyperparameters, in declaration order
    output: str                        # name of the result (its gradient is `grad_<output>`)
    output_indices: tuple[str, ...]    # dims of the result; () for a scalar such as a loss
    rhs: sympy.Expr                    # right-hand side over IndexedBase/Idx/Sum
    equation: str                      # the equation as written, for docs only
    reference: str                     # torch reference expression, validated and re-printed from its AST
    index_sizes: tuple[tuple[str, str], ...]  # index name -> name of the size it ranges over
    ranges: tuple[tuple[str, float, float], ...]  # input -> (low, high) where the op is defined, for test inputs
    source: str                        # "<file>" the op came from, for messages
    digest: str = ""                   # hash of the op's TOML table as written, for the stamp (stamp.py)
    # affine subscripts (x[n, c, 2*t + k]): the sizes no input's shape gives, and what the reads may reach
    fixed_sizes: tuple[tuple[str, int], ...] = ()       # index -> its size, from the spec's `sizes` table
    inferred_sizes: tuple[tuple[str, sympy.Expr], ...] = ()  # index -> its size inferred from the affine reads,
                                                        # in the sizes of declared and fixed indices
    pads: tuple[tuple[str, str, int, int], ...] = ()    # (input, dim's index, zeros before, zeros after): `pad`
    pad_values: tuple[tuple[str, float], ...] = ()      # (input, the value its padding reads instead of 0): `pad_value`
    affine_reads: tuple["AffineRead", ...] = ()         # every read with an affine subscript, as written
    size_checks: tuple[tuple[sympy.Expr, str], ...] = ()  # (condition on sizes, what breaks it): the contract
    # inputs that may be None, each with the value None stands for: `optional = { b = 0 }` (optional.py)
    optional: tuple[tuple[str, float], ...] = ()
    layer: "Layer | None" = None                        # the nn.Module the spec declares (layers.py)
    saving: str = "auto"               # which forward values the Function saves: one of saving.POLICIES

    @property
    def batch_index(self) -> str | None:
        """The op's batch, whose sizes the fused style compiles as symbols: the `...` dims when the spec
        declares them, else the result's first index, else (a scalar result) the first input's first index."""
        if any(BATCH in t.indices for t in self.inputs) or BATCH in self.output_indices:
            return BATCH
        return next(iter(self.output_indices or [i for t in self.inputs for i in t.indices]), None)

    @property
    def index_order(self) -> tuple[str, ...]:
        """Every index in order of first appearance: inputs, then output."""
        seen: dict[str, None] = {}
        if any(BATCH in t.indices for t in self.inputs) or BATCH in self.output_indices:
            seen[BATCH] = None    # batch dims always lead
        for tensor in self.inputs:
            seen.update(dict.fromkeys(tensor.indices))
        seen.update(dict.fromkeys(self.output_indices))
        return tuple(seen)

    def size_of(self, index: str) -> str:
        """The declared index whose size `index` (an index the spec names) has."""
        return dict(self.index_sizes)[index]

    def size_value(self, index: str) -> sympy.Expr:
        """The size of `index` in the sizes generated code reads off the inputs: size_l, 2, size_l - size_k + 1."""
        representative = self.size_of(index)
        fixed = dict(self.fixed_sizes).get(representative)
        return sympy.Integer(fixed) if fixed else dict(self.inferred_sizes).get(representative) \
            or size_symbol(representative)

    def pad_of(self, name: str, index: str) -> tuple[int, int]:
        """(zeros before, zeros after) that reads of input `name`'s dim `index` may reach."""
        return next(((before, after) for tensor, dim, before, after in self.pads
                     if (tensor, dim) == (name, index)), (0, 0))

    def pad_value_of(self, name: str) -> sympy.Expr:
        """What a read of input `name` outside its range is: 0 unless `pad_value` says (-inf for a max pool)."""
        return sympy.sympify(dict(self.pad_values).get(name, 0))

    def input(self, name: str) -> TensorInput:
        return next(t for t in self.inputs if t.name == name)

    @property
    def optional_names(self) -> tuple[str, ...]:
        """The inputs that may be None, in input order."""
        defaults = dict(self.optional)
        return tuple(t.name for t in self.inputs if t.name in defaults)


@dataclass(frozen=True)
class AffineRead:
    """A read the equation writes with an affine subscript: x[n, c, 2*t + k - 1]."""

    access: sympy.Indexed        # the read itself
    # the positions whose affine index alone gave the size of an index: padded as declared, they hold
    # exactly that many windows
    exact: tuple[int, ...]


@dataclass(frozen=True)
class LayerArg:
    """One argument of a layer's constructor: `in_features`, or `bias=True` with its default."""

    name: str
    default: object = None       # a Python literal (bool, int, float); None: required
    required: bool = True


@dataclass(frozen=True)
class InitCall:
    """How a parameter is initialized: an entry of layers.INITS with its keyword arguments."""

    name: str                                # kaiming_uniform, uniform_fan_in, ones, ...
    keywords: tuple[tuple[str, str], ...]    # (keyword, Python text of its value): ("a", "math.sqrt(5)")
    of: str | None = None                    # the parameter whose fan-in it reads (uniform_fan_in(weight))


@dataclass(frozen=True)
class LayerParameter:
    """One nn.Parameter of a layer: which input of the op it is, its stored layout and shape, its init."""

    name: str                                # the attribute and state_dict key: weight
    input: str                               # the op's input it is passed as: w
    dims: tuple[str, ...]                    # the input's indices in the order the parameter stores them
    shape: tuple[str, ...]                   # one entry per stored dim: a constructor argument or an integer
    init: InitCall
    when: tuple[str, ...] = ()               # boolean constructor arguments that must all be true for it to
                                             # exist (else it is None, and so is the input: an optional one)


@dataclass(frozen=True)
class Layer:
    """The torch.nn.Module an op's spec declares (`[ops.<op>.layer]`)."""

    name: str                                # the class: Linear
    args: tuple[LayerArg, ...]               # the constructor's arguments, in order
    parameters: tuple[LayerParameter, ...]   # in declaration order: the order they are created and initialized


@dataclass(frozen=True)
class Catalog:
    """The ops of one spec file, in name order (so output never depends on file order)."""

    path: str
    ops: tuple[OpSpec, ...]

    def op(self, name: str) -> OpSpec:
        for op in self.ops:
            if op.name == name:
                return op
        close = difflib.get_close_matches(name, [o.name for o in self.ops], n=1)
        if close:
            raise SpecError(f"no op named '{name}'; did you mean '{close[0]}'?", path=self.path)
        known = ", ".join(o.name for o in self.ops)
        raise SpecError(f"no op named '{name}' (known: {known})", path=self.path)


# --- the symbols every stage builds its SymPy expressions from --------------------------------

def size_symbol(index: str) -> sympy.Symbol:
    """The length of the dims `index` ranges over: `size_n`, a positive integer."""
    return sympy.Symbol(naming.size(index), integer=True, positive=True)


def index_symbol(index: str, size_index: str | None = None) -> sympy.Idx:
    """The index `index`, ranging over the size of `size_index` (default: its own)."""
    return sympy.Idx(index, size_symbol(size_index or index))


@functools.lru_cache(maxsize=4096)    # (each stage names the same tensors)
def tensor_symbol(name: str) -> sympy.IndexedBase:
    """A real tensor with at least one dim, accessed as `x[n, k]`."""
    return sympy.IndexedBase(name, real=True)


def scalar_symbol(name: str) -> sympy.Symbol:
    """A 0-d tensor."""
    return sympy.Symbol(name, real=True)


class ParamSymbol(sympy.Symbol):
    """A hyperparameter: a Python number in generated code, where a 0-d tensor (a plain Symbol) is a tensor."""


def param_symbol(name: str) -> ParamSymbol:
    return ParamSymbol(name, real=True)


class Infinity(sympy.Symbol):
    """The float `inf` of an equation, as in `where(s <= t, score, -inf)`: a Python number in generated code
    (`torch.inf`). A symbol, not SymPy's `oo`, so that derivation never folds `0 * oo` or `oo - oo` into NaN:
    what it meets is computed by torch at run time, as torch computes the same expression."""


INFINITY = Infinity("inf", positive=True)


def is_python_number(expr: sympy.Expr) -> bool:
    """Whether generated code holds `expr` as a Python number: it reads only params and sizes."""
    return not expr.atoms(sympy.Indexed) and all(
        isinstance(s, (ParamSymbol, Infinity)) or (s.is_integer and s.name.startswith(naming.size(""))) for s in expr.free_symbols)


class PositiveFirst:
    """Printer mixin: in a sum, a positive term leads (`x - saved_mean`, not `-saved_mean + x`)."""

    def _print_Add(self, expr, order=None):
        terms = sorted(self._as_ordered_terms(expr, order=order), key=lambda t: t.could_extract_minus_sign())
        return super()._print_Add(sympy.Add(*terms, evaluate=False), order="none")


class _SizeText(PositiveFirst, sympy.printing.str.StrPrinter):
    pass


def size_text(size: sympy.Expr) -> str:
    """A size formula as messages and docs show it, positive terms first: size_l + 1 - size_k."""
    return _SizeText().doprint(size)


SMALL_DENOMINATOR = 1000     # a fraction over a larger denominator (a decimal such as 0.044715) prints as a float


def exact_fraction(number: sympy.Rational) -> bool:
    """Whether a rational prints as int / int: an integer that fits a float, or a small fraction such as
    1 / 2 or 2 / 3. Any other (a decimal of the spec, 0.044715, or a product of them) prints as its
    float literal, repr-exact: `0.035677408136300125 * x`, not `1427096325452004339 / 40000000000000000000 * x`."""
    if number.q == 1:
        return abs(number.p) < 2 ** 1023
    return number.q <= SMALL_DENOMINATOR and abs(number.p) < 2 ** 53
