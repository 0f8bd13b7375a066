"""Stage 5c, lowered ops -> module text: render each op through the Jinja2 templates, from its signature.

Python decides every piece of math and code; the templates only lay it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import jinja2
import sympy

from . import functions, naming
from .contracts import (POLICY_DTYPES, Declared, all_hold, autocast_policies, guarded_blocks, range_checks,
                        shape_checks)
from .derivation import Derivation
from .model import size_symbol
from .lower import Einsum, Leaf, LoweredExpr, LoweredOp, MatMul, covered, tangent_reads, walk
from .printing import (index_notation, kernel_comments, output_shape, python_tuple, render, render_expr,
                       size_bindings, size_readers, sizes_used, uses_math)
from .signature import Signature, backward_signature
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
    """User text made safe inside a one-line comment."""
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
    kernels: tuple[str, ...] = ()         # what each fused kernel call in the code computes, from its record


def render_module(derivation: Derivation, lowered: LoweredOp, source: str, command: str,
                  namespace: str = "derive", signature: Signature | None = None,
                  style: naming.Style | None = None) -> str:
    """The module of one op in one style; `signature` is the backward's (computed here when not given);
    `style` is the module's, which prints `lowered` (by default the style of that name)."""
    op = derivation.op
    style = style or naming.MODULE_STYLES[lowered.style]
    assert style.lowering == lowered.style, (style, lowered.style)
    signature = signature or backward_signature(derivation, lowered)
    forward = _forward_context(derivation, lowered, signature)
    backward = _backward_context(derivation, lowered, signature)
    saving = _saving_context(derivation, lowered)
    jvp = _jvp_context(derivation, lowered)
    function = _function_context(derivation, lowered, signature, jvp, namespace, style.name)
    code = [forward["code"]] + [g.code for g in backward["gradients"]] + [text for _, text in forward["shared"]] \
        + [text for _, block in backward["shared"] for _, text in block] \
        + ([text for _, text, _ in saving["lines"]] if saving else [])
    params = [f"{p.name}={p.default!r}" for p in op.params]
    context = dict(
        contract=_contract(derivation, lowered, list(signature.kept)),
        autocast=_autocast(derivation, function["custom_op_name"]),
        source=comment_safe(source),
        command=comment_safe(command),
        op=op,
        doc=docstring_safe(op.doc),
        equation=docstring_safe(op.equation),
        signature=", ".join([t.name for t in op.inputs] + params),
        backward_signature=", ".join(list(signature.arguments) + params),
        input_list=", ".join(t.name for t in op.inputs),
        needs_default=python_tuple(["True"] * len(op.inputs)),
        output_access=_access(op.output, op.output_indices),
        uses_output=signature.uses_output,
        uses_math=any(uses_math(text) for text in code),
        function=function, saving=saving, forward=forward, jvp=jvp, backward=backward, style=style,
    )
    return environment().get_template("module.py.jinja").render(context)


def _access(name: str, indices: tuple[str, ...]) -> str:
    """`y[n, m]` as the docstrings write a tensor, `loss` for a 0-d one."""
    return f"{name}[{', '.join(indices)}]" if indices else name


def _forward_context(derivation: Derivation, lowered: LoweredOp, signature: Signature) -> dict:
    op = derivation.op
    code = render_expr(lowered.forward)
    if code in {t.name for t in op.inputs}:
        # an autograd.Function may not return an input as-is (its ctx could not tell them apart): a view
        code = f"{code}.view_as({code})"
    elif _reads_a_diagonal(lowered.forward):
        # a diagonal is a view of its input, which a custom op may not return
        code = f"{code}.clone()"
    return dict(name=naming.forward(op.name), code=code, sizes=list(signature.forward_sizes),
                shared=[(s.name, render(s.value).text) for s in lowered.forward_shared])


def _reads_a_diagonal(expr) -> bool:
    """Whether an expression is one access that repeats an index, y[i] = a[i, i]: its code is a view."""
    if len(expr.terms) != 1 or not isinstance(expr.terms[0], Leaf) or expr.plan.scale != 1:
        return False
    access = expr.terms[0].expr
    return isinstance(access, sympy.Indexed) and len(set(access.indices)) < len(access.indices)


