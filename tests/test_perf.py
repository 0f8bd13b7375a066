"""Issue 14, item 2, what is left: a forward value that costs a contraction or a reduction over a function to
recompute is saved by the forward (derive/saving.py, `save_reduced_values`), so attention's backward reads P
instead of computing softmax(q @ k.mT * s) again; and the saved values the Function returns beside its result
get no gradient of zeros in the backward (no full-size zeros for P)."""

import ast
import textwrap

import pytest
import torch

from derive import bench
from derive.emit import render_module
from derive.pipeline import build_op
from derive.spec import parse_catalog
from derive.testing import check_gradients, check_tangents, gradcheck_op, load_module, make_inputs, op_saved_bytes

INVENTED = """
[ops.attention]
inputs = ["q[b, t, d]", "k[b, s, d]", "v[b, s, e]"]
equation = "o[b, t, e] = sum(softmax(sum(q[b, t, d] * k[b, s, d], d) / sqrt(size(d)), s) * v[b, s, e], s)"
reference = "torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v"
saving = "{policy}"

[ops.hidden_tanh]
inputs = ["x[n, k]", "w[k, m]", "u[m]"]
equation = "y[n] = sum(tanh(sum(x[n, k] * w[k, m], k)) * u[m], m)"
reference = "torch.tanh(x @ w) @ u"
saving = "{policy}"

[ops.scaled_scores]
inputs = ["q[i, d]", "k[j, d]"]
equation = "y[i, j] = 2 * softmax(sum(q[i, d] * k[j, d], d), j)"
reference = "2 * torch.softmax(q @ k.T, -1)"
saving = "{policy}"
"""

# what each op saves with saving = "auto": P, the hidden activations, nothing beside the result (the whole
# forward is twice the value: the output is no second copy of it)
SAVED = {"attention": "saved_softmax", "hidden_tanh": "saved_tanh", "scaled_scores": None}
SIZES = [{"b": 2, "t": 3, "s": 4, "d": 5, "e": 3, "n": 3, "k": 4, "m": 5, "i": 3, "j": 4},
         dict.fromkeys("btsdenkmij", 3), dict.fromkeys("btsdenkmij", 1),
         {"b": 2, "t": 0, "s": 3, "d": 2, "e": 2, "n": 0, "k": 2, "m": 3, "i": 0, "j": 2}]


def _module(tmp_path, op_name: str, policy: str = "auto"):
    op = parse_catalog(textwrap.dedent(INVENTED.format(policy=policy)), "perf.toml").op(op_name)
    built = build_op(op, ("contraction",))
    text = render_module(built.derivation, built.lowered["contraction"], "perf.toml", "derive generate",
                         namespace=f"test_perf_{op_name}_{policy}")
    path = tmp_path / f"{op_name}_{policy}.py"
    path.write_text(text)
    return op, load_module(path), text


def _function_body(text: str, name: str) -> str:
    (function,) = [node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == name]
    return ast.unparse(function)


def test_the_hidden_activations_are_saved(tmp_path):
    """The default run's share of the test below: tanh(x @ w) is saved by the forward, read by the backward,
    and the gradients are autograd's."""
    op, module, text = _module(tmp_path, "hidden_tanh")
    backward = _function_body(text, "hidden_tanh_backward")
    assert "saved_tanh" in backward and "torch.tanh" not in backward
    check_gradients(op, module)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", SAVED)
def test_a_value_costly_to_recompute_is_saved_by_the_forward(tmp_path, op_name):
    """The forward computes the value once and the backward reads it, computing no softmax or tanh of its own;
    gradients, tangents and gradcheck are autograd's at sizes equal, 1 and 0; saved bytes <= autograd's."""
    op, module, text = _module(tmp_path, op_name)
    backward = _function_body(text, f"{op_name}_backward")
    saved = SAVED[op_name]
    if saved is None:
        assert "_forward_saving" not in text
    else:
        assert f"def {op_name}_forward_saving" in text and saved in backward
        assert "torch.softmax" not in backward and "torch.tanh" not in backward
        # the contraction inside the function is a matrix product, not a broadcast product summed
        assert "@" in _function_body(text, f"{op_name}_forward_saving")
    for sizes in SIZES:
        check_gradients(op, module, sizes={k: v for k, v in sizes.items() if k in dict(op.index_sizes)})
    gradcheck_op(op, module)
    check_tangents(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, dtype=torch.float64)]
    # the Function itself, with an undefined gradient reaching it too (gradcheck's check_undefined_grad)
    assert torch.autograd.gradcheck(getattr(module, op_name), inputs)
    assert torch.autograd.gradgradcheck(getattr(module, op_name), inputs)
    generated_bytes, autograd_bytes = op_saved_bytes(op, module, make_inputs(op, dtype=torch.float32))
    assert generated_bytes <= autograd_bytes


@pytest.mark.slow
def test_saving_recompute_keeps_the_inputs_alone(tmp_path):
    """The `saving` knob: "recompute" saves nothing beside the inputs, and the backward computes P again."""
    op, module, text = _module(tmp_path, "attention", "recompute")
    assert "_forward_saving" not in text
    assert "torch.softmax" in _function_body(text, "attention_backward")
    check_gradients(op, module)


