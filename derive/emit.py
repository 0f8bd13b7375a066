"""Stage 5b, lowered ops -> module text: render each op through the Jinja2 templates.

Python decides every piece of math and code; the templates only lay it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import jinja2

from . import naming
from .contracts import POLICY_DTYPES, Declared, all_hold, autocast_policies, guarded_blocks, shape_checks
from .derivation import Derivation
from .lower import Einsum, Leaf, LoweredExpr, LoweredOp, MatMul, backward_reads, covered, tangent_reads, walk
from .printing import (index_notation, output_shape, render, render_expr, size_bindings, size_source,
                       sizes_used, uses_math)
from .stamp import templates_dir


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["docstring"] = docstring_safe
    return env


def docstring_safe(text: str) -> str:
    """User text made safe inside a triple-quoted docstring."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def comment_safe(text: str) -> str:
    return " ".join(text.splitlines())


@dataclass(frozen=True)
class GradientView:
    target: str
    position: int
    shape: str
    wrt: str
    partial: str
    access: str
    vjp: str
    code: str
    shared: tuple[tuple[str, str], ...]   # values only this gradient uses, computed just before it

    @property
    def kernels(self) -> tuple[str, ...]:
        """What each fused PyTorch kernel in the code computes, for a comment above it."""
        code = " ".join([self.code] + [text for _, text in self.shared])
        return tuple(meaning for needle, meaning in KERNELS.items() if needle in code)


# The fused kernels the contraction style calls (a piece of the call that names it), with the
# formula each stands for.
KERNELS = {
    "torch.ops.aten.threshold_backward(": "threshold_backward(g, x, 0) = where(x <= 0, 0, g)",
    "torch.ops.aten.leaky_relu_backward(": "leaky_relu_backward(g, x, s, False) = where(x > 0, g, s * g)",
    "torch._softmax_backward_data(": "_softmax_backward_data(g, y, dim) = y * (g - sum(g * y, dim))",
    "torch._log_softmax_backward_data(": "_log_softmax_backward_data(g, y, dim) = g - exp(y) * sum(g, dim)",
    "torch.ops.aten.nll_loss_backward(": "nll_loss_backward(v, y, t, reduction=2) = zeros like y, with -v at [i, t[i]]",
    "[True, False, False])[0]": "native_layer_norm_backward(g, x, ..., w)[0] = rstd * (g w - mean(g w) - "
                                "xhat * mean(g w xhat)), xhat = (x - mean) * rstd",
    "[False, True, False])[1]": "native_layer_norm_backward(g, x, ...)[1] = sum over rows of g * xhat",
}