def _saving_context(derivation: Derivation, lowered: LoweredOp) -> dict | None:
    """`<op>_forward_saving`, when the forward hands values to the backward; else None."""
    op = derivation.op
    values = [v.name for v in lowered.plan.saved]
    if not values:
        return None
    lines = [(v.name, render(Leaf(v.expr, v.indices)).text, index_notation(v.expr)) for v in lowered.plan.saved]
    return dict(name=naming.forward_saving(op.name), names=values, returns=", ".join([op.output] + values),
                lines=lines)


def _backward_context(derivation: Derivation, lowered: LoweredOp, signature: Signature) -> dict:
    op = derivation.op
    gradients = []
    for g, line, expr in zip(derivation.gradients, signature.gradients, lowered.gradients):
        own = tuple(s.value for s in lowered.shared if s.users == (line.position,))
        gradients.append(GradientView(
            target=line.target, position=line.position,
            shape=f"shape of {g.input}: {python_tuple(g.indices)}",
            wrt=index_notation(g.wrt), partial=index_notation(g.partial),
            access=_access(naming.grad(g.input), g.indices), vjp=index_notation(g.vjp), code=line.code,
            shared=tuple((s.name, s.code) for s in signature.shared if s.users == (line.position,)),
            kernels=kernel_comments([expr], own)))
    outputs = [naming.grad(t.name) for t in op.inputs if t.differentiable]
    returns = [naming.grad(t.name) if t.differentiable else "None" for t in op.inputs]
    return dict(name=naming.backward(op.name), grad_output=signature.grad_output, sizes=list(signature.sizes),
                none_line=" = ".join(outputs) + " = None",
                shared=_shared_blocks(signature), gradients=gradients, returns=python_tuple(returns),
                computed=_cheap_first(gradients, list(lowered.gradients)))


def _function_context(derivation: Derivation, lowered: LoweredOp, signature: Signature, jvp: dict,
                      namespace: str, style: str) -> dict:
    """The autograd.Function and the custom op: what they save, unpack and pass on."""
    op = derivation.op
    tensor_args = [t.name for t in op.inputs]
    params = [p.name for p in op.params]
    saved, values = list(signature.saved), list(signature.values)
    output = [op.output] if signature.uses_output else []
    recomputed = any(v.recompute for v in lowered.plan.saved)
    return dict(
        cls=naming.function_class(op.name),
        custom_op=naming.custom_op(op.name),
        custom_op_name=naming.custom_op_name(namespace, op.name, style),
        spec_digest=op.digest,
        apply_name=op.name,
        forward_args=", ".join(tensor_args + params),
        typed_args=", ".join([f"{t}: torch.Tensor" for t in tensor_args]
                             + [f"{p.name}: float = {p.default!r}" for p in op.params]),
        unpack_inputs=_unpack([t if t in saved or t in jvp["saved"] else "_" for t in tensor_args] + params),
        unpack_values=_unpack(["_"] + values) if values else "",
        unpack_all=_unpack(tensor_args + params),
        unpack_recomputed=_unpack(["_"] + [v.name if v.recompute else "_" for v in lowered.plan.saved])
        if recomputed else "",
        recompute_args=", ".join(tensor_args + [f"ctx.{p}" for p in params]),
        saved=", ".join("output" if name == op.output else name for name in saved),
        saved_names=", ".join(saved),
        unpack_saved=_unpack(saved) if saved else "",
        params=params,
        backward_call=", ".join([signature.grad_output] + [t if t in saved else "None" for t in tensor_args]
                                + output + values + [f"ctx.{p}" for p in params]),
        inputs_count=len(op.inputs),
    )


