"""Stage 5b, lowered ops -> module text: render each op through the Jinja2 templates.

Python decides every piece of math and code; the templates only lay it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from . import naming
from .derivation import Derivation
from .lower import LoweredOp
from .printing import index_notation, render, render_expr, size_bindings



def templates_dir() -> Path:
    shipped = Path(__file__).parent / "templates"     # inside an installed wheel
    if shipped.is_dir():
        return shipped
    return Path(__file__).parent.parent / "templates"  # source checkout or editable install


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


def render_module(derivation: Derivation, lowered: LoweredOp, source: str, command: str) -> str:
    op = derivation.op
    forward_code = render_expr(lowered.forward)
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
    output_access = f"{op.output}[{', '.join(op.output_indices)}]" if op.output_indices else op.output
    context = dict(
        source=comment_safe(source),
        command=comment_safe(command),
        op=op,
        doc=docstring_safe(op.doc),
        equation=docstring_safe(op.equation),
        signature=", ".join([t.name for t in op.inputs] + params),
        backward_signature=", ".join([derivation.grad_output] + [t.name for t in op.inputs]
                                     + ([op.output] if derivation.uses_output else []) + params),
        input_list=", ".join(t.name for t in op.inputs),
        needs_default=_tuple(["True"] * len(op.inputs)),
        output_access=output_access,
        uses_output=derivation.uses_output,
        forward=dict(name=naming.forward(op.name), code=forward_code,
                     sizes=size_bindings(op, [lowered.forward])),
        backward=dict(name=naming.backward(op.name), grad_output=derivation.grad_output,
                      sizes=size_bindings(op, list(lowered.gradients)),
                      none_line=" = ".join(outputs) + " = None",
                      shared=_shared_blocks(lowered), gradients=gradients, returns=_tuple(returns)),
    )
    return environment().get_template("module.py.jinja").render(context)


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


def _tuple(items: list[str] | tuple[str, ...]) -> str:
    """Python tuple syntax: (a, b), (a,) or ()."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
