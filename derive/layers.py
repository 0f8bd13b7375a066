"""Layers: the torch.nn.Module a spec declares for its op (`[ops.<op>.layer]`), as data.

    [ops.linear.layer]
    name = "Linear"
    args = ["in_features", "out_features", "bias=True"]
    parameters.weight = { input = "w", dims = ["m", "k"], shape = ["out_features", "in_features"],
                          init = "kaiming_uniform(a=sqrt(5))" }
    parameters.bias = { input = "b", shape = ["out_features"], init = "uniform_fan_in(weight)", when = "bias" }

Each parameter is one input of the op; the inputs that are not parameters are the module's forward
arguments, in order. `dims` is the order the parameter stores the input's indices in (torch's layout,
(out, in) for nn.Linear's weight, where derive's linear reads w[k, m]); the module passes it permuted
into the order the op declares. `shape` gives each stored dim's size as a constructor argument or an
integer. `when` names boolean arguments that must be true for the parameter to exist; otherwise it is
None, passed as None to an optional input (optional.py). An argument named as an op's param (`eps`)
is passed to the op. Parameters are created and initialized in declaration order, each by an entry of
INITS, so with the same seed a layer that mirrors a torch module draws the same values.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from . import naming
from .errors import SpecError
from .model import InitCall, Layer, LayerArg, LayerParameter, Param, TensorInput


@dataclass(frozen=True)
class Init:
    """An initialization a spec may name: the function generated code calls, the keywords it takes."""

    function: str                  # called with the parameter first: torch.nn.init.kaiming_uniform_
    keywords: tuple[str, ...]      # the keyword arguments a spec may give it
    of: bool = False               # it reads another parameter (named as its one positional argument)
    doc: str = ""


INITS = {
    "kaiming_uniform": Init("torch.nn.init.kaiming_uniform_", ("a", "mode", "nonlinearity"),
                            doc="nn.Linear's and the convolutions' weight, with a=sqrt(5)"),
    "kaiming_normal": Init("torch.nn.init.kaiming_normal_", ("a", "mode", "nonlinearity")),
    "xavier_uniform": Init("torch.nn.init.xavier_uniform_", ("gain",)),
    "xavier_normal": Init("torch.nn.init.xavier_normal_", ("gain",)),
    "normal": Init("torch.nn.init.normal_", ("mean", "std"), doc="nn.Embedding's weight"),
    "uniform": Init("torch.nn.init.uniform_", ("a", "b")),
    "constant": Init("torch.nn.init.constant_", ("val",)),
    "ones": Init("torch.nn.init.ones_", (), doc="nn.LayerNorm's weight"),
    "zeros": Init("torch.nn.init.zeros_", (), doc="nn.LayerNorm's bias"),
    "uniform_fan_in": Init("_uniform_fan_in", (), of=True,
                           doc="uniform in +-1/sqrt(fan_in) of another parameter: nn.Linear's and the "
                               "convolutions' bias"),
}

# the helper `uniform_fan_in` calls, emitted into the module that uses it (as torch's layers compute it)
UNIFORM_FAN_IN = '''def _uniform_fan_in(parameter, of):
    """Fill `parameter` uniformly in +-1/sqrt(fan_in of `of`), as torch.nn.Linear and the convolutions their bias."""
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(of)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    torch.nn.init.uniform_(parameter, -bound, bound)'''

LAYER_KEYS = {"name", "args", "parameters"}
PARAMETER_KEYS = {"input", "dims", "shape", "init", "when"}
MODULE_ARGS = ("device", "dtype")     # every layer takes them last, as torch's do
# names an argument or parameter may not take: the module's own, nn.Module's, and the generated module's globals
TAKEN = frozenset({"self", "forward", "reset_parameters", "training", "state_dict", "parameters", "buffers",
                   "modules", "children", "train", "eval", "to", "cpu", "cuda", "apply", "register_parameter",
                   "register_buffer", "load_state_dict", "zero_grad", "requires_grad_", "AUTOCAST", "SPEC_DIGEST"})


def parse_layer(entry: dict, tensors: tuple[TensorInput, ...], optional: tuple[tuple[str, float], ...], op: str,
                locator) -> Layer:
    """The op's `layer` table, checked against its inputs; a SpecError (via `locator`) names what is wrong."""
    raw = entry["layer"]
    header = re.compile(rf"^\s*\[\s*ops\s*\.\s*\"?{re.escape(op)}\"?\s*\.\s*layer\s*\]")
    line = next((i + 1 for i, text in enumerate(locator.lines) if header.match(text)), None)

    def error(message: str):
        if line is None:    # an inline table, layer = { ... }
            return locator.error(f"layer: {message}", op, "layer")
        return SpecError(f"layer: {message}", path=locator.path, line=line, op=op)

    if not isinstance(raw, dict):
        raise error("'layer' must be a table with name, args and parameters")
    unknown = sorted(set(raw) - LAYER_KEYS)
    if unknown or "name" not in raw or "parameters" not in raw:
        raise error(f"keys are {sorted(LAYER_KEYS)} (name and parameters required); got {sorted(raw)}")
    name = raw["name"]
    if not isinstance(name, str) or naming.name_problem(name) or name in naming.module_names(op) \
            or name in {t.name for t in tensors} or name in TAKEN:
        raise error(f"name {name!r} must be a class name of its own, such as \"Linear\"")
    args = _parse_args(raw.get("args", []), error)
    by_input = {t.name: t for t in tensors}
    parameters = []
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        raise error("'parameters' must be a table of attribute = { input = ..., shape = [...], init = ... }")
    arg_names = [a.name for a in args]
    for attribute, spec in raw["parameters"].items():
        parameters.append(_parse_parameter(attribute, spec, by_input, arg_names, dict(optional), parameters, error))
    inputs = [p.input for p in parameters]
    if len(set(inputs)) < len(inputs):
        raise error("two parameters are the same input")
    if all(t.name in inputs for t in tensors):
        raise error("every input is a parameter: the module's forward would take no tensor")
    for item in [a.name for a in args] + [p.name for p in parameters]:
        if item in MODULE_ARGS or item in TAKEN:
            raise error(f"'{item}' is a name the module itself uses")
    sizes: dict[str, str] = {}
    for parameter in parameters:    # one index, one size, across the parameters
        for index, size in zip(parameter.dims, parameter.shape):
            if sizes.setdefault(index, size) != size:
                raise error(f"index '{index}' has size {sizes[index]} in one parameter and {size} in another")
    return Layer(name=name, args=args, parameters=tuple(parameters))


