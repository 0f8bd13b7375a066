"""Optional inputs (`optional = { b = 0 }`, derive/optional.py) and layers (`[ops.<op>.layer]`, derive/layers.py).

An optional input that is None stands for its declared value: the generated op with it None must give what it
gives with the input filled with that value (forward, gradients of the others with exact shapes, jvp, gradcheck),
and what torch gives with None where the catalog mirrors a torch function. A catalog layer must be interchangeable
with the torch module it mirrors: the same values from the same seed, and with torch's state_dict loaded, the same
outputs and gradients in float64.
"""

import functools
from pathlib import Path

import pytest
import torch

from conftest import CATALOG, GENERATED, STYLES, first_by_default, generated_module
from derive import optional
from derive.emit import render_module
from derive.pipeline import build_op
from derive.errors import SpecError
from derive.spec import parse_catalog
from derive.testing import built_op, check_optional, load_module, make_inputs, reference

OPTIONAL_OPS = [op.name for op in CATALOG.ops if op.optional]


def test_catalog_declares_optional_biases():
    assert {"linear", "layer_norm", "conv1d"} <= set(OPTIONAL_OPS)
    assert dict(CATALOG.op("layer_norm").optional) == {"b": 0.0}


@pytest.mark.parametrize("name, style", first_by_default([(n, s) for s in STYLES for n in OPTIONAL_OPS],
                                                         len(OPTIONAL_OPS)))
def test_catalog_optional_inputs_stand_for_their_value(name, style):
    op = CATALOG.op(name)
    check_optional(op, generated_module(name, style), sizes={size: 2 for _, size in op.index_sizes})


@pytest.mark.parametrize("name", OPTIONAL_OPS)
def test_catalog_optional_inputs_none_as_torch(name):
    """torch's own function with None (F.linear(x, w.T, None), F.layer_norm(x, s, None, None)) agrees."""
    op = CATALOG.op(name)
    module = generated_module(name)
    inputs = make_inputs(op)
    for absent in optional.absent_sets(op):
        given = [None if t.name in absent else x.requires_grad_(True) for t, x in zip(op.inputs, inputs)]
        leaves = [x for x in given if x is not None]
        got = getattr(module, op.name)(*given)
        want = reference(op)(*given)
        torch.testing.assert_close(got, want)
        grad_y = torch.randn_like(want)
        for mine, theirs in zip(torch.autograd.grad(got, leaves, grad_y), torch.autograd.grad(want, leaves, grad_y)):
            torch.testing.assert_close(mine, theirs)
        backward = getattr(module, f"{op.name}_backward")
        saving = getattr(module, f"{op.name}_forward_saving", None)
        extra = saving(*given)[1:] if saving else ()
        grads = backward(grad_y, *[None if x is None else x.detach() for x in given], *extra)
        assert [g is None for g in grads] == [x is None for x in given]


def test_custom_op_schema_marks_optional_inputs():
    module = generated_module("layer_norm")
    assert "Tensor w, Tensor? b, float eps" in str(module.layer_norm_op._opoverload._schema)


def test_none_branch_is_derived_from_the_substituted_equation():
    """linear's forward without b is x @ w (no addition of zeros), and its gradients read no b."""
    text = (GENERATED / "linear.py").read_text()
    body = text.split("def _linear_forward_without_b(x, w):")[1].split("\n\n\n")[0]
    assert body.split('"""')[2].strip() == "return x @ w"
    backward = text.split("def _linear_backward_without_b(")[1].split("\n\n\n")[0]
    assert " b" not in backward.split('"""')[2]


# --- invented specs: the rule holds where the optional input is inside a nonlinearity -------------------

INVENTED = """
[ops.gated]
inputs = ["x[n, m]", "w[m]", "b[m]", "s[m]"]
equation = "y[n, m] = tanh(x[n, m] * w[m] + b[m]) * s[m]"
reference = "torch.tanh(x * w + b) * s"
optional = { b = 0.5, s = 1 }

[ops.scaled_exp]
inputs = ["x[...]", "t"]
equation = "y[...] = exp(x[...] * t) + x[...]"
reference = "torch.exp(x * t) + x"
optional = { t = -1.5 }

[ops.square_bias]
inputs = ["a[i, i]", "c[i]"]
equation = "y[i] = a[i, i] * c[i] ** 2"
reference = "torch.diagonal(a) * c ** 2"
optional = { c = 2 }
"""


INVENTED_CATALOG = parse_catalog(INVENTED, "invented.toml")


