"""The spec model: what an op is, once its TOML entry has been parsed and checked.

Every value here is frozen; later stages read it and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

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

    def input(self, name: str) -> TensorInput:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class Catalog:
    """The ops of one spec file, in name order (so output never depends on file order)."""

    path: str
    ops: tuple[OpSpec, ...]

    def op(self, name: str) -> OpSpec:
        for op in self.ops:
            if op.name == name:
                return op
        known = ", ".join(o.name for o in self.ops)
        raise SpecError(f"no op named '{name}' (known: {known})", path=self.path)
