"""Derivation, shape plans and lowering: the structure of what is generated, not just its values."""

import textwrap

import pytest
import sympy
import torch

from derive.build import render_catalog
from derive.pipeline import build_op
from derive.lower import Einsum, MatMul, largest_intermediate_violations, walk
from derive.model import SpecError
from derive.printing import render, render_expr
from derive.spec import parse_catalog
from derive.testing import check_gradients, gradcheck_op, load_module, make_inputs

from conftest import CATALOG, OPS, built, shared_builds


def code_lines(op_name, style):
    lowered = built(CATALOG.op(op_name)).lowered[style]
    return {g.plan.target: render_expr(g) for g in lowered.gradients}


def test_broadcast_style_reproduces_the_seed_patterns():
    assert code_lines("linear", "broadcast") == {
        "grad_x": "(grad_y.unsqueeze(1) * w).sum(dim=-1)",
        "grad_w": "(x.unsqueeze(-1) * grad_y.unsqueeze(1)).sum(dim=0)",
        "grad_b": "grad_y.sum(0)",
    }


def test_contraction_style_uses_matrix_products():
    assert code_lines("linear", "contraction") == {
        "grad_x": "grad_y @ w.T",
        "grad_w": "x.T @ grad_y",
        "grad_b": "grad_y.sum(0)",
    }


@pytest.mark.parametrize("op_name", OPS)
def test_contraction_style_never_outgrows_the_tensors_it_holds(op_name):
    assert largest_intermediate_violations(built(CATALOG.op(op_name)).lowered["contraction"]) == []


def test_memory_check_flags_the_broadcast_product():
    violations = largest_intermediate_violations(built(CATALOG.op("linear")).lowered["broadcast"])
    assert "grad_x: Product over ('n', 'k', 'm')" in violations


def test_relu_kink_is_explicit_and_follows_torch():
    gradient = built(CATALOG.op("relu")).derivation.gradients[0]
    steps = gradient.partial.atoms(sympy.Heaviside)
    assert steps and all(step.args[1] == 0 for step in steps)
    assert code_lines("relu", "contraction") == {"grad_x": "torch.ops.aten.threshold_backward(grad_y, y, 0)"}


