"""Stage 5a, derivation -> contracts: what the generated entry points accept, and how autocast casts them.

Shape contracts. Every declared tensor (the inputs, and in the backward `grad_<out>`, `<out>` and
the saved values) gets its rank checked, every index one size across all of them, and every
integer input an integer dtype, before anything is computed: an undeclared shape is an error
naming the op, the tensor and the index, never a broadcast that computes something else.
`...` (batch dims) is where broadcasting is declared: the batch dims of the inputs (and of the
saved values) must broadcast together, and those of `grad_<out>` and `<out>` must be the shape
they broadcast to.

Autocast. Under `torch.autocast`, torch casts an op's floating inputs by its op lists; derive
mirrors them from what the equation contains (AUTOCAST_RULES), per device type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from . import functions, naming
from .derivation import Derivation, tensor_symbols
from .naming import BATCH


@dataclass(frozen=True)
class Declared:
    """One tensor argument as the spec declares it."""

    name: str                    # argument name in the generated functions
    indices: tuple[str, ...]     # one index per dim, as declared; BATCH first for batch dims
    optional: bool               # may be None: a backward-only tensor in the forward, an input the Function
                                 # does not save in the backward
    integer: bool = False        # an integer input (its values index another input)
    mask: bool = False           # an integer input read only as a value: a bool tensor is welcome too
    role: str = "input"          # "input"; "saved", a value the forward hands the backward; "result",
                                 # grad_<out> or <out>, whose batch dims are those the inputs broadcast to

    @property
    def named(self) -> tuple[str, ...]:
        return tuple(i for i in self.indices if i != BATCH)

    @property
    def batched(self) -> bool:
        return BATCH in self.indices

    def declaration(self) -> str:
        return f"{self.name}[{', '.join(self.indices)}]" if self.indices else self.name

    def dim(self, index: str) -> int:
        """Position of a named index: from the end when batch dims lead (their number is not known)."""
        position = self.indices.index(index)
        return position - len(self.indices) if self.batched else position

    def size(self, index: str) -> str:
        return f"{self.name}.shape[{self.dim(index)}]"

    def batch(self) -> str:
        """Source for the batch dims' shape."""
        return f"{self.name}.shape[:-{len(self.named)}]" if self.named else f"{self.name}.shape"

    def dims_of(self, index: str) -> str | None:
        """Source for a slice of this tensor's dims that `index` spans (BATCH: the leading dims, however many);
        None when the tensor does not carry it."""
        if index not in self.indices:
            return None
        if index == BATCH:
            return f"slice(0, -{len(self.named)})" if self.named else "slice(0, None)"
        position = self.indices.index(index)
        return f"slice({position}, {position + 1})"


@dataclass(frozen=True)
class Check:
    """One condition of a contract and the error it raises."""

    guard: tuple[str, ...]       # optional tensors it reads: it applies only when none is None
    condition: str               # Python expression, True when the contract holds
    message: str                 # f-string body of the RuntimeError
    pair: tuple[str, str] = ()   # (tensor, other) it compares sizes of; whole: it compares their whole shapes
    whole: bool = False