def _parse_args(raw, error) -> tuple[LayerArg, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise error("'args' must be a list of constructor arguments such as \"in_features\" or \"bias=True\"")
    args: list[LayerArg] = []
    for text in raw:
        name, _, default = (part.strip() for part in text.partition("="))
        problem = naming.name_problem(name)
        if problem:
            raise error(f"bad argument {text!r}: {problem}")
        if any(a.name == name for a in args):
            raise error(f"argument '{name}' is given twice")
        if not default:
            if args and not args[-1].required:
                raise error(f"argument '{name}' without a default follows one with a default")
            args.append(LayerArg(name))
            continue
        try:
            value = ast.literal_eval(default)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (bool, int, float)):
            raise error(f"argument {text!r}: a default must be True, False or a number")
        args.append(LayerArg(name, value, required=False))
    return tuple(args)


def _parse_parameter(attribute: str, spec, by_input: dict[str, TensorInput], args: list[str],
                     optional: dict[str, float], earlier: list[LayerParameter], error) -> LayerParameter:
    problem = naming.name_problem(attribute)
    if problem:
        raise error(f"bad parameter name: {problem}")
    if not isinstance(spec, dict) or set(spec) - PARAMETER_KEYS or not {"input", "shape", "init"} <= set(spec):
        raise error(f"parameter '{attribute}' must be a table with input, shape and init (and dims, when)")
    tensor = by_input.get(spec["input"])
    if tensor is None or tensor.integer or not tensor.differentiable:
        raise error(f"parameter '{attribute}': input {spec['input']!r} is not a differentiable input of the op")
    if naming.BATCH in tensor.indices:
        raise error(f"parameter '{attribute}': input '{tensor.name}' has batch dims '...'; a parameter's rank is fixed")
    dims = spec.get("dims", list(tensor.indices))
    if not isinstance(dims, list) or sorted(dims) != sorted(tensor.indices):
        raise error(f"parameter '{attribute}': dims must order the indices of {tensor.name}"
                    f"[{', '.join(tensor.indices)}]")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) != len(dims) \
            or not all((isinstance(s, str) and s in args) or (isinstance(s, int) and not isinstance(s, bool)
                                                              and s > 0) for s in shape):
        raise error(f"parameter '{attribute}': shape must give each of its {len(dims)} dims as an argument's "
                    f"name or a positive integer")
    when = spec.get("when", [])
    when = [when] if isinstance(when, str) else when
    if not isinstance(when, list) or not all(isinstance(w, str) and w in args for w in when):
        raise error(f"parameter '{attribute}': 'when' must name boolean arguments")
    if when and tensor.name not in optional:
        raise error(f"parameter '{attribute}' may be absent (when = {when}) but input '{tensor.name}' is not "
                    f"optional")
    init = _parse_init(attribute, spec["init"], earlier, error)
    return LayerParameter(name=attribute, input=tensor.name, dims=tuple(dims), shape=tuple(str(s) for s in shape),
                          init=init, when=tuple(when))