def render_module(derivation: Derivation, lowered: LoweredOp, source: str, command: str,
                  namespace: str = "derive") -> str:
    op = derivation.op
    forward_code = render_expr(lowered.forward)
    if forward_code in {t.name for t in op.inputs}:
        # an autograd.Function may not return an input as-is (its ctx could not tell them apart): a view
        forward_code = f"{forward_code}.view_as({forward_code})"
    gradients = []
    for g, expr in zip(derivation.gradients, lowered.gradients):
        position = [t.name for t in op.inputs].index(g.input)
        access = f"{naming.grad(g.input)}[{', '.join(g.indices)}]" if g.indices else naming.grad(g.input)
        gradients.append(GradientView(
            target=naming.grad(g.input), position=position,
            shape=f"shape of {g.input}: {_tuple(g.indices)}",
            wrt=index_notation(g.wrt), partial=index_notation(g.partial),
            access=access, vjp=index_notation(g.vjp), code=render_expr(expr),
            shared=tuple((s.name, render(s.value).text) for s in lowered.shared if s.users == (position,))))
    outputs = [naming.grad(t.name) for t in op.inputs if t.differentiable]
    returns = [naming.grad(t.name) if t.differentiable else "None" for t in op.inputs]
    params = [f"{p.name}={p.default!r}" for p in op.params]
    # The backward reads sizes off grad_out first, then off inputs it reads anyway.
    reads = backward_reads(lowered)
    inputs = [(t.name, t.indices) for t in op.inputs]
    sources = [(derivation.grad_output, op.output_indices)] + \
        sorted(inputs, key=lambda source: source[0] not in reads)
    shared_leaves = tuple(s.value for s in lowered.shared)
    reads |= {size_source(i, sources)[0] for i in sizes_used(op, list(lowered.gradients), shared_leaves)}
    values = [v.name for v in lowered.plan.saved]      # computed by the forward, read by the backward
    tensor_args = [t.name for t in op.inputs]
    # An op with values to compute again in a double backward keeps every input it computes them from.
    recomputed = any(v.recompute for v in lowered.plan.saved)
    kept = tensor_args if recomputed else [t.name for t in op.inputs if t.name in reads]
    saved = kept + ([op.output] if derivation.uses_output else []) + values
    jvp = _jvp_context(derivation, lowered)
    function = dict(
        cls=naming.function_class(op.name),
        custom_op=naming.custom_op(op.name),
        custom_op_name=naming.custom_op_name(namespace, op.name, lowered.style),
        apply_name=op.name,
        forward_args=", ".join(tensor_args + [p.name for p in op.params]),
        typed_args=", ".join([f"{t}: torch.Tensor" for t in tensor_args]
                             + [f"{p.name}: float = {p.default!r}" for p in op.params]),
        unpack_inputs=_unpack([t if t in saved or t in jvp["saved"] else "_" for t in tensor_args]
                              + [p.name for p in op.params]),
        unpack_values=_unpack(["_"] + values) if values else "",
        unpack_all=_unpack(tensor_args + [p.name for p in op.params]),
        unpack_recomputed=_unpack(["_"] + [v.name if v.recompute else "_" for v in lowered.plan.saved])
        if any(v.recompute for v in lowered.plan.saved) else "",
        recompute_args=", ".join(tensor_args + [f"ctx.{p.name}" for p in op.params]),
        saved=", ".join("output" if name == op.output else name for name in saved),
        saved_names=", ".join(saved),
        unpack_saved=_unpack(saved) if saved else "",
        params=[p.name for p in op.params],
        backward_call=", ".join([derivation.grad_output] + [t if t in saved else "None" for t in tensor_args]
                                + ([op.output] if derivation.uses_output else []) + values
                                + [f"ctx.{p.name}" for p in op.params]),
        inputs_count=len(op.inputs),
    )
    shared_blocks = _shared_blocks(lowered)
    forward_shared = [(s.name, render(s.value).text) for s in lowered.forward_shared]
    saving_lines = [(v.name, render(Leaf(v.expr, v.indices)).text, index_notation(v.expr)) for v in lowered.plan.saved]
    code = [forward_code] + [g.code for g in gradients] + [text for _, text in forward_shared] \
        + [text for _, block in shared_blocks for _, text in block] + [text for _, text, _ in saving_lines]
    output_access = f"{op.output}[{', '.join(op.output_indices)}]" if op.output_indices else op.output
    context = dict(
        contract=_contract(derivation, lowered, kept),
        autocast=_autocast(derivation, function["custom_op_name"]),
        source=comment_safe(source),
        command=comment_safe(command),
        op=op,
        doc=docstring_safe(op.doc),
        equation=docstring_safe(op.equation),
        signature=", ".join([t.name for t in op.inputs] + params),
        backward_signature=", ".join([derivation.grad_output] + [t.name for t in op.inputs]
                                     + ([op.output] if derivation.uses_output else []) + values + params),
        input_list=", ".join(t.name for t in op.inputs),
        needs_default=_tuple(["True"] * len(op.inputs)),
        output_access=output_access,
        uses_output=derivation.uses_output,
        uses_math=any(uses_math(text) for text in code),
        function=function,
        saving=dict(name=naming.forward_saving(op.name), names=values, returns=", ".join([op.output] + values),
                    lines=saving_lines) if values else None,
        forward=dict(name=naming.forward(op.name), code=forward_code,
                     sizes=size_bindings(op, [lowered.forward], shared=tuple(s.value for s in lowered.forward_shared)
                                         + tuple(Leaf(v.expr, v.indices) for v in lowered.plan.saved)),
                     shared=forward_shared),
        jvp=jvp,
        backward=dict(name=naming.backward(op.name), grad_output=derivation.grad_output,
                      sizes=size_bindings(op, list(lowered.gradients), sources, shared_leaves),
                      none_line=" = ".join(outputs) + " = None",
                      shared=shared_blocks, gradients=gradients, returns=_tuple(returns),
                      computed=_cheap_first(gradients, list(lowered.gradients))),
    )
    return environment().get_template("module.py.jinja").render(context)