def shape_checks(op_name: str, declared: list[Declared], sizes: dict[str, str],
                 nonempty: tuple[str, ...] = ()) -> list[Check]:
    """The checks of every declared tensor, in order: rank and dtype, then each index against the
    tensors before it that have it (up to the first that is always given), batch dims last, then
    each index of `nonempty` (one a max or min reduces over) not 0, on the first input that has it.
    `sizes` maps an index to the index whose size it ranges over."""
    checks = []
    for position, tensor in enumerate(declared):
        guard = (tensor.name,) if tensor.optional else ()
        name, rank = tensor.name, len(tensor.named)
        if not tensor.batched:
            checks.append(Check(guard, f"{name}.dim() == {rank}",
                                f"{op_name}: {name} has shape {{tuple({name}.shape)}} but is declared "
                                f"{tensor.declaration()}"))
        elif rank:
            checks.append(Check(guard, f"{name}.dim() >= {rank}",
                                f"{op_name}: {name} has shape {{tuple({name}.shape)}} but is declared "
                                f"{tensor.declaration()} (at least {rank} dim{'s' if rank > 1 else ''})"))
        if tensor.mask:
            checks.append(Check(guard, f"not ({name}.is_floating_point() or {name}.is_complex())",
                                f"{op_name}: {name} has dtype {{{name}.dtype}} but is declared an integer "
                                f"input (integer or bool values)"))
        elif tensor.integer:
            checks.append(Check(guard, f"not ({name}.is_floating_point() or {name}.is_complex() "
                                       f"or {name}.dtype == torch.bool)",
                                f"{op_name}: {name} has dtype {{{name}.dtype}} but is declared an integer "
                                f"input (its values are indices)"))
        elif tensor.role == "input":    # the op computes in floats: an integer tensor would compute otherwise
            checks.append(Check(guard, f"{name}.is_floating_point()",
                                f"{op_name}: {name} has dtype {{{name}.dtype}} but is a floating-point input "
                                f"(list it in the spec's `integer` to read integer values)"))
        for position_in, index in enumerate(tensor.named):
            same = next((i for i in tensor.named[:position_in] if sizes.get(i, i) == sizes.get(index, index)), None)
            if same is not None:     # a square input: a[i, j] read as a[i, i], or declared a[i, i]
                checks.append(Check(guard, f"{tensor.size(index)} == {tensor.size(same)}",
                                    f"{op_name}: {name} has size {{{tensor.size(index)}}} at dim {tensor.dim(index)} "
                                    f"(index {index}) but {{{tensor.size(same)}}} at dim {tensor.dim(same)} (index "
                                    f"{same}): the equation reads its diagonal", pair=(name, name)))
                continue

            def has(t, index=index):
                return any(sizes.get(i, i) == sizes.get(index, index) for i in t.named)
            # the backward's own tensors come together: grad_<out> stands for the inputs
            anchors = [t for t in declared[:position] if t.role == "result" and has(t)]
            for other in anchors[:1] if tensor.role != "input" and anchors else _earlier(declared[:position], has):
                other_index = next(i for i in other.named if sizes.get(i, i) == sizes.get(index, index))
                checks.append(Check(
                    _guard(tensor, other), f"{tensor.size(index)} == {other.size(other_index)}",
                    f"{op_name}: {name} has size {{{tensor.size(index)}}} at dim {tensor.dim(index)} (index "
                    f"{index}) but {other.name} has {other_index} = {{{other.size(other_index)}}}",
                    pair=(name, other.name)))
    checks += _batch_checks(op_name, [t for t in declared if t.batched])
    for index in nonempty:
        if index == BATCH:      # max(x[..., c], ...): every batch dim, however many, must hold entries
            tensor = next((t for t in declared if t.role == "input" and t.batched), None)
            checks += [Check(_guard(tensor), f"{tensor.batch()}.numel() > 0",
                             f"{op_name}: {tensor.name} has batch dims {{tuple({tensor.batch()})}} (index ...), with no "
                             f"entries, which a max or min reduces over: the max of nothing is undefined (torch.amax "
                             f"raises too)")] if tensor else []
            continue
        tensor = next((t for t in declared if t.role == "input" and index in t.named), None)
        if tensor is None:      # a window's index, whose size the spec sets (sizes = { k = 2 })
            continue
        checks.append(Check(_guard(tensor), f"{tensor.size(index)} > 0",
                            f"{op_name}: {tensor.name} has size 0 at dim {tensor.dim(index)} (index {index}), which "
                            f"a max or min reduces over: the max of nothing is undefined (torch.amax raises too)"))
    return checks


