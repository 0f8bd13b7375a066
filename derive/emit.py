"""Stage 5c, lowered ops -> module text: render each op through the Jinja2 templates, from its signature.

Python decides every piece of math and code; the templates only lay it out.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from functools import cache, lru_cache

import jinja2
import sympy

from . import functions, naming
from .contracts import (POLICY_DTYPES, Declared, all_hold, autocast_policies, guarded_blocks, range_checks,
                        shape_checks)
from .derivation import Derivation
from .layers import layer_context
from .optional import condition, variant_name
from .model import size_symbol
from .lower import Einsum, Leaf, LoweredExpr, LoweredOp, MatMul, covered, tangent_reads, walk
from .kernels import kernel_of
from .printing import (fused_calls, index_notation, joint_calls, kernel_comments, output_shape, python_tuple, render, render_expr,
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


Variant = tuple[tuple[str, ...], Derivation, LoweredOp, Signature]   # (absent inputs, the op without them)


def render_module(derivation: Derivation, lowered: LoweredOp, source: str, command: str,
                  namespace: str = "derive", signature: Signature | None = None,
                  variants: tuple[Variant, ...] = (), style: naming.Style | None = None) -> str:
    """The module of one op in one style; `signature` is the backward's (computed here when not given);
    `variants` are the op with its optional inputs None (optional.py), whose functions the module holds too;
    `style` is the module's, which prints `lowered` (by default the style of that name)."""
    context = _module_context(derivation, lowered, source, command, namespace, signature, variants, style)
    return environment().get_template("module.py.jinja").render(context)


def _module_context(derivation: Derivation, lowered: LoweredOp, source: str, command: str, namespace: str,
                    signature: Signature | None, variants: tuple[Variant, ...] = (),
                    style: naming.Style | None = None) -> dict:
    op = derivation.op
    style = style or naming.MODULE_STYLES[lowered.style]
    assert style.lowering == lowered.style, (style, lowered.style)
    signature = signature or backward_signature(derivation, lowered)
    forward = _forward_context(derivation, lowered, signature)
    backward = _backward_context(derivation, lowered, signature)
    saving = _saving_context(derivation, lowered)
    views = [(absent, _module_context(*variant, source, command, namespace, variant_signature, (), style))
             for absent, *variant, variant_signature in variants]
    # the Function keeps the optional inputs for its jvp too, and what the variants' jvps read
    keep = set(op.optional_names) | {name for _, view in views for name in view["jvp"]["saved"]}
    jvp = _jvp_context(derivation, lowered, frozenset(keep))
    function = _function_context(derivation, lowered, signature, jvp, namespace, style.name)
    code = [forward["code"]] + [g.code for g in backward["gradients"]] + [text for _, text in forward["shared"]] \
        + [text for _, block in backward["shared"] for _, text, _ in block] \
        + ([text for _, text, _ in saving["lines"]] if saving else [])
    params = [f"{p.name}={p.default!r}" for p in op.params]
    layer = layer_context(op.layer, op.inputs, op.params, op.name) if op.layer else None
    context = dict(
        contract=_contract(derivation, lowered, tuple(t for t in signature.kept + signature.shaped
                                                      if t not in op.optional_names)),
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
        uses_math=any(uses_math(text) for text in code) or any(view["uses_math"] for _, view in views)
        or bool(layer and layer["uses_math"]),
        function=function, saving=saving, forward=forward, jvp=jvp, backward=backward, style=style,
        variant_only=False, optional=bool(op.optional), optional_doc=_optional_doc(op),
        variants=[_variant_view(op, absent, view, (jvp, signature.uses_output)) for absent, view in views],
        layer=layer, backward_arguments=list(signature.arguments),
    )
    # one table for the module: a variant's arguments carry the indices the op's do (its batch too, unless the
    # absent input was the one that declared it)
    context["batch_dims"] = dict(context["contract"]["batch_dims"] + tuple(
        item for _, view in views if view["op"].batch_index == op.batch_index
        for item in view["contract"]["batch_dims"]))
    batch = op.batch_index
    context["batch_doc"] = "the `...` dims" if batch == naming.BATCH else f"index {batch}" if batch else "none"
    return context