def _parse_init(attribute: str, text, earlier: list[LayerParameter], error) -> InitCall:
    """`kaiming_uniform(a=sqrt(5))`, `ones`, `uniform_fan_in(weight)`: an INITS entry and its arguments."""
    known = ", ".join(sorted(INITS))
    try:
        node = ast.parse(text, mode="eval").body if isinstance(text, str) else None
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in INITS):
        raise error(f"parameter '{attribute}': init {text!r} is not one of {known} (with its arguments)")
    init = INITS[node.func.id]
    of = None
    if init.of:
        names = [p.name for p in earlier]
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name) or node.args[0].id not in names:
            raise error(f"parameter '{attribute}': {node.func.id} reads a parameter declared before it, "
                        f"{node.func.id}(weight)")
        of = node.args[0].id
    elif node.args:
        raise error(f"parameter '{attribute}': {node.func.id} takes keyword arguments only")
    keywords = []
    for keyword in node.keywords:
        if keyword.arg not in init.keywords:
            raise error(f"parameter '{attribute}': {node.func.id} takes {list(init.keywords) or 'no arguments'}, "
                        f"not {keyword.arg!r}")
        keywords.append((keyword.arg, _value(keyword.value, attribute, error)))
    return InitCall(node.func.id, tuple(keywords), of)


def _value(node, attribute: str, error) -> str:
    """An init argument as Python: a number, -number, sqrt(number) (math.sqrt) or a string such as 'fan_in'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool) \
            and math.isfinite(node.value):
        return repr(node.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
        return repr(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return "-" + _value(node.operand, attribute, error)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" \
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Constant) \
            and not isinstance(node.args[0].value, bool) and isinstance(node.args[0].value, (int, float)) \
            and 0 <= node.args[0].value < math.inf:
        return f"math.sqrt({node.args[0].value!r})"
    raise error(f"parameter '{attribute}': an init argument must be a finite number, sqrt(number >= 0) or a name "
                f"in quotes")


# --- what the module template needs ---------------------------------------------------------------

def layer_context(layer: Layer, inputs: tuple[TensorInput, ...], params: tuple[Param, ...],
                  apply_name: str) -> dict:
    """The class's lines: constructor, parameters with their shapes, reset_parameters, forward."""
    by_input = {p.input: p for p in layer.parameters}
    arg_names = {a.name for a in layer.args}
    signature = [a.name if a.required else f"{a.name}={a.default!r}" for a in layer.args] \
        + [f"{name}=None" for name in MODULE_ARGS]
    created = []
    for p in layer.parameters:
        shape = "(" + ", ".join(p.shape) + ("," if len(p.shape) == 1 else "") + ")"
        created.append(dict(name=p.name, condition=" and ".join(p.when),
                            code=f"torch.nn.Parameter(torch.empty({shape}, device=device, dtype=dtype))"))
    resets = []
    for p in layer.parameters:
        init = INITS[p.init.name]
        arguments = [f"self.{p.name}"] + ([f"self.{p.init.of}"] if p.init.of else []) \
            + [f"{k}={v}" for k, v in p.init.keywords]
        resets.append(dict(condition=f"self.{p.name} is not None" if p.when else "",
                           code=f"{init.function}({', '.join(arguments)})"))
    call = []
    for t in inputs:
        parameter = by_input.get(t.name)
        if parameter is None:
            call.append(t.name)
            continue
        value = f"self.{parameter.name}"
        order = tuple(parameter.dims.index(i) for i in t.indices)
        if order != tuple(range(len(order))):
            permuted = f"{value}.T" if len(order) == 2 else f"{value}.permute{order}"
            value = f"None if {value} is None else {permuted}" if parameter.when else permuted
        call.append(value)
    call += [f"{p.name}=self.{p.name}" for p in params if p.name in arg_names]
    # an argument named as a parameter (nn.Linear's bias=True) only says whether it exists
    stored = [a.name for a in layer.args if a.name not in {p.name for p in layer.parameters}]
    described = ", ".join(f"{p.name} (input {p.input}" + (f", stored as ({', '.join(p.dims)}) and passed permuted"
                                                             if p.dims != _declared(p, inputs) else "") + ")"
                          for p in layer.parameters)
    return dict(
        name=layer.name, signature=", ".join(["self"] + signature), stored=stored, created=created, resets=resets,
        forward_args=", ".join(["self"] + [t.name for t in inputs if t.name not in by_input]),
        call=f"{apply_name}({', '.join(call)})", described=described,
        uses_fan_in=any(p.init.of for p in layer.parameters), fan_in_helper=UNIFORM_FAN_IN,
        uses_math=any("math." in v for p in layer.parameters for _, v in p.init.keywords)
        or any(p.init.of for p in layer.parameters))


def _declared(parameter: LayerParameter, inputs: tuple[TensorInput, ...]) -> tuple[str, ...]:
    return next(t.indices for t in inputs if t.name == parameter.input)