def range_checks(op_name: str, declared: list[Declared], conditions, sizes: dict[str, str]) -> list[Check]:
    """The conditions range inference put on the sizes (an inferred size at least 1, an affine read within
    its input and its padding), each size read off the first declared tensor with that dim; a condition
    applies when the tensors it reads are given."""
    from .printing import SizePrinter     # (printing imports the lowering, which needs nothing from here)
    checks = []
    for condition, message in conditions:
        texts, readers = {}, []
        for symbol in sorted(condition.free_symbols, key=str):
            index = naming.index_of_size(symbol.name)
            tensor = next(t for t in declared if any(sizes.get(i, i) == index for i in t.named))
            texts[symbol] = sympy.Symbol(tensor.size(next(i for i in tensor.named if sizes.get(i, i) == index)))
            readers.append(tensor)
        shown = ", ".join(f"{s.name} = {{{t.name}}}" for s, t in texts.items())
        checks.append(Check(_guard(*dict.fromkeys(readers)), SizePrinter().doprint(condition.xreplace(texts)),
                            f"{op_name}: {message} ({shown})"))
    return checks


def _batch_checks(op_name: str, batched: list[Declared]) -> list[Check]:
    """Batch dims: those of the inputs and saved values broadcast together; those of a result
    (grad_<out>, <out>) equal the shape the inputs broadcast to."""
    checks = []
    operands = [t for t in batched if t.role != "result"]
    for position, tensor in enumerate(operands):
        for other in operands[:position]:
            if other.role == "saved":     # saved values are compared with the inputs only
                continue
            mine, theirs = tensor.batch(), other.batch()
            checks.append(Check(
                _guard(tensor, other),
                f"{mine} == {theirs} or all(p == q or p == 1 or q == 1 "
                f"for p, q in zip(reversed({mine}), reversed({theirs})))",
                f"{op_name}: {tensor.name} has batch dims {{tuple({mine})}} (index ...) but {other.name} has "
                f"... = {{tuple({theirs})}}, and they do not broadcast"))
    inputs = [t for t in operands if t.role == "input"]
    results = [t for t in batched if t.role == "result"]
    for position, tensor in enumerate(results):
        earlier_results = results[:position]
        targets = earlier_results[:1] or inputs
        if not targets:
            continue
        if len(targets) == 1:
            other = targets[0]
            # the named dims are compared already: with the same ones, whole shapes compare cheaper
            same = tensor.indices == other.indices
            condition = (f"{tensor.name}.shape == {other.name}.shape" if same else
                         f"{tensor.batch()} == {other.batch()}")
            checks.append(Check(_guard(tensor, other), condition,
                                f"{op_name}: {tensor.name} has batch dims {{tuple({tensor.batch()})}} (index ...) "
                                f"but {other.name} has ... = {{tuple({other.batch()})}}",
                                pair=(tensor.name, other.name), whole=same))
            continue
        shapes = ", ".join(t.batch() for t in targets)
        broadcast = f"torch.broadcast_shapes({shapes})"
        equal = " == ".join([tensor.batch()] + [t.batch() for t in targets])
        names = " and ".join(t.name for t in targets)
        checks.append(Check(_guard(tensor, *targets), f"{equal} or {tensor.batch()} == {broadcast}",
                            f"{op_name}: {tensor.name} has batch dims {{tuple({tensor.batch()})}} (index ...) but "
                            f"the ... of {names} broadcast to {{tuple({broadcast})}}"))
    return checks


def _earlier(tensors: list[Declared], has) -> list[Declared]:
    """The tensors to compare a later one with: those that have the index, up to the first that is
    always given (comparing with it is enough; optional ones before it may be None)."""
    chosen = []
    for tensor in tensors:
        if has(tensor):
            chosen.append(tensor)
            if not tensor.optional:
                break
    return chosen


def _guard(*tensors: Declared) -> tuple[str, ...]:
    return tuple(t.name for t in tensors if t.optional)


def guarded_blocks(checks: list[Check]) -> list[tuple[str, list[Check]]]:
    """Consecutive checks with the same guard, under one `if a is not None and ...` ('' for none)."""
    blocks: list[tuple[str, list[Check]]] = []
    for check in checks:
        condition = " and ".join(f"{name} is not None" for name in check.guard)
        if not blocks or blocks[-1][0] != condition:
            blocks.append((condition, []))
        blocks[-1][1].append(check)
    return blocks