def test_attention_peaks_at_most_where_autograd_does(tmp_path):
    """One training step of the saved-P attention allocates at most autograd's peak: P is computed once, and
    the backward is handed no gradient of zeros for it (set_materialize_grads(False))."""
    op, module, _ = _module(tmp_path, "attention")
    sizes = {"b": 2, "t": 64, "s": 64, "d": 8, "e": 8}
    leaves = [t.requires_grad_() for t in make_inputs(op, sizes, torch.float32)]
    grad_output = torch.randn(2, 64, 8)

    def step(forward):
        return lambda: torch.autograd.grad(forward(*leaves), leaves, grad_output)

    reference = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v  # noqa: E731
    assert bench.peak_bytes(step(module.attention)) <= bench.peak_bytes(step(reference))


NORMALIZATIONS = """
[ops.channel_norm]
inputs = ["x[n, c, l]", "w[c]", "b[c]"]
params = { eps = 1e-5 }
equation = "y[n, c, l] = (x[n, c, l] - mean(x[n, c, l], n, l)) / sqrt(mean((x[n, c, l] - mean(x[n, c, l], n, l))**2, n, l) + eps) * w[c] + b[c]"
reference = "torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=eps)"

[ops.feature_norm]
inputs = ["x[n, c]"]
params = { eps = 1e-3 }
equation = "y[n, c] = (x[n, c] - mean(x[n, c], n)) / sqrt(mean((x[n, c] - mean(x[n, c], n))**2, n) + eps)"
reference = "torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)"

[ops.plane_norm]
inputs = ["x[n, h, v]", "w[h, v]"]
params = { eps = 1e-5 }
equation = "y[n, h, v] = (x[n, h, v] - mean(x[n, h, v], h, v)) / sqrt(mean((x[n, h, v] - mean(x[n, h, v], h, v))**2, h, v) + eps) * w[h, v]"
reference = "torch.nn.functional.layer_norm(x, x.shape[1:], w, None, eps)"

[ops.group_norm]
inputs = ["x[n, g, c, l]", "w[g, c]", "b[g, c]"]
params = { eps = 1e-5 }
equation = "y[n, g, c, l] = (x[n, g, c, l] - mean(x[n, g, c, l], c, l)) / sqrt(mean((x[n, g, c, l] - mean(x[n, g, c, l], c, l))**2, c, l) + eps) * w[g, c] + b[g, c]"
reference = "torch.nn.functional.group_norm(x.flatten(1, 2), x.shape[1], w.flatten(), b.flatten(), eps).view_as(x)"
"""

# the native kernel each forward is computed by (None: no native layout fits its weight, the formulas stay)
NATIVE_FORWARD = {"channel_norm": "torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)",
                  "feature_norm": "torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)",
                  "plane_norm": "torch.native_layer_norm(x, x.shape[-2:], w, None, eps)",
                  # group norm: x seen as (N, G*C, L), the weight over g * c channels (tests/test_norm_native.py)
                  "group_norm": "torch.native_group_norm(x.flatten(1, 2), w.flatten(), b.flatten(), x.shape[0], "
                                "x.shape[1] * x.shape[2], x.shape[3], x.shape[1], eps)"}


@pytest.mark.slow      # 3-12 s each; by default the catalog's layer_norm runs its native forward in test_catalog
@pytest.mark.parametrize("op_name", NATIVE_FORWARD)
def test_a_normalization_forward_is_one_native_kernel_where_a_layout_fits(tmp_path, op_name):
    """A normalization over any dims, with or without weight and bias, whose layout a native kernel fits (batch
    norm: all dims but dim 1, layer norm: trailing dims with the weight over them) computes its result, mean and
    rstd in one native call; the rest keep the formulas. Gradients, gradcheck and the Function's double backward
    are autograd's, at sizes equal and 1 too."""
    op = parse_catalog(textwrap.dedent(NORMALIZATIONS), "norms.toml").op(op_name)
    built = build_op(op, ("contraction",))
    text = render_module(built.derivation, built.lowered["contraction"], "norms.toml", "derive generate",
                         namespace=f"test_perf_{op_name}")
    (tmp_path / f"{op_name}.py").write_text(text)
    module = load_module(tmp_path / f"{op_name}.py")
    forward = _function_body(text, f"{op_name}_forward_saving")
    if NATIVE_FORWARD[op_name] is None:
        assert "torch.native_" not in forward
    else:
        assert NATIVE_FORWARD[op_name] in forward and ".sum(" not in forward
    sizes = [{"n": 4, "c": 3, "l": 5, "h": 2, "v": 3, "g": 2}, dict.fromkeys("nclhvg", 3),
             {"n": 2, "c": 1, "l": 1, "h": 1, "v": 1, "g": 1}]
    for chosen in sizes:
        check_gradients(op, module, sizes={k: v for k, v in chosen.items() if k in dict(op.index_sizes)})
    gradcheck_op(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, dtype=torch.float64)]
    assert torch.autograd.gradcheck(getattr(module, op_name), inputs)
    assert torch.autograd.gradgradcheck(getattr(module, op_name), inputs)
