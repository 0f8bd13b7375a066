"""`derive bench --composite`: one training step of user-style ops outside the catalog, against torch.

Contract:

- Ops. Every op of derive/catalog/composite.toml (gated activations, normalizations over other dims, robust
  losses, attention in one equation), rendered by the current pipeline into a temporary directory in the
  contraction and fused styles, once per process. Sizes: SIZES, per index (`...` is one flat dim); --quick
  takes at most 8 per index and 64 for `...`. float32, the threads torch has.
- Contenders, each the forward and the backward of one step (`torch.autograd.grad` of the result, given a
  fixed random upstream gradient): "torch eager", the spec's `reference` (the same forward written in torch
  ops) under autograd; "torch compiled", `torch.compile` of that reference (compiled for the sizes it is called
  with: every size static); "torch compiled, dynamic", the same with `dynamic=True` (every size a symbol; the
  fused style keeps only its batch dims symbolic); "native", torch's own kernel
  where one exists (NATIVE); "derive", the contraction-style module's op; "derive fused", the fused one's.
- Checked first: every contender's gradients equal torch eager's (bench.verify); that first call also
  compiles what is compiled, outside the timing; then COMPILED_WARMUP more calls of each (a compiled
  function's next calls still take milliseconds), before the rounds' own warm-up.
- Measured: median seconds in interleaved shuffled rounds (bench.median_seconds), peak bytes of one call
  (bench.peak_bytes), and saved bytes: what the forward hands its backward, every tensor that reaches
  `torch.autograd.graph.saved_tensors_hooks`, counted once per storage (inputs included, for every contender).
- Reported: each contender's figures and the ratios derive / torch eager, derive fused / torch compiled (static
  and dynamic) and derive fused / native.
"""

from __future__ import annotations

import functools
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import bench, naming
from .model import OpSpec
from .spec import load_catalog
from .testing import load_module, make_inputs

SPEC = Path(__file__).parent / "catalog" / "composite.toml"
EAGER, COMPILED, NATIVE_KERNEL, DERIVE, FUSED = "torch eager", "torch compiled", "native", "derive", "derive fused"
COMPILED_DYNAMIC = "torch compiled, dynamic"
COMPILED_WARMUP = 3     # calls of each contender after the check, before the timed rounds' own warm-up

# The length of each index at the real sizes (about a million elements per input).
SIZES = {
    "mish": {"...": 1 << 20},
    "swiglu": {"...": 1 << 20},
    "geglu": {"...": 1 << 20},
    "rms_norm": {"...": 4096, "d": 256},
    "channel_norm": {"n": 32, "c": 64, "l": 512},
    "group_norm": {"n": 32, "g": 8, "c": 8, "l": 512},
    "huber": {"...": 1 << 20},
    "log_cosh": {"...": 1 << 20},
    "attention": {"b": 4, "h": 8, "t": 128, "s": 128, "d": 32, "e": 32},
}