def _optional_doc(op) -> str:
    """The module docstring's note on the optional inputs: what None stands for."""
    if not op.optional:
        return ""
    values = ", ".join(f"{name} = {value:g}" for name, value in op.optional)
    names = " and ".join(name for name, _ in op.optional)
    return docstring_safe(textwrap.fill(f"{names} may be None, which stands for {values}: a call with None goes "
                                        f"to the functions *_without_* below, derived from the equation with "
                                        f"that value in its place.", width=100))


def _variant_view(op, absent: tuple[str, ...], view: dict, context_of_main: tuple) -> dict:
    """A variant's functions, renamed private, and the calls the op's own entry points hand None inputs to."""
    jvp, uses_output = context_of_main
    variant = view["op"]
    names = {key: variant_name(view[key]["name"], absent) for key in ("forward", "backward", "jvp")}
    if view["saving"]:
        names["saving"] = variant_name(view["saving"]["name"], absent)
    for key, name in names.items():
        view[key] = dict(view[key], name=name)
    view["contract"] = dict(view["contract"], forward_call="", backward_call="")
    view["variant_only"] = True
    text = environment().get_template("module.py.jinja").render(view)
    params = [p.name for p in op.params]
    inputs = [t.name for t in variant.inputs]
    positions = [t.name for t in op.inputs]
    forward = names["saving"] if view["saving"] else names["forward"]
    differentiable = [t.name for t in variant.inputs if t.differentiable]
    flags = python_tuple([f"needs_input_grad[{positions.index(t)}]" for t in inputs])
    jvp_arguments = inputs + ([variant.output] if view["jvp"]["uses_output"] else []) \
        + [naming.tangent(t) for t in differentiable] + params
    # the variant's gradients may reuse its result where the op's do not: the entry point computes it
    result = f"{variant.output} = {names['forward']}({', '.join(inputs + params)})"
    return dict(
        condition=condition(absent), text=text.strip("\n"),
        backward_result=result if view["uses_output"] and not uses_output else "",
        jvp_result=result if view["jvp"]["uses_output"] and not jvp["uses_output"] else "",
        forward_call=f"{forward}({', '.join(inputs + params)})",
        backward_callee=names["backward"],
        backward_arguments=", ".join(view["backward_arguments"] + params + [f"needs_input_grad={flags}"]),
        backward_unpack=_unpack([naming.grad(t.name) if t.differentiable else "_" for t in variant.inputs]),
        backward_returns=python_tuple([naming.grad(t.name) if t.differentiable and t.name not in absent else "None"
                                       for t in op.inputs]),
        jvp_call=f"{names['jvp']}({', '.join(jvp_arguments)})",
    )


def _access(name: str, indices: tuple[str, ...]) -> str:
    """`y[n, m]` as the docstrings write a tensor, `loss` for a 0-d one."""
    return f"{name}[{', '.join(indices)}]" if indices else name


# The parts of a module that depend on the lowering alone, not on the style that prints it: the contraction and
# fused modules of an op share one computation (the arguments are frozen records, hashed by value).
_per_lowering = lru_cache(maxsize=64)


@_per_lowering
def _forward_context(derivation: Derivation, lowered: LoweredOp, signature: Signature) -> dict:
    op = derivation.op
    code = render_expr(lowered.forward)
    if code in {t.name for t in op.inputs} or _reads_an_input(lowered.forward):
        # the input itself or a view of it (y = x, a transpose, a diagonal): neither an autograd.Function nor a
        # custom op may return an input or a view of one
        code = f"{code}.clone()"
    return dict(name=naming.forward(op.name), code=code, sizes=list(signature.forward_sizes),
                shared=[(s.name, render(s.value).text) for s in lowered.forward_shared])