def test_relu_backward_passes_the_gradient_where_x_is_nan():
    module = load_module_for("relu")
    x = torch.tensor([float("nan"), 0.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    grad_y = torch.arange(1.0, 5.0, dtype=torch.float64)
    (expected,) = torch.autograd.grad(torch.relu(x), x, grad_y)
    (actual,) = module.relu_backward(grad_y, x.detach(), torch.relu(x.detach()))
    torch.testing.assert_close(actual, expected, equal_nan=True)


def load_module_for(op_name, style="contraction"):
    from conftest import generated_module
    return generated_module(op_name, style)


def spec_module(tmp_path, text, style="contraction"):
    catalog = parse_catalog(textwrap.dedent(text), "test.toml")
    # each test registers its custom ops in a namespace of its own
    with shared_builds():
        files = render_catalog(catalog, (style,), namespace=f"test_{tmp_path.name}".replace("-", "_"))
    (path, source), = [(p, s) for p, s in files.items() if p.endswith(".py")]
    target = tmp_path / path.replace("/", "_")
    target.write_text(source)
    return catalog.ops[0], load_module(target)


@pytest.mark.parametrize("order", ["k, j", "j, k", "nested_kj", "nested_jk"])
def test_deltas_are_eliminated_whatever_the_sum_order(tmp_path, order):
    body = "x[n, k] * w[k, j] * v[j, m]"
    summed = {"k, j": f"sum({body}, k, j)", "j, k": f"sum({body}, j, k)",
              "nested_kj": f"sum(sum({body}, k), j)", "nested_jk": f"sum(sum({body}, j), k)"}[order]
    op, module = spec_module(tmp_path, f'''
        [ops.chain]
        inputs = ["x[n, k]", "w[k, j]", "v[j, m]"]
        equation = "y[n, m] = {summed}"
        reference = "x @ w @ v"
    ''')
    result = built(op)
    for gradient in result.derivation.gradients:
        assert not gradient.vjp.has(sympy.KroneckerDelta, sympy.Piecewise), gradient.vjp
    nodes = [n for g in result.lowered["contraction"].gradients for t in g.terms for n in walk(t)]
    assert any(isinstance(n, (Einsum, MatMul)) for n in nodes)
    gradcheck_op(op, module)
    check_gradients(op, module)


@pytest.mark.parametrize("tie, reference", [(", tie=0", "torch.relu(x)"), ("", "(x + torch.abs(x)) / 2"),
                                            (", tie=0.5", "(x + torch.abs(x)) / 2"),
                                            (", tie=1", "torch.clamp_min(x, 0)")])
def test_value_at_the_kink_follows_the_spec(tmp_path, tie, reference):
    op, module = spec_module(tmp_path, f'''
        [ops.ramp]
        inputs = ["x[i]"]
        equation = "y[i] = Max(x[i], 0{tie})"
        reference = "{reference}"
    ''')
    check_gradients(op, module, kinks=True)


def test_summing_a_constant_multiplies_by_the_size(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.spread]
        inputs = ["x[n]", "w[k]"]
        equation = "y[n] = sum(x[n] * 2 + w[k], k)"
        reference = "x * 2 * w.shape[0] + w.sum()"
    ''')
    check_gradients(op, module)


def test_three_operand_contractions_get_an_optimized_path(tmp_path):
    """The chain x @ w @ v is one einsum, and torch.einsum orders it with opt_einsum."""
    import torch
    assert torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled
    op, _ = spec_module(tmp_path, '''
        [ops.chain3]
        inputs = ["x[n, k]", "w[k, j]", "v[j, m]"]
        equation = "y[n, m] = sum(x[n, k] * w[k, j] * v[j, m], k, j)"
        reference = "x @ w @ v"
    ''')
    forward = built(op).lowered["contraction"].forward
    assert isinstance(forward.terms[0], Einsum) and len(forward.terms[0].operands) == 3


@pytest.mark.parametrize("equation, reference", [
    ("y[n, k] = where(x[n, k] > 0, x[n, k], u[k])", "torch.where(torch.gt(x, 0), x, u)"),
    ("y[n, k] = Max(x[n, k] * u[k], 0, tie=0)", "torch.relu(x * u)"),
])
def test_steps_whose_branches_broadcast(tmp_path, equation, reference):
    """Conditions are never hoisted into shared values; branches of different shapes line up."""
    op, module = spec_module(tmp_path, f'''
        [ops.step]
        inputs = ["x[n, k]", "u[k]"]
        equation = "{equation}"
        reference = "{reference}"
    ''')
    check_gradients(op, module)
    check_gradients(op, module, kinks=True)


def test_constant_terms_and_scalar_inputs(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.shift]
        inputs = ["s"]
        equation = "y = s + 2"
        reference = "s + 2"
    ''')
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_constant_function_values_are_printed_as_numbers(tmp_path):
    """softplus(2) is a number: SymPy can order it in Max, and torch gets a float, not an int tensor op."""
    op, module = spec_module(tmp_path, '''
        [ops.floor_at]
        inputs = ["s"]
        equation = "y = exp(Max(s, softplus(2)))"
        reference = "torch.exp(torch.clamp_min(s, 2.1269280110429727))"
    ''')
    check_gradients(op, module)


LOSSES = [op.name for op in CATALOG.ops if not op.output_indices and op.output == "loss"]   # (not trace)


@pytest.mark.parametrize("op_name", LOSSES)
def test_loss_gradients_scale_by_grad_loss_before_touching_a_tensor(op_name):
    """`2 * grad_loss / size_n * t`: the scalars make one 0-d tensor, which scales the full tensor once
    (or, for a fused kernel, the gradient that goes into it). A gradient expanded to a broadcast batch shape
    is divided by its size after the expansion, as torch's mean backward does (over a size-0 batch 1 / size
    is inf and must meet only the empty expanded tensor): `((grad_loss * t).expand(...) / size_batch)`."""
    import re
    scaled = r"-?(\d+ \* )?grad_loss( / size_\w+)?"
    expanded = r"\(-?\(+(\d+ \* )?grad_loss \* .*\)\.expand\(.*\) / size_\w+\)\.sum_to_size\("
    lowered = built(CATALOG.op(op_name)).lowered["contraction"]
    shared = {s.name: render(s.value).text for s in lowered.shared}
    for target, line in code_lines(op_name, "contraction").items():
        # a gradient computed from a multiple of another reads it from a shared value: that value is scaled
        read = re.fullmatch(r"\(?-?(shared_\d+)\)?(\.expand\(.*\))?(\.sum_to_size\(\w+\.shape\))?", line)
        line = shared[read.group(1)] if read else line
        assert re.match(rf"\(?{scaled} \* ", line) or re.match(expanded, line) or re.match(
            rf"torch\._\w+_backward_data\(({scaled} \* |torch\.ops\.aten\.nll_loss_backward\({scaled}, )",
            line), (target, line)


def test_shared_values_leave_the_upstream_scalar_out():
    """(mse's gradients are one value and its negative, shared whole: see test_normalizations.py)"""
    op = parse_catalog(textwrap.dedent('''
        [ops.weighted_mse]
        inputs = ["p[n]", "t[n]", "w[n]"]
        differentiable = ["p", "w"]
        equation = "loss = mean(w[n] * (p[n] - t[n])**2, n)"
        reference = "(w * (p - t)**2).mean()"
    '''), "test.toml").ops[0]
    lowered = built(op).lowered["contraction"]
    assert [str(s.value.expr) for s in lowered.shared] == ["p[n] - t[n]"]


def test_a_one_hot_term_is_added_in_place(tmp_path):
    """x[t] weighted 2: no x - logsumexp(x) to save, so softmax - 2 * one_hot, the one-hot added in place."""
    op, module = spec_module(tmp_path, '''
        [ops.double_margin]
        inputs = ["logits[n, c]", "target[n]"]
        integer = ["target"]
        equation = "loss = mean(logsumexp(logits[n, c], c) - 2 * logits[n, target[n]], n)"
        reference = "(torch.logsumexp(logits, -1) - 2 * logits.gather(1, target[:, None]).squeeze(1)).mean()"
    ''')
    (gradient,) = built(op).lowered["contraction"].gradients
    line = render_expr(gradient)
    assert "one_hot" not in line and line.endswith(
        ".index_put_((torch.arange(size_n, device=target.device), target), -2 * grad_loss / size_n, accumulate=True)")
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_exp_minus_one_hot_is_the_log_softmax_kernel_for_any_y(tmp_path):
    """g - exp(y) * sum(g) with g = -one_hot is exp(y) - one_hot whatever y is: here y is the input itself."""
    op, module = spec_module(tmp_path, '''
        [ops.exp_margin]
        inputs = ["logits[n, c]", "target[n]"]
        integer = ["target"]
        equation = "loss = mean(sum(exp(logits[n, c]), c) - logits[n, target[n]], n)"
        reference = "(logits.exp().sum(-1) - logits.gather(1, target[:, None]).squeeze(1)).mean()"
    ''')
    (gradient,) = built(op).lowered["contraction"].gradients
    assert render_expr(gradient).startswith("torch._log_softmax_backward_data(torch.ops.aten.nll_loss_backward(")
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_cross_entropy_saves_its_log_softmax_and_uses_the_fused_kernel():
    result = built(CATALOG.op("cross_entropy"))
    (saved,) = result.lowered["contraction"].plan.saved
    assert saved.name == "saved_log_softmax" and str(saved.expr) == "log_softmax(logits[n, c], c)"
    assert render_expr(result.lowered["contraction"].forward) == \
        "-saved_log_softmax.gather(1, target.unsqueeze(1)).squeeze(1).mean()"
    assert code_lines("cross_entropy", "contraction")["grad_logits"] == (
        "torch._log_softmax_backward_data(torch.ops.aten.nll_loss_backward(grad_loss / size_n, saved_log_softmax, "
        "target, weight=None, reduction=2, ignore_index=-100, total_weight=saved_log_softmax.new_ones(())), "
        "saved_log_softmax, -1, saved_log_softmax.dtype)")
    assert not result.lowered["broadcast"].plan.saved      # the teaching form keeps the formula
    assert "one_hot" in code_lines("cross_entropy", "broadcast")["grad_logits"]


def test_no_value_is_saved_unless_the_forward_forms_it(tmp_path):
    """Label smoothing weighs x[t] by 1 - s: no x - logsumexp(x) in the forward, so nothing is saved."""
    op, module = spec_module(tmp_path, '''
        [ops.smoothed_cross_entropy]
        inputs = ["logits[n, c]", "target[n]"]
        integer = ["target"]
        params = { smoothing = 0.1 }
        equation = "loss = mean(logsumexp(logits[n, c], c) - (1 - smoothing) * logits[n, target[n]] - smoothing * mean(logits[n, c], c), n)"
        reference = "torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)"
    ''')
    assert not built(op).lowered["contraction"].plan.saved
    assert not hasattr(module, "smoothed_cross_entropy_forward_saving")
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_one_hot_without_a_scalar_scale_stays_out_of_place(tmp_path):
    """A per-row loss has no 0-d factor to make its rest a fresh tensor: no in-place write, same values."""
    op, module = spec_module(tmp_path, '''
        [ops.nll_rows]
        inputs = ["logits[n, c]", "target[n]"]
        integer = ["target"]
        equation = "loss[n] = logsumexp(logits[n, c], c) - logits[n, target[n]]"
        reference = "torch.nn.functional.cross_entropy(logits, target, reduction='none')"
    ''')
    import inspect
    source = inspect.getsource(getattr(module, "nll_rows_backward"))
    assert "index_put_" not in source and "one_hot" in source
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_x_minus_logsumexp_becomes_log_softmax():
    from derive.functions import log_softmax, logsumexp
    from derive.kernels import fuse_log_softmax
    x, v = sympy.IndexedBase("x"), sympy.IndexedBase("v")
    n, c, c1 = (sympy.Idx(name, 5) for name in ("n", "c", "c_1"))
    expr = v[n, c] * (x[n, c] - logsumexp(x[n, c1], c1)) + 1
    assert fuse_log_softmax(expr) == v[n, c] * log_softmax(x[n, c], c) + 1
    assert fuse_log_softmax(x[n, c] - logsumexp(x[n, c1] * 2, c1)) == x[n, c] - logsumexp(x[n, c1] * 2, c1)


def test_an_elementwise_op_saves_its_log_softmax_too(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.weighted_log_softmax]
        inputs = ["x[n, c]", "v[n, c]"]
        equation = "y[n, c] = v[n, c] * (x[n, c] - logsumexp(x[n, c], c))"
        reference = "v * torch.log_softmax(x, -1)"
    ''')
    lines = {g.plan.target: render_expr(g) for g in built(op).lowered["contraction"].gradients}
    assert lines["grad_v"] == "grad_y * saved_log_softmax"
    assert lines["grad_x"] == "torch._log_softmax_backward_data(grad_y * v, saved_log_softmax, -1, saved_log_softmax.dtype)"
    gradcheck_op(op, module)
    check_gradients(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, {"n": 3, "c": 4}, torch.float64)]
    assert torch.autograd.gradgradcheck(module.weighted_log_softmax, inputs)


def test_cross_entropy_with_probabilities_reads_the_saved_log_softmax():
    lines = code_lines("cross_entropy_probs", "contraction")
    assert lines["grad_target"] == "-grad_loss / size_n * saved_log_softmax"
    assert lines["grad_logits"] == ("torch._log_softmax_backward_data(-grad_loss / size_n * target, "
                                    "saved_log_softmax, -1, saved_log_softmax.dtype)")
    assert "logsumexp" in code_lines("cross_entropy_probs", "broadcast")["grad_target"]


def test_a_factor_constant_along_a_sum_multiplies_the_reduced_value(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.scaled_dot]
        inputs = ["r[n]", "a[n, d]", "b[n, d]"]
        equation = "y[n] = sum(r[n] * a[n, d] * b[n, d], d)"
        reference = "r * (a * b).sum(-1)"
    ''')
    forward = render_expr(built(op).lowered["contraction"].forward)
    assert forward == "r * (a * b).sum(-1)"
    check_gradients(op, module)