# torch's own kernel for an op, where one exists, on the spec's inputs and params.
NATIVE: dict[str, Callable[..., torch.Tensor]] = {
    "mish": lambda x: F.mish(x),
    "rms_norm": lambda x, w, eps=1e-6: F.rms_norm(x, (x.shape[-1],), w, eps),
    "channel_norm": lambda x, w, b, eps=1e-5: F.batch_norm(x, None, None, w, b, training=True, eps=eps),
    "group_norm": lambda x, w, b, eps=1e-5: F.group_norm(x.flatten(1, 2), x.shape[1], w.flatten(), b.flatten(),
                                                          eps).view_as(x),
    "huber": lambda pred, target, delta=1.0: F.huber_loss(pred, target, delta=delta),
    "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}


@dataclass(frozen=True)
class CompositeRow:
    """One op: each contender's median seconds, peak bytes and saved bytes."""

    op: str
    shape: str
    seconds: dict[str, float]
    peak: dict[str, int]
    saved: dict[str, int]

    def ratio(self, numerator: str, denominator: str, figure: str = "seconds") -> float | None:
        values = getattr(self, figure)
        if numerator not in values or denominator not in values or not values[denominator]:
            return None
        return values[numerator] / values[denominator]


@functools.cache
def modules() -> dict[str, tuple[object, object]]:
    """op name -> (contraction module, fused module), rendered by the current pipeline once per process."""
    from .build import render_catalog
    catalog = load_catalog(SPEC)
    relative = "derive/catalog/composite.toml"
    files = render_catalog(catalog, ("contraction", "fused"), spec_arg=relative, out_arg="<bench>",
                           namespace=naming.spec_namespace(relative))
    folder = Path(tempfile.mkdtemp(prefix="derive_composite_"))
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    return {op.name: tuple(load_module(folder / naming.MODULE_STYLES[style].directory / naming.module_file(op.name))
                           for style in ("contraction", "fused")) for op in catalog.ops}


def op_sizes(op: OpSpec, quick: bool) -> dict[str, int]:
    sizes = SIZES[op.name]
    return {index: min(size, 64 if index == naming.BATCH else 8) for index, size in sizes.items()} if quick else sizes


def contenders(op: OpSpec, sizes: dict[str, int]) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """Each contender's training step: forward, then the gradients of every input."""
    contraction, fused = modules()[op.name]
    leaves = [t.requires_grad_() for t in make_inputs(op, sizes, torch.float32)]
    eager = torch_forward(op)
    output = eager(*leaves)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    forwards = {EAGER: eager, COMPILED: torch.compile(eager), COMPILED_DYNAMIC: torch.compile(eager, dynamic=True),
                DERIVE: getattr(contraction, op.name),
                FUSED: getattr(fused, op.name)}
    if op.name in NATIVE:
        forwards[NATIVE_KERNEL] = NATIVE[op.name]

    def step(forward):
        return lambda: torch.autograd.grad(forward(*leaves), leaves, grad_output)

    return {name: step(forward) for name, forward in forwards.items()}, \
        {name: functools.partial(saved_bytes, forward, leaves) for name, forward in forwards.items()}


def torch_forward(op: OpSpec) -> Callable[..., torch.Tensor]:
    """The spec's `reference` as a Python function of its inputs and params, which torch.compile can trace
    (testing.reference evaluates the expression, which Dynamo cannot see into). The expression was checked
    against a whitelist when the spec was parsed."""
    arguments = ", ".join([t.name for t in op.inputs] + [f"{p.name}={p.default!r}" for p in op.params])
    code = compile(f"lambda {arguments}: {op.reference}", f"<reference of {op.name}>", "eval")
    return eval(code, {"torch": torch, "__builtins__": {"__import__": __import__}})  # noqa: S307


def saved_bytes(forward: Callable[..., torch.Tensor], inputs) -> int:
    """Bytes of what `forward(*inputs)` saves for its backward, each storage once."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(*inputs)
    return sum(storages.values())


def run_composite(quick: bool = False, rounds: int | None = None, seed: int = 0, only=()) -> list[CompositeRow]:
    rounds = rounds or (bench.QUICK_ROUNDS if quick else bench.DEFAULT_ROUNDS)
    warmup = bench.QUICK_WARMUP if quick else bench.DEFAULT_WARMUP
    rng = random.Random(seed)
    rows = []
    for op in load_catalog(SPEC).ops:
        if only and op.name not in only:
            continue
        sizes = op_sizes(op, quick)
        steps, saved = contenders(op, sizes)
        shape = " ".join(f"{index}={size}" for index, size in sizes.items())
        # the reference is torch eager: every other contender's gradients must equal its
        bench.verify(bench.Case(op.name, shape, {bench.AUTOGRAD: steps[EAGER], **steps}))
        for step in steps.values():     # a compiled function's first calls after compiling still load and tune
            for _ in range(COMPILED_WARMUP):
                step()
        seconds = bench.median_seconds(steps, rounds, warmup, rng)
        peaks = {name: bench.peak_bytes(step) for name, step in steps.items()}
        rows.append(CompositeRow(op.name, shape, seconds, peaks, {name: count() for name, count in saved.items()}))
    return rows


def format_composite(rows: list[CompositeRow]) -> str:
    header = ("op", "shape", "eager ms", "derive ms", "time", "peak", "saved", "compiled ms", "fused ms",
              "fused/compiled", "fused/dynamic", "native ms", "fused/native", "fused saved")
    lines = []
    for row in rows:
        def ratio(a, b, figure="seconds"):
            value = row.ratio(a, b, figure)
            return "-" if value is None else f"{value:.2f}x"
        native = row.seconds.get(NATIVE_KERNEL)
        lines.append((row.op, row.shape, f"{row.seconds[EAGER] * 1e3:.3f}", f"{row.seconds[DERIVE] * 1e3:.3f}",
                      ratio(DERIVE, EAGER), ratio(DERIVE, EAGER, "peak"), ratio(DERIVE, EAGER, "saved"),
                      f"{row.seconds[COMPILED] * 1e3:.3f}", f"{row.seconds[FUSED] * 1e3:.3f}",
                      ratio(FUSED, COMPILED), ratio(FUSED, COMPILED_DYNAMIC),
                      "-" if native is None else f"{native * 1e3:.3f}",
                      ratio(FUSED, NATIVE_KERNEL), ratio(FUSED, EAGER, "saved")))
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([
        f"derive bench --composite: one training step (forward + backward) of user-style ops "
        f"({SPEC.name}), {bench.DTYPE}, {torch.get_num_threads()} threads; medians of interleaved rounds",
        "time, peak, saved: derive (contraction style, eager) / torch eager (the same forward in torch ops, "
        "autograd); fused/compiled: derive fused / torch.compile of that forward (static sizes; fused/dynamic: "
        "with dynamic=True); fused/native: derive fused / "
        "torch's own kernel; fused saved: derive fused's saved bytes / torch eager's",
        "", line(header), line(["-" * w for w in widths]), *map(line, lines)])


def add_arguments(command) -> None:
    """`derive bench`'s arguments (bench.add_arguments), and --composite, which runs this section instead."""
    bench.add_arguments(command)
    command.add_argument("--composite", action="store_true",
                         help="instead, one training step of the user-style ops in derive/catalog/composite.toml "
                              "against torch eager, torch.compile and torch's native kernels (contraction and "
                              "fused styles; --quick and --rounds apply)")
    command.set_defaults(handler=_command)


def _command(args) -> int:
    if not args.composite:
        return bench._command(args)
    print(format_composite(run_composite(args.quick, args.rounds)))
    return 0
