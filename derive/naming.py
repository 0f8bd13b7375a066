"""Every name that generated code uses, in one place."""

from __future__ import annotations

import builtins
import hashlib
import keyword
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

# Names generated code relies on; a spec may not use them for tensors, indices or params.
RESERVED = frozenset({"torch", "F", "math", "functools", "warnings", "ctx", "needs_input_grad", "inputs", "output",
                      "gradients", "AUTOCAST", "SPEC_DIGEST", "device_type", "args", "keyset", "tensor", "tensors",
                      "shares", "dtype", "forward", "backward", "setup_context", "jvp", "generate_vmap_rule"}) \
    | frozenset(dir(builtins))


def shape_of(name: str) -> str:
    """The ctx attribute that keeps a tensor's shape where the backward reads nothing else of it: `x_shape`."""
    return f"{name}_shape"


def grad(name: str) -> str:
    """Gradient of a tensor: `grad_x` for `x`, `grad_y` for the upstream gradient of `y`."""
    return f"grad_{name}"


def tangent(name: str) -> str:
    """Forward-mode tangent of a tensor: `tangent_x` for `x`, `tangent_y` for the output `y`."""
    return f"tangent_{name}"


BATCH = "..."   # the ellipsis index: any number of leading (batch) dims


def size(index: str) -> str:
    """The runtime length of the dim an index ranges over (for `...`, the product of the batch dims)."""
    return "size_batch" if index == BATCH else f"size_{index}"


def index_of_size(name: str) -> str:
    """The index a named size (`size_n`) is the length of."""
    return name.removeprefix("size_")


SHARED_PREFIX = "shared_"   # values the backward computes once for several gradients: shared_0, shared_1, ...
SAVED_PREFIX = "saved_"     # values the forward computes and hands to the backward: saved_log_softmax
# a contraction inside a function (the scores of softmax(sum(q * k, e), s)), computed once by @ or einsum
CONTRACTED_PREFIX = "contracted_"


def is_zero_dim_tensor(expr) -> bool:
    """Whether a SymPy symbol stands for a 0-d tensor in generated code: the upstream gradient of a
    scalar output (`grad_loss`) or a shared scalar; spec names cannot take these prefixes."""
    return getattr(expr, "is_Symbol", False) and expr.name.startswith(("grad_", "tangent_", SHARED_PREFIX))


def forward(op: str) -> str:
    return f"{op}_forward"


def backward(op: str) -> str:
    return f"{op}_backward"


def forward_saving(op: str) -> str:
    """The forward that also returns the values its backward reuses (ops that save any)."""
    return f"{op}_forward_saving"


def function_class(op: str) -> str:
    """The torch.autograd.Function subclass: `LinearFunction` for `linear`."""
    return "".join(part[:1].upper() + part[1:] for part in op.split("_")) + "Function"


def custom_op(op: str) -> str:
    """The torch.library custom op's Python handle: `linear_op`."""
    return f"{op}_op"


def custom_op_name(namespace: str, op: str, style: str) -> str:
    """The registered name: `derive::linear`, `derive::linear_broadcast` for the broadcast style (and so on)."""
    return f"{namespace}::{op}" if style == "contraction" else f"{namespace}::{op}_{style}"


def check_shapes(op: str) -> str:
    """The module's shape-contract helper: `_check_linear_shapes`."""
    return f"_check_{op}_shapes"


def jvp(op: str) -> str:
    """The forward-mode function: the output's tangent from the inputs' tangents."""
    return f"{op}_jvp"


def module_file(op: str) -> str:
    return f"{op}.py"


@dataclass(frozen=True)
class Style:
    """One style of generated module: the code it prints, where it goes, and how its Function runs it."""

    name: str
    directory: str      # its modules' folder in the output directory ("": the directory itself)
    lowering: str       # the lowered code it prints (derive.lower: contraction or broadcast)
    compiled: bool      # forward and backward run as kernels torch.compile fuses, compiled on their first call


# The layout of an output directory: one module per op and style, and the catalog's derivations document.
MODULE_STYLES = {style.name: style for style in (
    Style("contraction", "", "contraction", compiled=False),
    Style("broadcast", "broadcast/", "broadcast", compiled=False),
    Style("fused", "fused/", "contraction", compiled=True),
)}
ALL_STYLES = tuple(MODULE_STYLES)     # what `derive generate --style all` writes
# The eager styles, one per lowering: what derive.lower prints and the tests sweep (the fused style prints the
# contraction style's code; its compiled kernels are tested on their own, tests/test_fused.py).
STYLES = tuple(name for name, style in MODULE_STYLES.items() if not style.compiled)
STYLE_DIRS = {name: MODULE_STYLES[name].directory for name in STYLES}
DERIVATIONS_FILE = "DERIVATIONS.md"
DEFAULT_NAMESPACE = "derive"   # torch.library namespace of the generated custom ops: the built-in catalog's only