def _contract(derivation: Derivation, lowered: LoweredOp, kept: list[str]) -> dict:
    """The shape contract's helper: its signature, the calls the forward and backward make, its checks.
    Inputs the Function does not save reach the backward as None; the backward's own tensors are
    None in the forward."""
    op = derivation.op
    extras = [Declared(derivation.grad_output, op.output_indices, optional=True, role="result")]
    if derivation.uses_output:
        extras.append(Declared(op.output, op.output_indices, optional=True, role="result"))
    extras += [Declared(v.name, v.indices, optional=True, role="saved") for v in lowered.plan.saved]
    declared = [Declared(t.name, t.indices, optional=t.name not in kept, integer=t.integer) for t in op.inputs]
    checks = shape_checks(op.name, declared + extras, dict(op.index_sizes))
    inputs = ", ".join(t.name for t in op.inputs)
    return dict(
        name=naming.check_shapes(op.name),
        signature=", ".join([inputs, "*"] + [f"{t.name}=None" for t in extras]),
        declarations=", ".join(t.declaration() for t in declared + extras),
        forward_call=f"{naming.check_shapes(op.name)}({inputs})",
        backward_call=f"{naming.check_shapes(op.name)}({inputs}, "
                      + ", ".join(f"{t.name}={t.name}" for t in extras) + ")",
        all_hold=all_hold(checks),
        blocks=guarded_blocks(checks),
    )


@dataclass(frozen=True)
class TangentView:
    """One input's share of the output's tangent, as the forward-mode function computes it."""

    tangent: str                          # the input's tangent: tangent_x
    jvp: str                              # its share in index notation
    code: str                             # ... and as Python
    shared: tuple[tuple[str, str], ...]   # values only this share uses, computed just before it
    kernels: tuple[str, ...]              # what each fused kernel in the code computes


def _jvp_context(derivation: Derivation, lowered: LoweredOp) -> dict:
    """What the template needs for `<op>_jvp` and the Function's `jvp`."""
    op = derivation.op
    positions = [t.name for t in op.inputs]
    reads = tangent_reads(lowered)
    uses_output = op.output in reads
    differentiable = [t.name for t in op.inputs if t.differentiable]
    inputs = [(t.name, t.indices) for t in op.inputs]
    # the result's shape (for an absent tangent) comes from the output when it is read, else from the inputs
    anchor = op.output if uses_output else next((n for n in differentiable if n in reads), differentiable[0])
    sources = sorted(inputs, key=lambda source: source[0] not in reads | {anchor})
    shared_leaves = tuple(s.value for s in lowered.tangent_shared)
    exprs = list(lowered.tangents)
    batched = [name for name, dims in inputs if naming.BATCH in dims]
    # a share that lacks one of the output's dims, or batch dims that broadcast between inputs,
    # make the sum of the shares narrower than the output
    expand = any(covered(e) != set(e.plan.indices) for e in exprs) or \
        (naming.BATCH in op.output_indices and len(batched) > 1)
    also = () if uses_output else op.output_indices
    sizes = size_bindings(op, exprs, sources, shared_leaves, also=also)
    sized = set(sizes_used(op, exprs, shared_leaves)) | set(also)
    reads |= {size_source(i, sources)[0] for i in sized if i != naming.BATCH}
    if naming.BATCH in sized:
        reads |= set(batched)
    if not uses_output:
        reads.add(anchor)
    shape = f"{op.output}.shape" if uses_output else output_shape(op, sources)
    shares = []
    for t, expr in zip(derivation.tangents, exprs):
        position = positions.index(t.input)
        code = render_expr(expr)
        shared = tuple((s.name, render(s.value).text) for s in lowered.tangent_shared if s.users == (position,))
        text = " ".join([code] + [value for _, value in shared])
        shares.append(TangentView(
            tangent=t.tangent, jvp=index_notation(t.jvp), code=code, shared=shared,
            kernels=tuple(meaning for needle, meaning in KERNELS.items() if needle in text)))
    common = [(s.name, render(s.value).text) for s in lowered.tangent_shared if len(s.users) > 1]
    kept = [name for name in positions if name in reads]
    saved = kept + ([op.output] if uses_output else [])
    arguments = [name if name in kept else "None" for name in positions] + ([op.output] if uses_output else [])
    output_access = f"{naming.tangent(op.output)}[{', '.join(op.output_indices)}]" if op.output_indices \
        else naming.tangent(op.output)
    saving = bool(lowered.plan.saved)
    single = shares[0].code if len(shares) == 1 else ""
    if single and expand:
        single = f"({single}){expand}"
    return dict(
        name=naming.jvp(op.name), single=single,
        signature=", ".join(positions + ([op.output] if uses_output else [])
                            + [naming.tangent(n) for n in differentiable]
                            + [f"{p.name}={p.default!r}" for p in op.params]),
        tangents=", ".join(naming.tangent(n) for n in differentiable),
        output=naming.tangent(op.output), output_access=output_access, uses_output=uses_output,
        sizes=sizes, common=common, shares=shares,
        zeros=f"torch.zeros_like({op.output})" if uses_output else f"{anchor}.new_zeros({shape})",
        expand=(f".expand_as({op.output})" if uses_output else f".expand({shape})") if expand else "",
        # the Function's jvp gets one tangent per argument of forward: None for integer inputs and params
        parameters=", ".join([naming.tangent(t.name) for t in op.inputs] + (["*_"] if op.params else [])),
        saved=saved, unpack_saved=_unpack(saved) if saved else "",
        # the Function's forward returns the values the backward reuses after the result, as outputs
        # without a tangent
        save_for_forward=", ".join(("output[0]" if saving else "output") if n == op.output else n for n in saved),
        returns=", ".join([naming.tangent(op.output)] + ["None"] * len(lowered.plan.saved)) if saving else "",
        call=", ".join(arguments + [naming.tangent(n) for n in differentiable] + [f"ctx.{p.name}" for p in op.params]),
    )