def _reads_an_input(expr) -> bool:
    """Whether an expression is one read of a tensor at index positions, y[i, j] = x[j, i], y[i] = a[i, i] or
    y[n, t] = x[n, t + 1]: its code is the tensor or a view of it (a gather, x[n, idx[n, j]], makes a new one)."""
    if len(expr.terms) != 1 or not isinstance(expr.terms[0], Leaf) or expr.plan.scale != 1:
        return False
    access = expr.terms[0].expr
    return isinstance(access, sympy.Indexed) and not any(i.atoms(sympy.Indexed) for i in access.indices)


@_per_lowering
def _saving_context(derivation: Derivation, lowered: LoweredOp) -> dict | None:
    """`<op>_forward_saving`, when the forward hands values to the backward; else None."""
    op = derivation.op
    values = [v.name for v in lowered.plan.saved]
    if not values:
        return None
    lines = [(v.name, render(node).text, index_notation(v.expr)) for v, node in zip(lowered.plan.saved, lowered.saved)]
    return dict(name=naming.forward_saving(op.name), names=values, returns=", ".join([op.output] + values),
                lines=lines, native=_native_forward(derivation, lowered, values))


def _native_forward(derivation: Derivation, lowered: LoweredOp, values: list[str]) -> dict | None:
    """The forward as one native call returning the result and the saved values (kernels.NativeForward), in the
    contraction style: the call, the names it is unpacked into ("" when returned as it is), what is returned."""
    native = lowered.plan.derivation.native_forward
    if native is None or lowered.style == "broadcast":
        return None
    call = native.call(lambda expr: render(Leaf(expr, ())).text)
    if not native.view and not native.output_view:
        return dict(call=call, targets="", returns=call, comment=native.comment)
    return dict(call=call, targets=", ".join([derivation.op.output] + values), comment=native.comment,
                returns=", ".join([derivation.op.output + native.output_view] + [name + native.view for name in values]))


@_per_lowering
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
    joint, joined = [], set()
    for call in joint_calls(list(lowered.gradients), [g.position for g in gradients]):
        members = [gradients[k] for k in call.gradients]
        targets = {output: view.target for output, view in zip(call.outputs, members)}
        joint.append(dict(condition=" or ".join(f"needs_input_grad[{view.position}]" for view in members),
                          comments=call.comments, shared=[s for view in members for s in view.shared],
                          targets=", ".join(targets.get(k, "_") for k in range(max(call.outputs) + 1)),
                          views=[(view.position, view.target, view.target + suffix)
                                 for view, suffix in zip(members, call.views) if suffix],
                          call=call.call if max(call.outputs) == 2 else f"{call.call}[:{max(call.outputs) + 1}]"))
        joined |= set(call.gradients)
    computed = [view for view in _cheap_first(gradients, list(lowered.gradients))
                if gradients.index(view) not in joined]
    fallback = None
    if lowered.fallback is not None:
        fallback = _backward_context(derivation, lowered.fallback, backward_signature(derivation, lowered.fallback))
        names = sorted({kernel_of(call).name for call, _ in fused_calls(list(lowered.gradients))
                        if not kernel_of(call).differentiable})
        fallback = dict(fallback, sizes=[s for s in fallback["sizes"] if s not in signature.sizes],
                        kernels=" and ".join(names) + (" have" if len(names) > 1 else " has"))
    return dict(name=naming.backward(op.name), grad_output=signature.grad_output, sizes=list(signature.sizes),
                none_line=" = ".join(outputs) + " = None", joint=joint, fallback=fallback,
                shared=_shared_blocks(signature, lowered), gradients=gradients, returns=python_tuple(returns),
                computed=computed)


