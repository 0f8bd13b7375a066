"""`derive bench`: time the generated backward code against torch.autograd.

Contract:

- Cases. Every op of the built-in catalog, the seed article's network (linear
  k -> m, ReLU, linear m -> 1, MSE on `output.squeeze(-1)`), and a classifier MLP (linear k -> m,
  ReLU, linear m -> 10 classes, cross-entropy) built from the generated Functions, at each size preset
  asked for. An op's inputs come from its own metadata, never from per-op code: each
  size an index ranges over gets the preset's value for that size's name (`n`, `k`,
  `m`); sizes with other names share the rest of an n * k * m budget that bounds
  every tensor either style builds (`op_sizes`).
  Inputs are float32, as in the article.
- Contenders. "generated": only the `<op>_backward` call (given the forward's result
  when it reuses it, and the values `<op>_forward_saving` hands over, as autograd's
  graph holds what its forward saved: both computed beforehand; for the network, the chain of generated
  backward calls, with the forward intermediates computed beforehand).
  "autograd": `torch.autograd.grad(out, leaves, grad_out, retain_graph=True)` on a
  graph built once per case from the op's torch reference (for the network, from
  plain torch ops), so only the backward pass is timed. The network also has a
  "hand-written" contender: the same gradients as matrix products, `seed_backward`.
- Checked first. Before timing, every contender's gradients are compared with
  autograd's by `torch.testing.assert_close`; a mismatch raises AssertionError.
- Timing. Warm-up rounds, then `rounds` rounds; each round runs every contender of
  the case once, in an order shuffled by a seeded `random.Random`. Reported: medians.
- Peak memory. One call of each contender under `torch.profiler.profile(activities=
  [ProfilerActivity.CPU], profile_memory=True)`; the profiler's raw memory events
  (one per allocation, a negative one per free) are summed in time order and the
  largest running total is the peak: the bytes the call held at once beyond what was
  live before it (its results included). The raw events are read from
  `prof.profiler.kineto_results`, not a public attribute; `key_averages()` and
  `prof.events()` are not used: they fold allocations into per-op totals, not a peak.
- Saved bytes. What the forward leaves in the graph for the backward: the distinct storages the
  generated Function (`<op>()`, or the chain of them for the networks) saves, against those autograd's
  graph of the reference saves (`testing.saved_bytes`, through `saved_tensors_hooks`; a tensor two nodes
  save counts once, a shape kept on a ctx counts nothing). For the two networks, the activations only: what
  the forward computed, not the input, weights, biases and target both sides keep alike.
- `derive generate` time: one in-process `render_catalog(load_catalog())` of the
  built-in catalog in every style (rendering only, no files written, imports excluded), in this process
  alone: torch is imported, so no worker processes are forked (build._processes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch.profiler import ProfilerActivity, profile

from . import naming
from .build import render_catalog
from .derivation import Derivation, derive
from .model import OpSpec
from .spec import load_catalog
from .testing import backward_arguments, load_module, make_inputs, op_saved_bytes, reference, saved_bytes

SIZE_PRESETS = {
    "quick": {"n": 16, "k": 12, "m": 8},
    "seed": {"n": 1000, "k": 784, "m": 50},
    "large": {"n": 4000, "k": 784, "m": 200},
}
DEFAULT_SIZES = ("seed", "large")
DEFAULT_ROUNDS, DEFAULT_WARMUP = 30, 3
QUICK_ROUNDS, QUICK_WARMUP = 3, 1
SEED_NETWORK = "seed network"
MLP = "classifier MLP"
MLP_CLASSES = 10
AUTOGRAD, GENERATED, HANDWRITTEN = "autograd", "generated", "hand-written"
CHECKS = "shape checks"
DTYPE = torch.float32
ATOL, RTOL = 1e-5, 1.3e-6     # float32 defaults of assert_close; ATOL is scaled in `verify`

Gradients = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One computation and the contenders that compute its gradients; `autograd` is the reference.

    `checks`: the shape-contract call the generated backward makes first, on the same arguments,
    timed in the same rounds so that the report can show what the checks cost.
    """

    name: str
    shape: str
    contenders: dict[str, Callable[[], Gradients]]
    checks: Callable[[], None] | None = None
    saved: tuple[int, int] | None = None     # bytes saved for the backward: (generated Functions, autograd)