def test_rational_terms_share_one_denominator():
    line = code_lines("binary_cross_entropy", "contraction")["grad_pred"]
    assert line.count(" / ") == 3 and "(pred - target)" in line, line   # / size, / (pred - 1), / pred


def test_gradients_without_a_matrix_product_are_computed_first():
    source = (load_module_for("linear").__file__)
    code = open(source).read().split("def linear_backward", 1)[1]
    assert code.index("        grad_b = ") < code.index("        grad_x = ") < code.index("        grad_w = ")


def test_layer_norm_saves_mean_and_rstd_and_uses_the_fused_kernel():
    result = built(CATALOG.op("layer_norm"))
    assert [v.name for v in result.lowered["contraction"].plan.saved] == ["saved_mean", "saved_rstd"]
    lines = code_lines("layer_norm", "contraction")
    assert lines["grad_x"] == ("torch.ops.aten.native_layer_norm_backward(grad_y, x, x.shape[-1:], "
                               "saved_mean.unsqueeze(-1).detach(), saved_rstd.unsqueeze(-1).detach(), w, None, "
                               "[True, False, False])[0]")
    assert lines["grad_w"].endswith("saved_rstd.unsqueeze(-1).detach(), w, None, [False, True, False])[1]")
    assert not result.lowered["broadcast"].plan.saved
    assert "native_layer_norm_backward" not in " ".join(code_lines("layer_norm", "broadcast").values())