def _function_context(derivation: Derivation, lowered: LoweredOp, signature: Signature, jvp: dict,
                      namespace: str, style: str) -> dict:
    """The autograd.Function and the custom op: what they save, unpack and pass on."""
    op = derivation.op
    tensor_args = [t.name for t in op.inputs]
    params = [p.name for p in op.params]
    saved, values = list(signature.saved), list(signature.values)
    output = [op.output] if signature.uses_output else []
    recomputed = any(v.recompute and v.adjoint is None for v in lowered.plan.saved)
    adjoints = [(v.name, naming.grad(v.name), v.adjoint, tensor_args.index(v.adjoint.input))
                for v in lowered.plan.saved if v.adjoint is not None]
    # the custom op returns the result alone: its backward computes every value again in a double backward
    op_saved = tensor_args + output + values if adjoints else saved
    return dict(
        adjoints=adjoints,
        non_differentiable=", ".join(v.name for v in lowered.plan.saved if v.adjoint is None),
        backward_grads=", ".join([signature.grad_output] + [naming.grad(v.name) if v.adjoint else "_"
                                                            for v in lowered.plan.saved]),
        # what the stand-in of an input whose shape alone is read is made from: a tensor the backward surely has
        stand_in_from=values[0] if adjoints else signature.grad_output,
        op_saved=", ".join("output" if name == op.output else name for name in op_saved),
        op_unpack_saved=_unpack(op_saved),
        op_unpack_recomputed=_unpack(["_"] + [v.name if v.recompute else "_" for v in lowered.plan.saved]),
        op_backward_call=", ".join([signature.grad_output] + tensor_args + output + values
                                   + [f"ctx.{p}" for p in params]),
        cls=naming.function_class(op.name),
        custom_op=naming.custom_op(op.name),
        custom_op_name=naming.custom_op_name(namespace, op.name, style),
        spec_digest=op.digest,
        apply_name=op.name,
        forward_args=", ".join(tensor_args + params),
        typed_args=", ".join([f"{t}: torch.Tensor | None" if t in op.optional_names else f"{t}: torch.Tensor"
                              for t in tensor_args]
                             + [f"{p.name}: float = {p.default!r}" for p in op.params]),
        unpack_inputs=_unpack([t if t in saved or t in signature.shaped or t in jvp["saved"] else "_"
                               for t in tensor_args] + params),
        # (input, ctx attribute, whether it may be None: then the attribute is None where the input is)
        shaped=[(t, naming.shape_of(t), t in op.optional_names) for t in signature.shaped],
        unpack_values=_unpack(["_"] + values) if values else "",
        unpack_all=_unpack(tensor_args + params),
        unpack_recomputed=_unpack(["_"] + [v.name if v.recompute else "_" for v in lowered.plan.saved])
        if recomputed else "",
        recompute_args=", ".join(tensor_args + [f"ctx.{p}" for p in params]),
        saved=", ".join("output" if name == op.output else name for name in saved),
        saved_names=", ".join(saved),
        unpack_saved=_unpack(saved) if saved else "",
        params=params,
        backward_call=", ".join([signature.grad_output] + [t if t in saved or t in signature.shaped else "None"
                                                           for t in tensor_args]
                                + output + values + [f"ctx.{p}" for p in params]),
        inputs_count=len(op.inputs),
    )