def _autocast(derivation: Derivation, custom_op_name: str) -> dict:
    """The autocast block: each device type's policy, the dtype each policy casts to, the names."""
    policies = autocast_policies(derivation)
    tensors = [t.name for t in derivation.op.inputs]
    namespace, registered = custom_op_name.split("::")
    return dict(policies=policies, dtypes=[(p, POLICY_DTYPES[p]) for p in dict.fromkeys(r.policy for r in policies)],
                device_input=tensors[0], tensors=_unpack(tensors), tensor_args=", ".join(tensors),
                namespace=namespace, op_name=registered,
                dispatch_keys=_tuple([f'"Autocast{r.device.upper()}"' for r in policies]))


def _cheap_first(gradients: list[GradientView], exprs: list[LoweredExpr]) -> list[GradientView]:
    """The order the backward computes gradients in: those without a matrix product or einsum first.
    A bias gradient (grad_y.sum(0)) then reads grad_y while it is still in cache, instead of after
    the matrix products have streamed their operands through it (3x faster at 4000 x 200 float32)."""
    def contracts(expr: LoweredExpr) -> bool:
        return any(isinstance(node, (MatMul, Einsum)) for term in expr.terms for node in walk(term))
    return [view for view, _ in sorted(zip(gradients, exprs), key=lambda pair: contracts(pair[1]))]


def _shared_blocks(lowered: LoweredOp) -> list[tuple[str, list[tuple[str, str]]]]:
    """Values several gradients use, grouped under the condition that any of them is needed."""
    blocks: list[tuple[str, list[tuple[str, str]]]] = []
    for shared in lowered.shared:
        if len(shared.users) < 2:
            continue
        condition = " or ".join(f"needs_input_grad[{u}]" for u in shared.users)
        if not blocks or blocks[-1][0] != condition:
            blocks.append((condition, []))
        blocks[-1][1].append((shared.name, render(shared.value).text))
    return blocks


def _unpack(names: list[str]) -> str:
    """Left-hand side that unpacks a sequence: `a, b` or `(a,)`."""
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)


def _tuple(items: list[str] | tuple[str, ...]) -> str:
    """Python tuple syntax: (a, b), (a,) or ()."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