@dataclass(frozen=True)
class Row:
    """One contender of a case against autograd: median seconds and peak bytes of each."""

    case: str
    shape: str
    seconds: float
    autograd_seconds: float
    peak: int
    autograd_peak: int
    check_seconds: float | None = None
    saved: tuple[int, int] | None = None     # bytes saved for the backward: (generated Functions, autograd)

    @property
    def saved_ratio(self) -> float | None:
        return self.saved[0] / self.saved[1] if self.saved and self.saved[1] else None

    @property
    def time_ratio(self) -> float:
        return self.seconds / self.autograd_seconds

    @property
    def memory_ratio(self) -> float | None:
        return self.peak / self.autograd_peak if self.autograd_peak else None

    @property
    def check_share(self) -> float | None:
        """The shape checks' part of the generated backward's time."""
        return None if self.check_seconds is None else self.check_seconds / self.seconds


@dataclass(frozen=True)
class Report:
    style: str
    rounds: int
    warmup: int
    rows: tuple[Row, ...]
    generate_seconds: float


def run_bench(quick: bool = False, style: str = "contraction", sizes: Sequence[str] = DEFAULT_SIZES,
              rounds: int | None = None, generated_dir: str | Path = "generated", seed: int = 0,
              only: Sequence[str] = ()) -> Report:
    """Check, time and profile every case (or the cases named in `only`); `quick`: tiny sizes, few rounds."""
    presets = ("quick",) if quick else tuple(sizes)
    rounds = rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    warmup = QUICK_WARMUP if quick else DEFAULT_WARMUP
    rng = random.Random(seed)
    rows = []
    for preset in presets:
        for case in cases(style, SIZE_PRESETS[preset], Path(generated_dir), only):
            verify(case)
            rows.extend(measure(case, rounds, warmup, rng))
    return Report(style, rounds, warmup, tuple(rows), generate_seconds())


def cases(style: str, preset: dict[str, int], generated_dir: Path, only: Sequence[str] = ()) -> list[Case]:
    """One case per catalog op, then the seed network and the MLP, at one size preset; only those named in
    `only` if given."""
    ops = load_catalog().ops
    folder = generated_dir / naming.MODULE_STYLES[style].directory
    modules = {op.name: load_module(folder / naming.module_file(op.name)) for op in ops}
    wanted = set(only) or {op.name for op in ops} | {SEED_NETWORK, MLP}
    network = [seed_network_case(modules, preset)] if SEED_NETWORK in wanted else []
    network += [mlp_case(modules, preset)] if MLP in wanted else []
    return [op_case(op, modules[op.name], preset) for op in ops if op.name in wanted] + network


def op_sizes(derivation: Derivation, preset: dict[str, int]) -> dict[str, int]:
    """A length for each size the op's indices range over, in index order.

    A size named in the preset (n, k, m: the seed's names for rows, the contracted
    dim and columns, which the catalog uses in the same roles) gets the preset's
    value. The others share equally what is left of the budget n * k * m, at most the
    preset's largest value each: a lone unknown size (relu's `...`) gets that largest
    value, bmm's s, i and j with k = 784 get 36 each. The budget bounds the product of
    the sizes of every index in the op's gradients, summation indices included (softmax
    counts c twice, as c and c_1): no tensor that either style builds can be larger.
    """
    op = derivation.op
    names = {naming.size(size): size for size in dict(op.index_sizes).values()}
    indices = set().union(*(g.vjp.atoms(sympy.Idx) for g in derivation.gradients))
    counts = Counter(names[str(index.upper + 1)] for index in indices)
    budget = math.prod(preset.values()) / math.prod(preset[size] ** n for size, n in counts.items() if size in preset)
    unknown = sum(n for size, n in counts.items() if size not in preset)
    share = min(max(preset.values()), int(budget ** (1 / max(1, unknown)) + 1e-9))
    return {size: preset.get(size, max(1, share)) for size in dict.fromkeys(map(op.size_of, op.index_order))}


def op_case(op: OpSpec, module, preset: dict[str, int]) -> Case:
    derivation = derive(op)
    sizes = op_sizes(derivation, preset)
    inputs = make_inputs(op, sizes, DTYPE)
    flags = tuple(t.differentiable for t in op.inputs)
    leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, flags)]
    output = reference(op)(*leaves)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    backward = getattr(module, naming.backward(op.name))
    arguments = backward_arguments(op, module, inputs)    # the forward's result and saved values, beforehand

    def generated():
        return [g for g in backward(grad_output, *arguments, needs_input_grad=flags) if g is not None]

    return Case(op.name, _shape(sizes), {GENERATED: generated, AUTOGRAD: _autograd(output, leaves, grad_output)},
                checks=_recorded_checks(module, naming.check_shapes(op.name), generated),
                saved=op_saved_bytes(op, module, inputs))