def _contract(derivation: Derivation, lowered: LoweredOp, kept: list[str]) -> dict:
    """The shape contract's helper: its signature, the calls the forward and backward make, its checks.
    Inputs the Function does not save reach the backward as None; the backward's own tensors are
    None in the forward."""
    op = derivation.op
    extras = [Declared(derivation.grad_output, op.output_indices, optional=True, role="result")]
    if derivation.uses_output:
        extras.append(Declared(op.output, op.output_indices, optional=True, role="result"))
    extras += [Declared(v.name, v.indices, optional=True, role="saved") for v in lowered.plan.saved]
    declared = [Declared(t.name, t.indices, optional=t.name not in kept, integer=t.integer,
                         mask=t.integer and t.value_range is None) for t in op.inputs]
    reduced = {i.name for e in derivation.forward.atoms(functions._Extremum) for i in e.indices}
    checks = shape_checks(op.name, declared + extras, dict(op.index_sizes), tuple(sorted(reduced)))
    # the result's dims whose size is inferred must have that size
    grad = extras[0]
    inferred = [(sympy.Eq(size_symbol(index), size, evaluate=False),
                 f"{grad.name} has size {{{grad.size(index)}}} at dim {grad.dim(index)} (index {index}) but the size "
                 f"inferred for {index} is {index_notation(size)}")
                for index, size in op.inferred_sizes if index in op.output_indices]
    checks += range_checks(op.name, declared + extras, op.size_checks + tuple(inferred), dict(op.index_sizes))
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
    # a tangent that adds nothing (that of x to sign(x)) has no share
    tangents = [(t, expr) for t, expr in zip(derivation.tangents, lowered.tangents) if expr.terms]
    exprs = [expr for _, expr in tangents]
    batched = [name for name, dims in inputs if naming.BATCH in dims]
    # a share that lacks one of the output's dims, or batch dims that broadcast between inputs,
    # make the sum of the shares narrower than the output
    expand = any(covered(e) != set(e.plan.indices) for e in exprs) or \
        (naming.BATCH in op.output_indices and len(batched) > 1)
    also = () if uses_output else op.output_indices
    sizes = size_bindings(op, exprs, sources, shared_leaves, also=also)
    sized = set(sizes_used(op, exprs, shared_leaves)) | {i if i == naming.BATCH else op.size_of(i) for i in also}
    reads |= {name for i in sized if i != naming.BATCH for name in size_readers(i, sources, op)}
    if naming.BATCH in sized:
        reads |= set(batched)
    if not uses_output:
        reads.add(anchor)
    shape = f"{op.output}.shape" if uses_output else output_shape(op, sources)
    shares = []
    for t, expr in tangents:
        position = positions.index(t.input)
        code = render_expr(expr)
        own = [s for s in lowered.tangent_shared if s.users == (position,)]
        shares.append(TangentView(
            tangent=t.tangent, jvp=index_notation(t.jvp), code=code,
            shared=tuple((s.name, render(s.value).text) for s in own),
            kernels=kernel_comments([expr], tuple(s.value for s in own))))
    common = [(s.name, render(s.value).text) for s in lowered.tangent_shared if len(s.users) > 1]
    kept = [name for name in positions if name in reads]
    saved = kept + ([op.output] if uses_output else [])
    arguments = [name if name in kept else "None" for name in positions] + ([op.output] if uses_output else [])
    output_access = f"{naming.tangent(op.output)}[{', '.join(op.output_indices)}]" if op.output_indices \
        else naming.tangent(op.output)
    saving = bool(lowered.plan.saved)
    expand = (f".expand_as({op.output})" if uses_output else f".expand({shape})") if expand else ""
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
        unused=[t.tangent for t, expr in zip(derivation.tangents, lowered.tangents) if not expr.terms],
        zeros=f"torch.zeros_like({op.output})" if uses_output else f"{anchor}.new_zeros({shape})",
        expand=expand,
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
                dispatch_keys=python_tuple([f'"Autocast{r.device.upper()}"' for r in policies]))


def _cheap_first(gradients: list[GradientView], exprs: list[LoweredExpr]) -> list[GradientView]:
    """The order the backward computes gradients in: those without a matrix product or einsum first.
    A bias gradient (grad_y.sum(0)) then reads grad_y while it is still in cache, instead of after
    the matrix products have streamed their operands through it (3x faster at 4000 x 200 float32)."""
    def contracts(expr: LoweredExpr) -> bool:
        return any(isinstance(node, (MatMul, Einsum)) for term in expr.terms for node in walk(term))
    return [view for view, _ in sorted(zip(gradients, exprs), key=lambda pair: contracts(pair[1]))]


def _shared_blocks(signature: Signature) -> list[tuple[str, list[tuple[str, str]]]]:
    """Values several gradients use, grouped under the condition that any of them is needed."""
    blocks: list[tuple[str, list[tuple[str, str]]]] = []
    for shared in signature.shared:
        if len(shared.users) < 2:
            continue
        condition = " or ".join(f"needs_input_grad[{u}]" for u in shared.users)
        if not blocks or blocks[-1][0] != condition:
            blocks.append((condition, []))
        blocks[-1][1].append((shared.name, shared.code))
    return blocks


def _unpack(names: list[str]) -> str:
    """Left-hand side that unpacks a sequence: `a, b` or `(a,)`."""
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)