@functools.cache
def invented(name: str, style: str, directory: Path):
    """One invented op, generated in one style (its custom op in a namespace of its own): (op, module)."""
    op = INVENTED_CATALOG.op(name)
    built = build_op(op, (style,))
    variants = tuple((absent, v.derivation, v.lowered[style], v.signatures[style]) for absent, v in built.variants)
    path = directory / f"{name}_{style}.py"
    path.write_text(render_module(built.derivation, built.lowered[style], "invented.toml", "-",
                                  f"derive_layers_test_{style}", built.signatures[style], variants))
    return op, load_module(path)


@pytest.fixture(scope="module")
def invented_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("optional")


# gated first: its optional inputs sit inside tanh, and without s its gradients reuse the result
@pytest.mark.parametrize("name, style", first_by_default([(n, s) for n in ("gated", "scaled_exp", "square_bias")
                                                          for s in STYLES], 1))
def test_invented_optional_inputs(invented_dir, name, style):
    op, module = invented(name, style, invented_dir)
    check_optional(op, module)
    # sizes 1 and 0 (every index of the same size, so that a transposed gradient has the right shape)
    for size in (1, 0):
        check_optional(op, module, sizes={index: size for _, index in op.index_sizes})


def test_invented_gradient_depends_on_the_declared_value(invented_dir):
    """With b None, grad_x is that of tanh(x * w + 0.5): not of tanh(x * w) (a rule that dropped the term)."""
    op, module = invented("gated", "contraction", invented_dir)
    x, w, b, s = make_inputs(op)
    x.requires_grad_(True)
    y = module.gated(x, w, None, None)
    torch.testing.assert_close(y, torch.tanh(x * w + 0.5))
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(torch.tanh(x * w + 0.5).sum(), x)
    torch.testing.assert_close(grad_x, want)
    (dropped,) = torch.autograd.grad(torch.tanh(x * w).sum(), x)
    assert not torch.allclose(grad_x, dropped)


def test_shape_checks_still_apply_to_a_given_optional_input():
    module = generated_module("linear")
    with pytest.raises(RuntimeError, match="linear: b has size 4 at dim 0"):
        module.linear(torch.randn(2, 3), torch.randn(3, 5), torch.randn(4))


@pytest.mark.parametrize("entry, message", [
    ('optional = ["b"]', "'optional' must be a table of input = the value None stands for"),
    ("optional = { z = 0 }", "'optional' names 'z', which is not a floating input"),
    ('optional = { b = "zero" }', "optional input 'b' needs a finite number"),
    ("optional = { x = 0, w = 0, b = 0 }", "every differentiable input is optional"),
    ("optional = { w = 0 }", "no longer depends on 'x'"),
])
def test_optional_errors(entry, message):
    text = f"""[ops.lin]
inputs = ["x[n, k]", "w[k, m]", "b[m]"]
equation = "y[n, m] = sum(x[n, k] * w[k, m], k) + b[m]"
reference = "x @ w + b"
{entry}
"""
    with pytest.raises(SpecError, match=message) as error:
        parse_catalog(text, "bad.toml")
    assert "bad.toml" in str(error.value) and "lin" in str(error.value)


def test_optional_input_with_an_index_of_its_own_is_refused():
    text = """[ops.lin]
inputs = ["x[n]", "b[j]"]
equation = "y[n] = x[n] + sum(b[j], j)"
reference = "x + b.sum()"
optional = { b = 1 }
"""
    with pytest.raises(SpecError, match="optional input 'b' has index 'j', which no other input has"):
        parse_catalog(text, "bad.toml")


# --- layers -------------------------------------------------------------------------------------------

# every catalog layer, with the torch module it mirrors and an input: (derive's arguments, torch's, input)
def _index_input():
    return torch.randint(0, 10, (7,))


MIRRORS = {
    ("linear", "Linear"): [((4, 3), torch.nn.Linear, (4, 3), {}), ((4, 3, False), torch.nn.Linear, (4, 3),
                                                                   {"bias": False})],
    ("layer_norm", "LayerNorm"): [((6,), torch.nn.LayerNorm, (6,), {}),
                                  ((6, 1e-3, False), torch.nn.LayerNorm, (6,), {"eps": 1e-3, "bias": False})],
    ("embedding", "Embedding"): [((10, 4), torch.nn.Embedding, (10, 4), {})],
    ("conv1d", "Conv1d"): [((3, 4, 3), torch.nn.Conv1d, (3, 4, 3), {}),
                           ((3, 4, 3, False), torch.nn.Conv1d, (3, 4, 3), {"bias": False})],
    ("conv2d", "Conv2d"): [((3, 4, 3), torch.nn.Conv2d, (3, 4, 3), {"bias": False})],
}
INPUTS = {"linear": (5, 4), "layer_norm": (2, 3, 6), "conv1d": (2, 3, 8), "conv2d": (2, 3, 6, 7)}
CASES = [(op, cls, *case) for (op, cls), cases in MIRRORS.items() for case in cases]