def _recorded_checks(module, name: str, call: Callable[[], Gradients]) -> Callable[[], None]:
    """The module's shape-check call as `call` makes it: the arguments are recorded from one run."""
    check = getattr(module, name)
    recorded = []
    setattr(module, name, lambda *args, **kwargs: recorded.append((args, kwargs)) or check(*args, **kwargs))
    try:
        call()
    finally:
        setattr(module, name, check)
    ((args, kwargs),) = recorded
    return lambda: check(*args, **kwargs)


def seed_network_case(modules, preset: dict[str, int]) -> Case:
    """The article's network at n x k inputs and m hidden units; gradients of input, w1, b1, w2, b2."""
    n, k, m = preset["n"], preset["k"], preset["m"]
    generator = torch.Generator().manual_seed(0)
    data = dict(input=torch.randn(n, k, generator=generator), target=torch.randn(n, generator=generator),
                w1=torch.randn(k, m, generator=generator) / k ** 0.5, b1=torch.zeros(m),
                w2=torch.randn(m, 1, generator=generator) / m ** 0.5, b2=torch.zeros(1))
    leaves = {name: value.detach().requires_grad_(name != "target") for name, value in data.items()}
    l1 = leaves["input"] @ leaves["w1"] + leaves["b1"]
    l2 = torch.relu(l1)
    output = l2 @ leaves["w2"] + leaves["b2"]
    loss = torch.nn.functional.mse_loss(output.squeeze(-1), leaves["target"])
    grad_loss = torch.ones_like(loss)
    saved = dict(data=data, l1=l1.detach(), l2=l2.detach(), output=output.detach(), grad_loss=grad_loss)
    wanted = [leaves[name] for name in ("input", "w1", "b1", "w2", "b2")]
    linear, relu, mse = (modules[name] for name in ("linear", "relu", "mse"))

    def through(first, activation, second, loss_of):
        def build():
            fresh = {name: value.detach().requires_grad_(name != "target") for name, value in data.items()}
            hidden = activation(first(fresh["input"], fresh["w1"], fresh["b1"]))
            return loss_of(second(hidden, fresh["w2"], fresh["b2"]).squeeze(-1), fresh["target"])
        return build

    saved_generated = saved_bytes(through(linear.linear, relu.relu, linear.linear, mse.mse), activations=True)
    saved_autograd = saved_bytes(through(_torch_linear, torch.relu, _torch_linear, torch.nn.functional.mse_loss),
                                 activations=True)
    return Case(SEED_NETWORK, _shape({"n": n, "k": k, "m": m}), {
        GENERATED: lambda: generated_seed_backward(modules, **saved),
        HANDWRITTEN: lambda: seed_backward(**saved),
        AUTOGRAD: _autograd(loss, wanted, grad_loss),
    }, saved=(saved_generated, saved_autograd))


def _torch_linear(x, w, b):
    return x @ w + b


def mlp_case(modules, preset: dict[str, int]) -> Case:
    """linear k -> m, relu, linear m -> MLP_CLASSES, cross-entropy against class indices: one graph built from
    the generated Functions (`linear()`, `relu()`, `cross_entropy()`), one from torch ops, each differentiated
    by torch.autograd.grad; gradients of the input and every weight and bias."""
    n, k, m = preset["n"], preset["k"], preset["m"]
    generator = torch.Generator().manual_seed(0)
    data = dict(input=torch.randn(n, k, generator=generator),
                w1=torch.randn(k, m, generator=generator) / k ** 0.5, b1=torch.zeros(m),
                w2=torch.randn(m, MLP_CLASSES, generator=generator) / m ** 0.5, b2=torch.zeros(MLP_CLASSES))
    target = torch.randint(0, MLP_CLASSES, (n,), generator=generator)
    linear, relu, cross_entropy = (modules[name] for name in ("linear", "relu", "cross_entropy"))

    def network(first, activation, second, loss_of):
        def build():
            leaves = {name: value.detach().requires_grad_() for name, value in data.items()}
            hidden = activation(first(leaves["input"], leaves["w1"], leaves["b1"]))
            return loss_of(second(hidden, leaves["w2"], leaves["b2"]), target), list(leaves.values())
        return build

    generated = network(linear.linear, relu.relu, linear.linear, cross_entropy.cross_entropy)
    autograd = network(_torch_linear, torch.relu, _torch_linear, torch.nn.functional.cross_entropy)
    contenders = {}
    for name, build in ((GENERATED, generated), (AUTOGRAD, autograd)):
        loss, leaves = build()
        contenders[name] = _autograd(loss, leaves, torch.ones_like(loss))
    return Case(MLP, _shape({"n": n, "k": k, "m": m, "classes": MLP_CLASSES}), contenders,
                saved=(saved_bytes(generated, activations=True), saved_bytes(autograd, activations=True)))