@_per_lowering
def _contract(derivation: Derivation, lowered: LoweredOp, kept: tuple[str, ...]) -> dict:
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
    # a saved value is compared last: a wrong grad_<out> is named as such, not as a saved value that disagrees with it
    saved = {v.name for v in lowered.plan.saved}
    checks = [c for c in checks if c.pair[:1] and c.pair[0] not in saved or not c.pair] + \
        [c for c in checks if c.pair[:1] and c.pair[0] in saved]
    inputs = ", ".join(t.name for t in op.inputs)
    batch = op.batch_index
    return dict(
        name=naming.check_shapes(op.name),
        # the fused style's dynamic dims: those of the op's batch (OpSpec.batch_index) in every tensor argument
        batch_dims=tuple((t.name, t.dims_of(batch)) for t in declared + extras if batch and t.dims_of(batch)),
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


@_per_lowering
def _jvp_context(derivation: Derivation, lowered: LoweredOp, keep: set[str] = frozenset()) -> dict:
    """What the template needs for `<op>_jvp` and the Function's `jvp`; the Function also keeps `keep`."""
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
    adjoints = {v.name: v.adjoint for v in lowered.plan.saved if v.adjoint is not None}
    reads |= {a.input for a in adjoints.values()}     # the values' tangents read their input
    kept = [name for name in positions if name in reads or name in keep]
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
        returns=", ".join([naming.tangent(op.output)] + [_value_tangent(adjoints.get(v.name)) for v in lowered.plan.saved])
        if saving else "",
        call=", ".join(arguments + [naming.tangent(n) for n in differentiable] + [f"ctx.{p.name}" for p in op.params]),
    )


def _value_tangent(adjoint) -> str:
    """A saved value's tangent as the Function's jvp returns it: None for a non-differentiable output."""
    if adjoint is None:
        return "None"
    tangent = naming.tangent(adjoint.input)
    return f"({adjoint.tangent} if {tangent} is not None else torch.zeros_like({adjoint.input}))"


def _autocast(derivation: Derivation, custom_op_name: str) -> dict:
    """The autocast block: each device type's policy, the dtype each policy casts to, the names."""
    policies = autocast_policies(derivation)
    tensors = [t.name for t in derivation.op.inputs]
    namespace, registered = custom_op_name.split("::")
    required = [t for t in tensors if t not in derivation.op.optional_names]
    dtypes = [(p, POLICY_DTYPES[p]) for p in dict.fromkeys(r.policy for r in policies)]
    if derivation.op.optional:    # an absent optional input is None: it has no dtype
        dtypes = [(p, text.replace("if t.is_floating_point()", "if t is not None and t.is_floating_point()"))
                  for p, text in dtypes]
    return dict(policies=policies, dtypes=dtypes,
                device_input=required[0], tensors=_unpack(tensors), tensor_args=", ".join(tensors),
                namespace=namespace, op_name=registered,
                dispatch_keys=python_tuple([f'"Autocast{r.device.upper()}"' for r in policies]))


def _cheap_first(gradients: list[GradientView], exprs: list[LoweredExpr]) -> list[GradientView]:
    """The order the backward computes gradients in: those without a matrix product or einsum first.
    A bias gradient (grad_y.sum(0)) then reads grad_y while it is still in cache, instead of after
    the matrix products have streamed their operands through it (3x faster at 4000 x 200 float32)."""
    def contracts(expr: LoweredExpr) -> bool:
        return any(isinstance(node, (MatMul, Einsum)) for term in expr.terms for node in walk(term))
    return [view for view, _ in sorted(zip(gradients, exprs), key=lambda pair: contracts(pair[1]))]


def _shared_blocks(signature: Signature, lowered: LoweredOp) -> list[tuple[str, list[tuple[str, str, tuple]]]]:
    """Values several gradients use, grouped under the condition that any of them is needed; each with what
    the fused kernel calls in it compute."""
    blocks: list[tuple[str, list[tuple[str, str, tuple]]]] = []
    for shared, value in zip(signature.shared, lowered.shared):
        if len(shared.users) < 2:
            continue
        condition = " or ".join(f"needs_input_grad[{u}]" for u in shared.users)
        if not blocks or blocks[-1][0] != condition:
            blocks.append((condition, []))
        blocks[-1][1].append((shared.name, shared.code, kernel_comments([], (value.value,))))
    return blocks


def _unpack(names: list[str]) -> str:
    """Left-hand side that unpacks a sequence: `a, b` or `(a,)`."""
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)