def test_a_normalization_without_weight_passes_none(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.standardize]
        inputs = ["x[..., d]"]
        params = { eps = 1e-5 }
        equation = "y[..., d] = (x[..., d] - mean(x[..., d], d)) / sqrt(mean((x[..., d] - mean(x[..., d], d))**2, d) + eps)"
        reference = "torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)"
    ''')
    (line,) = [render_expr(g) for g in built(op).lowered["contraction"].gradients]
    assert line == ("torch.ops.aten.native_layer_norm_backward(grad_y, x, x.shape[-1:], saved_mean.unsqueeze(-1).detach(), "
                    "saved_rstd.unsqueeze(-1).detach(), None, None, [True, False, False])[0]")
    gradcheck_op(op, module)
    check_gradients(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, {"...": 3, "d": 4}, torch.float64)]
    assert torch.autograd.gradgradcheck(module.standardize, inputs)


def test_statistics_read_outside_the_kernel_are_saved_for_the_formulas(tmp_path):
    """A residual x + xhat has a fourth term in d/dx: no fused kernel, so the formulas stay, reading the saved
    statistics, which a double backward computes again from x."""
    op, module = spec_module(tmp_path, '''
        [ops.residual_norm]
        inputs = ["x[..., d]"]
        params = { eps = 1e-5 }
        equation = "y[..., d] = x[..., d] + (x[..., d] - mean(x[..., d], d)) / sqrt(mean((x[..., d] - mean(x[..., d], d))**2, d) + eps)"
        reference = "x + torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)"
    ''')
    saved = built(op).lowered["contraction"].plan.saved
    assert [(v.name, v.recompute) for v in saved] == [("saved_mean", True), ("saved_rstd", True)]
    assert "native_layer_norm_backward" not in render_expr(built(op).lowered["contraction"].gradients[0])
    gradcheck_op(op, module)
    check_gradients(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, {"...": 3, "d": 4}, torch.float64)]
    assert torch.autograd.gradgradcheck(module.residual_norm, inputs)


def test_two_log_softmaxes_of_one_input_get_two_saved_values(tmp_path):
    """A CLIP-style loss normalizes x along each dim: two saved values, two names."""
    op, module = spec_module(tmp_path, '''
        [ops.clip_loss]
        inputs = ["x[n, c]", "t[n]", "u[c]"]
        integer = ["t", "u"]
        equation = "loss = mean(logsumexp(x[n, c], c) - x[n, t[n]], n) + mean(logsumexp(x[n, c], n) - x[u[c], c], c)"
        reference = "torch.nn.functional.cross_entropy(x, t) + torch.nn.functional.cross_entropy(x.T, u)"
    ''')
    names = [v.name for v in built(op).lowered["contraction"].plan.saved]
    assert sorted(names) == ["saved_log_softmax_x_c", "saved_log_softmax_x_n"]
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_a_class_dim_that_is_not_last_keeps_the_one_hot(tmp_path):
    """nll_loss_backward builds (rows, classes); classes first is left to the one-hot formula."""
    op, module = spec_module(tmp_path, '''
        [ops.class_first]
        inputs = ["logits[c, n]", "target[n]"]
        integer = ["target"]
        equation = "loss = mean(logsumexp(logits[c, n], c) - logits[target[n], n], n)"
        reference = "torch.nn.functional.cross_entropy(logits.T, target)"
    ''')
    (line,) = [render_expr(g) for g in built(op).lowered["contraction"].gradients]
    assert "nll_loss_backward" not in line and "one_hot" in line
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_a_module_that_would_not_compile_is_an_error_not_a_file():
    from derive import build
    original = build.render_module
    build.render_module = lambda *args, **kwargs: "def broken(:\n"
    try:
        with pytest.raises(SpecError, match="internal error while generating"):
            render_catalog(parse_catalog(textwrap.dedent('''
                [ops.ident]
                inputs = ["x[i]"]
                equation = "y[i] = x[i]"
                reference = "x"
            '''), "test.toml"))
    finally:
        build.render_module = original


def test_square_roots_of_sizes_are_python_arithmetic(tmp_path):
    """Without eps, SymPy pulls sqrt(size_d) out of the normalization: a Python int, not a tensor."""
    op, module = spec_module(tmp_path, '''
        [ops.standardize_exact]
        inputs = ["x[..., d]"]
        equation = "y[..., d] = (x[..., d] - mean(x[..., d], d)) / sqrt(mean((x[..., d] - mean(x[..., d], d))**2, d))"
        reference = "torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=0.0)"
    ''')
    assert "size_d**0.5" in render_expr(built(op).lowered["contraction"].forward)
    gradcheck_op(op, module)
    check_gradients(op, module)


@pytest.mark.parametrize("op_name", OPS)
def test_every_fused_kernel_call_says_what_it_computes(op_name):
    import re
    lines = open(load_module_for(op_name).__file__).read().splitlines()
    for number, line in enumerate(lines):
        for kernel in re.findall(r"(torch\.(?:ops\.aten\.)?_?\w+_backward(?:_data)?)\(", line):
            comments = []
            above = number - 1
            while lines[above].strip().startswith("#"):
                comments.append(lines[above].strip())
                above -= 1
            name = kernel.rsplit(".", 1)[1]
            assert any(c.startswith(f"# {name}") for c in comments), (op_name, kernel, comments)


def test_class_weighted_cross_entropy(tmp_path):
    """Scalar factors that are expressions (1 / sum of the weights) are pulled out of a sum of terms."""
    op, module = spec_module(tmp_path, '''
        [ops.ce_weighted]
        inputs = ["logits[n, c]", "wt[c]", "target[n]"]
        integer = ["target"]
        differentiable = ["logits"]
        ranges = { wt = [0.5, 2.0] }
        equation = "loss = sum(wt[target[n]] * (logsumexp(logits[n, c], c) - logits[n, target[n]]), n) / sum(wt[target[n]], n)"
        reference = "torch.nn.functional.cross_entropy(logits, target, weight=wt)"
    ''')
    gradcheck_op(op, module)
    check_gradients(op, module)


def test_a_layer_norm_over_named_rows_saves_and_fuses_too(tmp_path):
    op, module = spec_module(tmp_path, '''
        [ops.row_norm]
        inputs = ["x[n, d]", "w[d]", "b[d]"]
        params = { eps = 1e-5 }
        equation = "y[n, d] = (x[n, d] - mean(x[n, d], d)) / sqrt(mean((x[n, d] - mean(x[n, d], d))**2, d) + eps) * w[d] + b[d]"
        reference = "torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)"
    ''')
    lines = {g.plan.target: render_expr(g) for g in built(op).lowered["contraction"].gradients}
    assert "native_layer_norm_backward" in lines["grad_x"] and "native_layer_norm_backward" in lines["grad_w"]
    gradcheck_op(op, module)
    check_gradients(op, module)
    inputs = [t.requires_grad_() for t in make_inputs(op, {"n": 3, "d": 4}, torch.float64)]
    assert torch.autograd.gradgradcheck(module.row_norm, inputs)
    jacobians = [torch.func.jacrev(f, argnums=1)(*[t.detach() for t in inputs])
                 for f in (module.row_norm, lambda x, w, b: torch.nn.functional.layer_norm(x, (4,), w, b, 1e-5))]
    torch.testing.assert_close(jacobians[0], jacobians[1])


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("equation, reference", [
    # found by the differential fuzzer: grad_p_bjm came back (b, 1, 1), the scale's unsqueezes counted as dims
    ("y[...] = sum(p_bjm[..., j, m] * p, j, m)", "(p_bjm * p).sum(dim=(-2, -1))"),
    ("y[n] = sum(x[n, j] * p, j)", "(x * p).sum(-1)"),
])
def test_a_gradient_along_summed_dims_has_the_inputs_shape(tmp_path, style, equation, reference):
    inputs = '["p_bjm[..., j, m]", "p"]' if "p_bjm" in equation else '["x[n, j]", "p"]'
    op, module = spec_module(tmp_path, f'''
        [ops.scaled_sum]
        inputs = {inputs}
        equation = "{equation}"
        reference = "{reference}"
    ''', style)
    for sizes in ({"n": 2, "j": 3, "m": 3}, {"n": 1, "j": 1, "m": 2}, {"n": 2, "j": 0, "m": 3}):
        check_gradients(op, module, sizes=sizes)


def test_a_gathered_table_summed_along_another_dim_is_scattered_not_multiplied_by_a_one_hot(tmp_path):
    # found by the differential fuzzer: the gradient was einsum(one_hot(g_n, size_v).T, ...), an int64
    # operand beside float64 ones (a dtype error); the rows summed over m are now added at g_n
    op, module = spec_module(tmp_path, '''
        [ops.gathered_contraction]
        inputs = ["t[v, k, j]", "g[n]", "p[k, m, j, n]"]
        integer = ["g"]
        equation = "y[j, k, m] = sum(t[g[n], k, j] * p[k, m, j, n], n)"
        reference = "(t[g].permute(2, 1, 0).unsqueeze(2) * p.permute(2, 0, 1, 3)).sum(-1)"
    ''')
    code = render_expr(built(op).lowered["contraction"].gradients[0])
    assert "index_add(0, g," in code and "one_hot" not in code
    for sizes in ({"v": 3, "k": 2, "j": 2, "m": 3, "n": 4}, {"v": 1, "k": 2, "j": 1, "m": 0, "n": 2}):
        check_gradients(op, module, sizes=sizes)


def test_a_sum_over_an_index_its_body_lacks_is_the_body_times_the_size(tmp_path):
    # found by the differential fuzzer: d mean(p[k], k) / d p[k'] inside a where() branch left
    # sum(1, k) / size_k, printed `1.sum()`: the module did not compile
    op, module = spec_module(tmp_path, '''
        [ops.mean_or_constant]
        inputs = ["q", "p[k]"]
        differentiable = ["p"]
        equation = "y = where(q > 0, 0.5 - 2, mean(p[k], k))"
        reference = "torch.where(torch.gt(q, 0), -1.5, p.mean())"
    ''')
    for seed in range(3):   # q of either sign
        check_gradients(op, module, sizes={"k": 3}, seed=seed)


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
def test_a_sum_over_the_batch_dims_names_the_sizes_it_keeps_by_their_input(tmp_path, style):
    # found by the differential fuzzer (seed 43): the batch sum kept the derivation's renamed n_1 and read
    # `size_n_1`, which nothing binds (NameError); every size the code reads is now an input's
    op, module = spec_module(tmp_path, '''
        [ops.batch_summed]
        inputs = ["p[m, n]", "t[v]", "g[j]", "q[..., j, n]"]
        integer = ["g"]
        equation = "y[n, m] = sum(Max(0, sum(p[m, n], n)) * cos(t[g[j]] + q[..., j, n]), j, ...)"
        reference = "torch.clamp_min(p.sum(-1), 0) * torch.cos(t[g].unsqueeze(-1) + q).sum_to_size(q.shape[-2:]).sum(0).unsqueeze(-1)"
    ''', style)
    for sizes in ({"...": 2, "v": 3, "j": 0, "n": 4, "m": 2}, {"...": 3, "v": 3, "j": 3, "n": 3, "m": 3},
                  {"...": 1, "v": 1, "j": 1, "n": 1, "m": 1}, {"...": 0, "v": 2, "j": 2, "n": 2, "m": 2}):
        check_gradients(op, module, sizes=sizes)


def test_code_that_reads_a_size_no_input_binds_is_refused_when_generated():
    from derive.lower import Leaf, LoweredExpr
    from derive.plan import ExprPlan
    from derive.printing import sizes_used
    op = CATALOG.op("linear")
    renamed = sympy.Symbol("size_n_1", integer=True, positive=True)
    expr = LoweredExpr(ExprPlan("grad_x", "x", ("n", "k"), ()), (Leaf(renamed * sympy.Symbol("size_k", integer=True,
                                                                                              positive=True), ()),))
    with pytest.raises(ValueError, match="size_n_1, which no input's shape binds"):
        sizes_used(op, [expr])


@pytest.mark.parametrize("inputs, equation, reference", [
    # found by the differential fuzzer: the one-hot of g, summed over k alone, met a in a matrix product
    # (int64 @ float64: a dtype error); the rows constant along k are now expanded and added at g
    ('["t[v, d]", "g[n, k]", "a[n, d]"]', "y[d] = sum(t[g[n, k], d] * a[n, d], n, k)", "(t[g] * a.unsqueeze(1)).sum((0, 1))"),
    # a term that is the one-hot alone (the common grad_y factored out) adds a 1 per row ("nothing to contract")
    ('["t[v]", "g[n]", "h[n]", "a[n]"]', "y = sum(t[g[n]], n) + sum(t[h[n]] * a[n], n)", "t[g].sum() + (t[h] * a).sum()"),
    ('["t[v, d]", "g[n]", "a[n, m]", "b[m]"]', "y[d] = sum(t[g[n], d] * a[n, m] * b[m], n, m)", "t[g].T @ (a @ b)"),
])
def test_a_scatter_through_an_integer_input_never_multiplies_a_one_hot(tmp_path, inputs, equation, reference):
    integer = '["g", "h"]' if "h[n]" in inputs else '["g"]'
    op, module = spec_module(tmp_path, f'''
        [ops.scattered]
        inputs = {inputs}
        integer = {integer}
        equation = "{equation}"
        reference = "{reference}"
    ''')
    code = render_expr(build_op(op).lowered["contraction"].gradients[0])
    assert ("index_add" in code or "embedding_dense_backward" in code) and "one_hot" not in code
    for sizes in ({"v": 3, "d": 2, "n": 4, "k": 2, "m": 3}, {"v": 2, "d": 2, "n": 2, "k": 2, "m": 2},
                  {"v": 1, "d": 1, "n": 1, "k": 1, "m": 1}, {"v": 2, "d": 0, "n": 3, "k": 0, "m": 0}):
        check_gradients(op, module, sizes=sizes)


@pytest.mark.parametrize("inputs, equation, reference", [
    # found by the differential fuzzer: a value shared by several gradients over a renamed copy of the batch
    # dims (..._1, or a sum's bound index) had that copy last, and read under `...` it could not be permuted
    # ("batch dims '...' must lead"); batch copies now lead in shared values as `...` does
    ('["p_bjk[..., j, k]", "q_bjk[..., j, k]", "p_bnk[..., n, k]", "q_bjn[..., j, n]", "p"]',
     "y[..., k] = sum(sin(q_bjk[..., j, k]) * softplus(sum(sigmoid(p_bnk[..., n, k]) * cos(q_bjn[..., j, n]), ..., n))"
     " * sum(cos(p_bjk[..., j, k]) * p, ...), j)",
     "(torch.sin(q_bjk) * torch.nn.functional.softplus((torch.sigmoid(p_bnk).unsqueeze(-1) * torch.cos(q_bjn).mT"
     ".unsqueeze(-2)).sum((0, 1))).T * (torch.cos(p_bjk) * p).sum(0)).sum(-2)"),
    # and a matrix product took `...` for its row dim after the batch dim m: (m, ..., k) @ (m, k, j)
    ('["p_jkm[j, k, m]", "q_bjm[..., j, m]"]', "y[..., m, k] = sum(p_jkm[j, k, m] * tanh(q_bjm[..., j, m]), j)",
     "(p_jkm * torch.tanh(q_bjm).unsqueeze(-2)).sum(-3).mT"),
])
def test_batch_dims_lead_in_shared_values_and_matrix_products(tmp_path, inputs, equation, reference):
    op, module = spec_module(tmp_path, f'''
        [ops.batch_copies]
        inputs = {inputs}
        equation = "{equation}"
        reference = "{reference}"
    ''')
    for sizes in ({"...": 3, "n": 2, "j": 3, "k": 2, "m": 1}, {"...": 2, "n": 2, "j": 2, "k": 2, "m": 2},
                  {"...": 1, "n": 1, "j": 1, "k": 1, "m": 1}, {"...": 0, "n": 2, "j": 0, "k": 2, "m": 2}):
        check_gradients(op, module, sizes=sizes)
    if "p_jkm" in inputs:   # `...` as two dims
        sizes = {"j": 2, "k": 3, "m": 2}
        check_gradients(op, module, inputs=make_inputs(op, sizes, batch_shapes={"q_bjm": (2, 3)}))