def generated_seed_backward(modules, data, l1, l2, output, grad_loss) -> Gradients:
    """The network's backward chained through the generated functions only."""
    linear, relu, mse = (modules[name] for name in ("linear", "relu", "mse"))
    prediction = output.squeeze(-1)
    grad_prediction, _ = mse.mse_backward(grad_loss, prediction, data["target"], needs_input_grad=(True, False))
    grad_l2, grad_w2, grad_b2 = linear.linear_backward(grad_prediction.unsqueeze(-1), l2, data["w2"], data["b2"])
    del grad_prediction  # each gradient is freed once used, as autograd frees it: the peak should be
    (grad_l1,) = relu.relu_backward(grad_l2, l1, l2)   # the generated code's, not this glue's
    del grad_l2
    grad_input, grad_w1, grad_b1 = linear.linear_backward(grad_l1, data["input"], data["w1"], data["b1"])
    return grad_input, grad_w1, grad_b1, grad_w2, grad_b2


def seed_backward(data, l1, l2, output, grad_loss) -> Gradients:
    """The network's backward written by hand as matrix products: the yardstick for the generated chain."""
    grad_output = (2 * grad_loss / output.shape[0] * (output.squeeze(-1) - data["target"])).unsqueeze(-1)
    grad_w2 = l2.T @ grad_output
    grad_b2 = grad_output.sum(0)
    grad_l1 = torch.where(l1 > 0, grad_output @ data["w2"].T, 0)
    grad_w1 = data["input"].T @ grad_l1
    grad_b1 = grad_l1.sum(0)
    grad_input = grad_l1 @ data["w1"].T
    return grad_input, grad_w1, grad_b1, grad_w2, grad_b2


def _autograd(output: torch.Tensor, leaves, grad_output: torch.Tensor) -> Callable[[], Gradients]:
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    return lambda: torch.autograd.grad(output, wanted, grad_output, retain_graph=True)


def _shape(sizes: dict[str, int]) -> str:
    return " ".join(f"{name}={length}" for name, length in sizes.items())


def verify(case: Case) -> None:
    """Every contender computes autograd's gradients: same count, shapes and values.

    float32 sums of thousands of terms round differently in different kernels, and an
    element that nearly cancels cannot meet a relative tolerance, so the absolute
    tolerance scales with the gradient: ATOL times its largest magnitude (at least 1).
    """
    expected = case.contenders[AUTOGRAD]()
    for name, contender in case.contenders.items():
        actual = contender()
        assert len(actual) == len(expected), f"{case.name} ({name}): {len(actual)} gradients, expected {len(expected)}"
        for i, (got, want) in enumerate(zip(actual, expected)):
            atol = ATOL * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got, want, atol=atol, rtol=RTOL,
                                       msg=lambda m: f"{case.name} ({name}), gradient {i}: {m}")


def measure(case: Case, rounds: int, warmup: int, rng: random.Random) -> list[Row]:
    """One row per contender other than autograd, timed against it in the same interleaved rounds."""
    timed = dict(case.contenders, **({CHECKS: case.checks} if case.checks else {}))
    seconds = median_seconds(timed, rounds, warmup, rng)
    peaks = {name: peak_bytes(contender) for name, contender in case.contenders.items()}
    return [Row(case.name if name == GENERATED else f"{case.name}, {name}", case.shape,
                seconds[name], seconds[AUTOGRAD], peaks[name], peaks[AUTOGRAD],
                seconds.get(CHECKS) if name == GENERATED else None, case.saved if name == GENERATED else None)
            for name in case.contenders if name != AUTOGRAD]