def test_every_catalog_layer_has_a_mirror():
    assert {(op.name, op.layer.name) for op in CATALOG.ops if op.layer} == set(MIRRORS)


@pytest.mark.parametrize("op_name, cls, ours, theirs, args, kwargs", CASES)
def test_layer_matches_torch_module(op_name, cls, ours, theirs, args, kwargs):
    mine_class = getattr(generated_module(op_name), cls)
    torch.manual_seed(7)
    torch_module = theirs(*args, **kwargs)
    torch.manual_seed(7)
    mine = mine_class(*ours)
    # the same init functions in the same order: the same values from the same seed
    assert list(mine.state_dict()) == list(torch_module.state_dict())
    for key, value in torch_module.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    # torch's trained state loads into derive's module; outputs and gradients agree in float64
    torch_module = torch_module.double()
    with torch.no_grad():
        for parameter in torch_module.parameters():
            parameter.add_(torch.randn_like(parameter))
    mine = mine_class(*ours, dtype=torch.float64)
    mine.load_state_dict(torch_module.state_dict())
    if op_name == "embedding":
        x = _index_input()
    else:
        x = torch.randn(INPUTS[op_name], dtype=torch.float64, requires_grad=True)
    got, want = mine(x), torch_module(x)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    leaves = ([x] if x.is_floating_point() else [])
    mine_grads = torch.autograd.grad(got, leaves + list(mine.parameters()), grad)
    torch_grads = torch.autograd.grad(want, leaves + list(torch_module.parameters()), grad)
    for a, b in zip(mine_grads, torch_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_layer_init_statistics_match_torch():
    """Beyond one seed: the spread of kaiming_uniform and uniform_fan_in over many draws is torch's."""
    module = generated_module("linear")
    torch.manual_seed(0)
    mine = module.Linear(300, 200)
    theirs = torch.nn.Linear(300, 200)
    for a, b in ((mine.weight, theirs.weight), (mine.bias, theirs.bias)):
        assert abs(a.std().item() / b.std().item() - 1) < 0.05
        assert a.abs().max() <= b.abs().max() * 1.01 + 1e-3


def test_layer_argument_sets_the_op_param():
    module = generated_module("layer_norm")
    layer = module.LayerNorm(6, eps=0.5)
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), torch.nn.functional.layer_norm(x, (6,), layer.weight, layer.bias, 0.5))


LAYER_SPEC = """[ops.lin]
inputs = ["x[n, k]", "w[k, m]", "b[m]"]
equation = "y[n, m] = sum(x[n, k] * w[k, m], k) + b[m]"
reference = "x @ w + b"
optional = {{ b = 0 }}

[ops.lin.layer]
name = "Lin"
args = ["i", "o", "bias=True"]
{parameters}
"""


@pytest.mark.parametrize("parameters, message", [
    ('parameters.weight = { input = "w", shape = ["o", "i"], init = "kaiming(a=1)" }',
     "init 'kaiming\\(a=1\\)' is not one of"),
    ('parameters.weight = { input = "w", shape = ["o"], init = "ones" }', "shape must give each of its 2 dims"),
    ('parameters.weight = { input = "w", shape = ["o", "q"], init = "ones" }', "shape must give each of its 2 dims"),
    ('parameters.weight = { input = "w", dims = ["m", "n"], shape = ["o", "i"], init = "ones" }', "dims must order"),
    ('parameters.weight = { input = "w", shape = ["i", "o"], init = "ones", when = "bias" }', "input 'w' is not optional"),
    ('parameters.weight = { input = "z", shape = ["i", "o"], init = "ones" }', "input 'z' is not a differentiable input"),
    ('parameters.weight = { input = "w", shape = ["i", "o"], init = "ones(val=1)" }', "ones takes no arguments"),
    ('parameters.bias = { input = "b", shape = ["o"], init = "uniform_fan_in(weight)" }', "reads a parameter declared before"),
    ('parameters.weight = { input = "w", shape = ["i", "o"], init = "ones" }\n'
     'parameters.bias = { input = "b", shape = ["i"], init = "zeros" }', "index 'm' has size o in one parameter and i"),
    ('parameters.training = { input = "w", shape = ["i", "o"], init = "ones" }', "'training' is a name the module"),
    ('parameters.weight = { input = "w", shape = ["o", "i"], init = "normal(std=sqrt(-1))" }', "sqrt\\(number >= 0\\)"),
    ('parameters.weight = { input = "w", shape = ["o", "i"], init = "normal(std=1e999)" }', "a finite number"),
])
def test_layer_errors(parameters, message):
    with pytest.raises(SpecError, match=message) as error:
        parse_catalog(LAYER_SPEC.format(parameters=parameters), "bad.toml")
    assert str(error.value).startswith("bad.toml:7: op 'lin': layer: ")   # the line of [ops.lin.layer]