def all_hold(checks: list[Check]) -> list[str]:
    """The conjunction of every check, one clause per line: the fast path that returns at once when
    the shapes are right (one expression costs a fraction of the calls that name a failure)."""
    whole = {check.pair for check in checks if check.whole}
    clauses = []
    for check in checks:
        if check.pair in whole and not check.whole:     # implied by the whole shapes' comparison
            continue
        condition = f"({check.condition})" if " or " in check.condition else check.condition
        if check.guard:
            condition = f"({' or '.join(f'{name} is None' for name in check.guard)} or {condition})"
        clauses.append(condition)
    return clauses


# ---- autocast -------------------------------------------------------------------------------

DEVICE_TYPES = ("cpu", "cuda")     # the autocast device types derive mirrors torch's op lists for


@dataclass(frozen=True)
class AutocastRule:
    """One line of torch's autocast op lists, as a property of an equation."""

    policy: str                          # "lower": to the autocast dtype; "float32"; "promote": the widest input dtype
    devices: tuple[str, ...]             # device types whose list has it
    applies: Callable[[Derivation], bool]
    why: str                             # for the generated comment


def _contracts(derivation: Derivation) -> bool:
    """A sum over an index of a product in which two or more factors read that index: a matrix product."""
    for total in derivation.forward.atoms(sympy.Sum):
        summed = {limit[0] for limit in total.limits}
        factors = sympy.Mul.make_args(total.function)
        if sum(1 for f in factors if any(set(a.indices) & summed for a in f.atoms(sympy.Indexed))) >= 2:
            return True
    return False


# Functions CUDA autocast runs in float32 (exp, log, log1p, softplus, softmax, log_softmax, logsumexp,
# sum and the normalizations built on it); CPU's float32 list has only the losses of these.
FLOAT32_ON_CUDA = (sympy.exp, sympy.log, functions.log1p, functions.softplus, functions.logsumexp,
                   functions.softmax, functions.log_softmax, sympy.Sum)

# More of CUDA's float32 list: functions, and a power whose exponent is a tensor (printed `x**p`, torch.pow).
FLOAT32_ON_CUDA_MORE = (sympy.asin, sympy.acos, sympy.sinh, sympy.cosh, sympy.tan)


def _float32_on_cuda_more(derivation: Derivation) -> bool:
    forward = derivation.forward
    return forward.has(*FLOAT32_ON_CUDA_MORE) or any(
        p.exp.atoms(sympy.Indexed) or p.exp.free_symbols & tensor_symbols(derivation.op)
        for p in forward.atoms(sympy.Pow))


# First rule that applies wins; no rule: "promote".
AUTOCAST_RULES = (
    AutocastRule("float32", DEVICE_TYPES, lambda d: not d.op.output_indices,
                 "it reduces to a scalar, as torch's losses (mse_loss, cross_entropy, ...)"),
    AutocastRule("lower", DEVICE_TYPES, _contracts,
                 "it contracts its inputs over an index, as matmul, linear and bmm"),
    AutocastRule("float32", ("cuda",), lambda d: d.forward.has(*FLOAT32_ON_CUDA),
                 "it computes exp, log, softmax or a sum, which CUDA autocast runs in float32"),
    AutocastRule("float32", ("cuda",), _float32_on_cuda_more,
                 "it computes asin, acos, sinh, cosh, tan or a power with a tensor exponent, which CUDA autocast "
                 "runs in float32"),
)


# The dtype each policy casts floating inputs to, as generated code.
POLICY_DTYPES = {
    "lower": "torch.get_autocast_dtype(device_type)",
    "float32": "torch.float32",
    "promote": "functools.reduce(torch.promote_types, [t.dtype for t in tensors if t.is_floating_point()])",
}


@dataclass(frozen=True)
class Autocast:
    device: str
    policy: str
    why: str


def autocast_policies(derivation: Derivation) -> tuple[Autocast, ...]:
    """How autocast casts the op's floating inputs on each device type."""
    policies = []
    for device in DEVICE_TYPES:
        rule = next((r for r in AUTOCAST_RULES if device in r.devices and r.applies(derivation)), None)
        policies.append(Autocast(device, rule.policy, rule.why) if rule else
                        Autocast(device, "promote", "no autocast list names such an op: it keeps its inputs' "
                                                    "dtype (the widest)"))
    return tuple(policies)