def derivations_file(namespace: str) -> str:
    """The catalog's derivations document: DERIVATIONS.md for the built-in catalog's namespace, and
    DERIVATIONS.<namespace>.md otherwise, so that catalogs sharing an output directory each keep their own."""
    return DERIVATIONS_FILE if namespace == DEFAULT_NAMESPACE else f"DERIVATIONS.{namespace}.md"


# Namespaces torch and its libraries register their own ops in (prim is refused by torch.library itself;
# the others would put a catalog's ops among torch's), and the attributes of `torch.ops` that hide a namespace.
TORCH_NAMESPACES = frozenset({"aten", "prim", "prims", "debugprims", "rngprims", "torch", "quantized", "c10d",
                              "c10d_functional", "inductor", "higher_order", "profiler", "mkl", "mkldnn", "onednn",
                              "fbgemm", "onnx", "onnx_symbolic", "export", "fsdp", "symm_mem", "streams", "flex_lib",
                              "debug_mode_ops", "torchvision", "torchaudio", "load_library", "import_module",
                              "loaded_libraries"})


def namespace_problem(namespace: str, builtin: bool = False) -> str | None:
    """Why `namespace` cannot hold a catalog's custom ops, or None when it can (`builtin`: the built-in catalog's)."""
    if not namespace.isascii() or not namespace.isidentifier():
        return f"namespace {namespace!r} is not an ASCII identifier"
    if keyword.iskeyword(namespace) or keyword.issoftkeyword(namespace):
        return f"namespace '{namespace}' is a Python keyword"
    if namespace.startswith("_"):
        return f"namespace '{namespace}' starts with an underscore (reserved for torch's private namespaces)"
    if namespace in TORCH_NAMESPACES:
        return f"namespace '{namespace}' is torch's own"
    if namespace == DEFAULT_NAMESPACE and not builtin:
        return f"namespace '{namespace}' is reserved for the built-in catalog"
    return None


def in_memory_namespace(spec: str, text: str) -> str:
    """The namespace of the ops `derive.op` and `derive.load` derive in a running process: one per spec (its name
    and text), so that they replace neither a generated module's custom ops nor another spec's."""
    return "derive_op_" + hashlib.sha256(f"{spec}\0{text}".encode("utf-8", "surrogateescape")).hexdigest()[:12]


_PLAIN_PART = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*")


def spec_namespace(relative: str) -> str:
    """The default namespace of a user's catalog, from its path relative to the project root (the directory
    of pyproject.toml, or the working directory): `ops.toml` -> `ops`, `specs/my_ops.toml` -> `specs__my_ops`.
    Directories join with `__`, which no plain part contains, so two paths never give one name; a path that is
    not so plain (other characters or suffix, `..`, a leading digit) or whose name is taken gets a hash of the
    path after `___`, which no plain name contains."""
    path = PurePosixPath(relative)
    parts = [*path.parent.parts, path.stem] if path.parent != PurePosixPath(".") else [path.stem]
    name = "__".join(parts)
    if path.suffix == ".toml" and all(_PLAIN_PART.fullmatch(part) for part in parts) \
            and namespace_problem(name) is None:
        return name
    plain = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_")[:40] or "ops"
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{'ops_' if plain[0].isdigit() else ''}{plain}___{digest}"


def default_catalog_path() -> Path:
    """The built-in catalog, derive/catalog/ops.toml."""
    return Path(str(resources.files("derive") / "catalog" / "ops.toml"))


def is_generated_name(name: str) -> bool:
    return name.startswith(("grad_", "tangent_", "size_", SHARED_PREFIX, SAVED_PREFIX, CONTRACTED_PREFIX)) \
        or name.endswith(("_forward", "_backward", "_forward_saving", "_jvp"))


def module_names(op: str) -> frozenset[str]:
    """The names an op's generated module defines at its top level."""
    return frozenset({op, function_class(op), custom_op(op), forward(op), backward(op), forward_saving(op), jvp(op)})


def name_problem(name: str) -> str | None:
    """Why `name` cannot be used in a spec, or None when it can."""
    foreign = next((c for c in name if not c.isascii()), None)
    if foreign is not None:     # a homoglyph such as Cyrillic 'а' looks like an ASCII name and is not one
        return (f"'{name}' contains {foreign!r} (U+{ord(foreign):04X} {unicodedata.name(foreign, 'unnamed')}); "
                f"names must be ASCII")
    if not name.isidentifier():
        return f"'{name}' is not a valid identifier"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"'{name}' is a Python keyword"
    if name.startswith("_"):
        return f"'{name}' starts with an underscore (reserved for dunder and private names)"
    if name in RESERVED:
        return f"'{name}' shadows a Python or torch name used in generated code"
    if is_generated_name(name):
        return (f"'{name}' collides with generated names (grad_*, tangent_*, size_*, shared_*, saved_*, "
                f"*_forward, *_backward, *_jvp)")
    return None