@pytest.mark.parametrize("utils", [("test_schema", "test_autograd_registration", "test_faketensor"),
                                   pytest.param(None, marks=pytest.mark.slow)])   # None: every check, compiling
def test_custom_op_with_none_passes_opcheck(utils):
    module = generated_module("linear")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(module.linear_op, (x, w, None), **({"test_utils": utils} if utils else {}))


@pytest.mark.parametrize("name", OPTIONAL_OPS)
def test_autocast_with_none(name):
    """Under CPU autocast the casts skip an absent input (its dtype would be read otherwise), through <op>() and
    the custom op, and the result's dtype is the reference's."""
    op = CATALOG.op(name)
    module = generated_module(name)
    given = [None if t.name in op.optional_names else x for t, x in zip(op.inputs, make_inputs(op, dtype=torch.float32))]
    with torch.autocast("cpu"):
        want = reference(op)(*given)
        for call in (getattr(module, op.name), getattr(module, f"{op.name}_op")):
            got = call(*given)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


PERMUTED = """[ops.mix]
inputs = ["x[n, c, q]", "w[c, q, o]", "s[o]"]
params = { scale = 2.0 }
equation = "y[n, o] = scale * sum(x[n, c, q] * w[c, q, o], c, q) * s[o]"
reference = "scale * torch.einsum('ncq,cqo->no', x, w) * s"
optional = { s = 1 }

[ops.mix.layer]
name = "Mix"
args = ["channels", "outputs", "scale=0.5", "gain=False"]
parameters.weight = { input = "w", dims = ["o", "c", "q"], shape = ["outputs", "channels", 3], init = "xavier_uniform(gain=sqrt(2))" }
parameters.gain = { input = "s", shape = ["outputs"], init = "constant(val=-1.5)", when = "gain" }
"""


@functools.cache
def _mix_module(directory: Path):
    (op,) = parse_catalog(PERMUTED, "mix.toml").ops
    built = build_op(op, ("contraction",))
    variants = tuple((absent, v.derivation, v.lowered["contraction"], v.signatures["contraction"])
                     for absent, v in built.variants)
    path = directory / "mix.py"
    path.write_text(render_module(built.derivation, built.lowered["contraction"], "mix.toml", "-",
                                  "derive_layers_mix", built.signatures["contraction"], variants))
    return load_module(path)


@pytest.mark.parametrize("gain", [True, False])
def test_invented_layer_with_a_permuted_parameter(invented_dir, gain):
    """A parameter stored as (o, c, q) is passed permuted into w[c, q, o]; an integer size; an argument that sets
    the op's param; an absent parameter passed as None to its optional input; inits with keyword arguments."""
    module = _mix_module(invented_dir)
    torch.manual_seed(3)
    layer = module.Mix(4, 5, scale=0.75, gain=gain, dtype=torch.float64)
    torch.manual_seed(3)
    weight = torch.nn.init.xavier_uniform_(torch.empty(5, 4, 3, dtype=torch.float64), gain=2 ** 0.5)
    assert torch.equal(layer.weight, weight)
    assert (layer.gain is not None) == gain and (not gain or torch.equal(layer.gain, torch.full((5,), -1.5,
                                                                                                dtype=torch.float64)))
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    want = 0.75 * torch.einsum("ncq,ocq->no", x, layer.weight) * (layer.gain if gain else 1)
    got = layer(x)
    torch.testing.assert_close(got, want)
    leaves = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves), strict=True):
        torch.testing.assert_close(a, b)


def test_a_variant_that_saves_other_forward_values_is_refused():
    """The op with b None must hand its backward the forward values the op's Function saved (keep_optional)."""
    import dataclasses
    op = CATALOG.op("linear")
    built = built_op(op)     # shared with the rest of the session
    signature = built.signatures["contraction"]
    (_, variant), = built.variants
    other = dataclasses.replace(variant.signatures["contraction"], values=("saved_extra",),
                                arguments=variant.signatures["contraction"].arguments + ("saved_extra",))
    with pytest.raises(SpecError, match="with an optional input None the backward reuses saved_extra"):
        optional.keep_optional(op, signature, [other])
    kept = optional.keep_optional(op, signature, [variant.signatures["contraction"]])
    assert (kept.saved, kept.shaped) == (("x", "w"), ("b",))     # b is read only to tell it from None