def median_seconds(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int,
                   rng: random.Random) -> dict[str, float]:
    """Median wall time of each contender's call; each round runs all of them once in a shuffled order."""
    order = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in order}
    for round_index in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            result = contenders[name]()
            elapsed = time.perf_counter() - start
            del result    # freed outside the timed region
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_bytes(call: Callable[[], Gradients]) -> int:
    """Peak of the running total of CPU allocations minus frees during one call (see the module docstring)."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints two trace lines per session straight to fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate_seconds() -> float:
    start = time.perf_counter()
    render_catalog(load_catalog())
    return time.perf_counter() - start


def format_report(report: Report) -> str:
    header = ("case", "shape", "ms", "autograd ms", "time ratio", "peak MB", "autograd peak MB", "memory ratio",
              "saved KB", "autograd saved KB", "saved ratio", "checks µs", "checks share")
    lines = [_row_cells(row) for row in report.rows]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    text = [f"derive bench: {report.style} style against torch.autograd (backward only), {DTYPE}, "
            f"{torch.get_num_threads()} threads; medians of {report.rounds} interleaved rounds after "
            f"{report.warmup} warm-up rounds",
            "ms: the generated backward, or the hand-written one on a 'hand-written' row; "
            "ratios: that / autograd; saved: the bytes the forward's graph keeps for the backward (the generated "
            "Functions against autograd of the reference); checks: the shape-contract call that backward makes first, "
            "timed alone in the same rounds, and its share of the backward's time",
            "", line(header), line(["-" * w for w in widths]), *map(line, lines), ""]
    text += _handwritten_lines(report.rows)
    text.append(f"derive generate, whole built-in catalog, every style: {report.generate_seconds * 1000:.0f} ms "
                "(in-process render_catalog(load_catalog()), one process, no files written)")
    return "\n".join(text)


def _row_cells(row: Row) -> tuple[str, ...]:
    memory = "n/a" if row.memory_ratio is None else f"{row.memory_ratio:.2f}x"
    checks = ("-", "-") if row.check_seconds is None else (f"{row.check_seconds * 1e6:.1f}", f"{row.check_share:.1%}")
    if row.saved is None:
        saved = ("-", "-", "-")
    else:
        ratio = "n/a" if row.saved_ratio is None else f"{row.saved_ratio:.2f}x"
        saved = (f"{row.saved[0] / 1e3:.1f}", f"{row.saved[1] / 1e3:.1f}", ratio)
    return (row.case, row.shape, f"{row.seconds * 1000:.3f}", f"{row.autograd_seconds * 1000:.3f}",
            f"{row.time_ratio:.2f}x", f"{row.peak / 1e6:.2f}", f"{row.autograd_peak / 1e6:.2f}", memory, *saved,
            *checks)


def _handwritten_lines(rows: Sequence[Row]) -> list[str]:
    """Generated network against the hand-written one, per shape."""
    generated = {row.shape: row for row in rows if row.case == SEED_NETWORK}
    return [f"{SEED_NETWORK} {row.shape}: generated / hand-written time = "
            f"{generated[row.shape].seconds / row.seconds:.2f}x"
            for row in rows if row.case == f"{SEED_NETWORK}, {HANDWRITTEN}"]


def add_arguments(command) -> None:
    """The `derive bench` subcommand's arguments and handler, on its parser (the CLI names it and its help)."""
    command.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: a smoke run")
    command.add_argument("--style", choices=naming.ALL_STYLES, default="contraction",
                         help="which generated modules to time (default: contraction)")
    command.add_argument("--sizes", type=_size_list, default=DEFAULT_SIZES,
                         help=f"comma-separated presets from {', '.join(SIZE_PRESETS)} (default: seed,large)")
    command.add_argument("--rounds", type=_positive, help=f"timed rounds per case (default: {DEFAULT_ROUNDS}, "
                                                    f"{QUICK_ROUNDS} with --quick)")
    command.add_argument("--ops", type=_case_list, default=(),
                         help=f"comma-separated cases to run, catalog op names or {SEED_NETWORK!r} (default: all)")
    command.set_defaults(handler=_command, debug=False)


def _size_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in SIZE_PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown size preset {', '.join(map(repr, unknown))} "
                                         f"(known: {', '.join(SIZE_PRESETS)})")
    return names


def _case_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    known = [op.name for op in load_catalog().ops] + [SEED_NETWORK, MLP]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    return names


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _command(args) -> int:
    print(format_report(run_bench(args.quick, args.style, args.sizes, args.rounds, only=args.ops)))
    return 0
