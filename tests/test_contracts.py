"""Shape contracts and autocast of the generated entry points.

Every entry point (`<op>_forward`, `<op>_forward_saving`, `<op>_backward`, `<op>()` and `<op>_op`)
refuses a tensor whose shape breaks the op's declarations, naming the op, the tensor and the
index; declared shapes, including size 0, size 1 and equal sizes for different indices, pass;
torch.compile, vmap, jacrev and export still work. Under CPU bfloat16 autocast, `<op>()` and
`<op>_op` give the reference's output dtype and each input's dtype for its gradient.
"""

import re
import warnings

import pytest
import torch

from derive import naming
from derive.build import render_catalog
from derive.naming import BATCH
from derive.spec import parse_catalog
from derive.testing import backward_arguments, load_module, make_inputs, nonempty_sizes, reference, sizes_for

from conftest import CATALOG, first_by_default, generated_module

# Ops of our own: three inputs sharing indices, batch dims shared by two inputs next to a plain
# one, a two-dim gather, a loss with a per-class weight.
INVENTED_SPEC = """
[ops.product_minus]
inputs = ["a[i, k]", "b[k, j]", "c[i, j]"]
equation = "y[i, j] = sum(a[i, k] * b[k, j], k) - c[i, j]"
reference = "a @ b - c"

[ops.gated]
inputs = ["x[..., k]", "s[..., k]", "w[k]"]
equation = "y[..., k] = x[..., k] * s[..., k] + w[k]"
reference = "x * s + w"

[ops.gather_rows]
inputs = ["table[v, d]", "idx[n, l]"]
integer = ["idx"]
equation = "y[n, l, d] = table[idx[n, l], d]"
reference = "torch.nn.functional.embedding(idx, table)"

[ops.weighted_squares]
inputs = ["pred[n, c]", "weight[c]"]
equation = "loss = mean(sum(weight[c] * pred[n, c]**2, c), n)"
reference = "(weight * pred**2).sum(-1).mean()"
"""
INVENTED = parse_catalog(INVENTED_SPEC, "invented.toml")


@pytest.fixture(scope="module")
def invented_modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("invented")
    for path, text in render_catalog(INVENTED, styles=("contraction",), namespace="contracts_test").items():
        (folder / path).write_text(text)
    return {op.name: load_module(folder / f"{op.name}.py") for op in INVENTED.ops}


ALL = [("catalog", op) for op in CATALOG.ops] + [("invented", op) for op in INVENTED.ops]


def module_of(kind, op, invented_modules):
    return generated_module(op.name) if kind == "catalog" else invented_modules[op.name]


def cases(select):
    return [pytest.param(kind, op, id=op.name) for kind, op in ALL if select(op)]


def entry_points(op, module):
    """Every generated function that takes the inputs (params at their defaults)."""
    functions = [naming.forward(op.name), naming.forward_saving(op.name), op.name, naming.custom_op(op.name)]
    return [getattr(module, name) for name in functions if hasattr(module, name)]


def raises_everywhere(op, module, inputs, position, message):
    """Each entry point and the backward refuse `inputs` (input `position` is the bad one)."""
    good = make_inputs(op, dtype=torch.float64)
    for function in entry_points(op, module):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            function(*inputs)
    grad_output = torch.ones(getattr(module, naming.forward(op.name))(*good).shape, dtype=torch.float64)
    arguments = list(backward_arguments(op, module, good))
    arguments[position] = inputs[position]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        getattr(module, naming.backward(op.name))(grad_output, *arguments)


def declaration(tensor):
    return f"{tensor.name}[{', '.join(tensor.indices)}]" if tensor.indices else tensor.name


def tensor_like(op, tensor, shape):
    if tensor.integer:
        return torch.randint(0, sizes_for(op)[tensor.value_range], shape)
    return torch.rand(shape, dtype=torch.float64) + 0.5


def ranked(op, tensor):
    return BATCH not in tensor.indices or len(tensor.indices) > 1


# ---- wrong shapes are refused -----------------------------------------------------------------

@pytest.mark.parametrize("kind, op", cases(lambda op: any(ranked(op, t) for t in op.inputs)))
def test_wrong_rank_is_refused(kind, op, invented_modules):
    module = module_of(kind, op, invented_modules)
    for position, tensor in enumerate(op.inputs):
        if not ranked(op, tensor):
            continue
        inputs = make_inputs(op, dtype=torch.float64)
        named = [i for i in tensor.indices if i != BATCH]
        if BATCH in tensor.indices:      # one dim too few
            bad = tensor_like(op, tensor, inputs[position].shape[-len(named) + 1:] if len(named) > 1 else ())
            message = f"{op.name}: {tensor.name} has shape {tuple(bad.shape)} but is declared {declaration(tensor)}"
        else:                            # one dim too many
            bad = tensor_like(op, tensor, (2, *inputs[position].shape))
            message = f"{op.name}: {tensor.name} has shape {tuple(bad.shape)} but is declared {declaration(tensor)}"
        inputs[position] = bad
        raises_everywhere(op, module, inputs, position, message)


def shared_indices(op):
    """(later input, its dim, index, earlier input, its dim) for every index two inputs share."""
    sizes = dict(op.index_sizes)
    found = []
    for position, tensor in enumerate(op.inputs):
        for dim, index in enumerate(tensor.indices):
            if index == BATCH:
                continue
            earlier = next(((p, t) for p, t in enumerate(op.inputs[:position])
                            if any(sizes[i] == sizes[index] for i in t.indices if i != BATCH)), None)
            if earlier is not None:
                found.append((position, dim, index, *earlier))
    return found


@pytest.mark.parametrize("kind, op", cases(shared_indices))
def test_mismatched_sizes_are_refused(kind, op, invented_modules):
    module = module_of(kind, op, invented_modules)
    sizes = dict(op.index_sizes)
    for position, dim, index, other_position, other in shared_indices(op):
        inputs = make_inputs(op, dtype=torch.float64)
        tensor = op.inputs[position]
        shape = list(inputs[position].shape)
        dim = dim - len(tensor.indices) if BATCH in tensor.indices else dim
        shape[dim] += 1
        inputs[position] = tensor_like(op, tensor, tuple(shape))
        other_index = next(i for i in other.indices if i != BATCH and sizes[i] == sizes[index])
        other_dim = other.indices.index(other_index) - (len(other.indices) if BATCH in other.indices else 0)
        message = (f"{op.name}: {tensor.name} has size {shape[dim]} at dim {dim} (index {index}) but "
                   f"{other.name} has {other_index} = {inputs[other_position].shape[other_dim]}")
        raises_everywhere(op, module, inputs, position, message)


def batched_pairs(op):
    batched = [p for p, t in enumerate(op.inputs) if BATCH in t.indices]
    return [(batched[0], p) for p in batched[1:]]


@pytest.mark.parametrize("kind, op", cases(batched_pairs))
def test_batch_dims_that_do_not_broadcast_are_refused(kind, op, invented_modules):
    module = module_of(kind, op, invented_modules)
    for first, second in batched_pairs(op):
        names = (op.inputs[first].name, op.inputs[second].name)
        inputs = make_inputs(op, dtype=torch.float64, batch_shapes={names[0]: (3,), names[1]: (4,)})
        message = (f"{op.name}: {names[1]} has batch dims (4,) (index ...) but {names[0]} has ... = (3,), "
                   f"and they do not broadcast")
        raises_everywhere(op, module, inputs, second, message)


@pytest.mark.parametrize("kind, op", cases(lambda op: True))
def test_wrong_grad_output_is_refused(kind, op, invented_modules):
    """A grad_<out> with one dim too many, or a wrong size at any of the output's indices."""
    module = module_of(kind, op, invented_modules)
    inputs = make_inputs(op, dtype=torch.float64)
    output = getattr(module, naming.forward(op.name))(*inputs)
    arguments = backward_arguments(op, module, inputs)
    grad = naming.grad(op.output)
    call = getattr(module, naming.backward(op.name))
    too_many = torch.ones((2, *output.shape), dtype=torch.float64)
    if BATCH in op.output_indices:
        batch = too_many.shape[:too_many.dim() - len(op.output_indices) + 1]
        message = f"{op.name}: {grad} has batch dims {tuple(batch)} (index ...)"
    else:
        declared = f"{grad}[{', '.join(op.output_indices)}]" if op.output_indices else grad
        message = f"{op.name}: {grad} has shape {tuple(too_many.shape)} but is declared {declared}"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(too_many, *arguments)
    for dim, index in enumerate(op.output_indices):
        if index == BATCH:
            continue
        shape = list(output.shape)
        dim = dim - len(op.output_indices) if BATCH in op.output_indices else dim
        shape[dim] += 1
        with pytest.raises(RuntimeError, match=re.escape(f"{op.name}: {grad} has size {shape[dim]} at dim {dim} "
                                                         f"(index {index}) but ")):
            call(torch.ones(shape, dtype=torch.float64), *arguments)


@pytest.mark.parametrize("kind, op", cases(lambda op: any(t.integer for t in op.inputs)))
def test_float_for_an_integer_input_is_refused(kind, op, invented_modules):
    module = module_of(kind, op, invented_modules)
    for position, tensor in enumerate(op.inputs):
        if tensor.integer:
            inputs = make_inputs(op, dtype=torch.float64)
            inputs[position] = inputs[position].to(torch.float32)
            message = f"{op.name}: {tensor.name} has dtype torch.float32 but is declared an integer input"
            raises_everywhere(op, module, inputs, position, message)


@pytest.mark.parametrize("kind, op", first_by_default(cases(lambda op: any(not t.integer for t in op.inputs)), 3))
def test_an_integer_tensor_for_a_floating_input_is_refused(kind, op, invented_modules):
    """An int64 tensor where the spec declares a float input: the forward would compute (torch promotes it) and
    the backward fail inside a matmul, so every entry point refuses it first, naming the op and the input."""
    module = module_of(kind, op, invented_modules)
    position = next(p for p, tensor in enumerate(op.inputs) if not tensor.integer)
    inputs = make_inputs(op, dtype=torch.float64)
    inputs[position] = torch.ones_like(inputs[position], dtype=torch.int64)
    message = f"{op.name}: {op.inputs[position].name} has dtype torch.int64 but is a floating-point input"
    raises_everywhere(op, module, inputs, position, message)


def test_saved_value_of_a_wrong_shape_is_refused():
    op = CATALOG.op("cross_entropy")
    module = generated_module("cross_entropy")
    logits, target = make_inputs(op, dtype=torch.float64)
    _, saved = module.cross_entropy_forward_saving(logits, target)
    with pytest.raises(RuntimeError, match=re.escape("cross_entropy: saved_log_softmax has size 3 at dim 0 (index n) "
                                                     f"but logits has n = {logits.shape[0]}")):
        module.cross_entropy_backward(torch.ones(()), logits, target, saved[:3])


# ---- declared shapes pass -----------------------------------------------------------------------

# sizes the torch reference cannot take at 0: F.conv1d/conv2d refuse 0 out-channels and kernels of length 0
# and give 0 out-channels for 0 in-channels (derive's result has o's size: zeros plus the bias),
# F.avg_pool1d refuses 0 channels, F.max_pool1d 0 channels and a length 0
EMPTY_REFUSED_BY_TORCH = {"conv1d": {"c", "o", "q"}, "conv2d": {"c", "o", "p", "q"}, "avg_pool1d": {"c"},
                          "max_pool1d": {"c", "l"}}


def valid_sizes(op):
    """All sizes 1; all equal; each size 0 in turn (not the range an integer input's values index, nor a
    size a max or min reduces over: torch.amax raises there, and so does the generated forward)."""
    representatives = sorted(set(dict(op.index_sizes).values()))
    indexed = {t.value_range for t in op.inputs if t.integer} | nonempty_sizes(op)
    yield {r: 1 for r in representatives}
    yield {r: 3 for r in representatives}
    for r in representatives:
        if r not in indexed and r not in EMPTY_REFUSED_BY_TORCH.get(op.name, ()):
            yield {**{s: 3 for s in representatives}, r: 0}


@pytest.mark.parametrize("kind, op", cases(lambda op: True))
def test_declared_shapes_pass(kind, op, invented_modules):
    module = module_of(kind, op, invented_modules)
    flags = [t.differentiable for t in op.inputs]
    for sizes in valid_sizes(op):
        inputs = make_inputs(op, sizes, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = reference(op)(*inputs)
        for function in entry_points(op, module):
            output = function(*inputs)
            output = output[0] if isinstance(output, tuple) else output
            if 0 in sizes.values():     # torch's losses say nan for a sum over nothing, derive 0
                assert output.shape == expected.shape
            else:
                torch.testing.assert_close(output, expected)
        grad_output = torch.ones_like(expected)
        gradients = getattr(module, naming.backward(op.name))(grad_output, *backward_arguments(op, module, inputs))
        for tensor, flag, gradient in zip(inputs, flags, gradients):
            assert (gradient is None) == (not flag)
            if flag:
                assert gradient.shape == tensor.shape, (op.name, sizes)
        leaves = [t.requires_grad_(flag) for t, flag in zip(inputs, flags)]
        for function in (getattr(module, op.name), getattr(module, naming.custom_op(op.name))):
            function(*leaves).sum().backward()


# ---- the checks keep compile, vmap, jacrev and export working --------------------------------------

def test_checks_work_under_compile_vmap_jacrev_and_export():
    linear, mse = generated_module("linear"), generated_module("mse")
    x, w, b = make_inputs(CATALOG.op("linear"), dtype=torch.float32)
    torch._dynamo.reset()     # a compile of linear_op earlier in this process (test_integration) marks sizes dynamic
    compiled = torch.compile(linear.linear_op, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), x @ w + b)
    with pytest.raises(Exception, match=r"linear: w has size \S+ at dim 0 \(index k\) but x has k = \S+"):
        compiled(x, w[:2], b)     # (under compile the sizes may print as symbols)

    pred, target = torch.randn(6, 5), torch.randn(6, 5)     # six samples of pred[n]
    torch.testing.assert_close(torch.vmap(mse.mse)(pred, target), ((pred - target) ** 2).mean(-1))
    with pytest.raises(RuntimeError, match=re.escape("mse: pred has shape (5, 5) but is declared pred[n]")):
        torch.vmap(mse.mse)(torch.randn(6, 5, 5), torch.randn(6, 5, 5))
    jacobian = torch.func.jacrev(linear.linear, argnums=1)(x, w, b)
    assert jacobian.shape == (*x.shape[:1], *w.shape[1:], *w.shape)

    class Layer(torch.nn.Module):
        def forward(self, x, w, b):
            return linear.linear_op(x, w, b)

    exported = torch.export.export(Layer(), (x, w, b))
    torch.testing.assert_close(exported.module()(x, w, b), x @ w + b)


# ---- autocast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op_name", [op.name for op in CATALOG.ops])
def test_cpu_bfloat16_autocast_matches_the_reference(op_name, dtype):
    op = CATALOG.op(op_name)
    module = generated_module(op_name)
    flags = [t.differentiable for t in op.inputs]
    inputs = make_inputs(op, dtype=dtype)
    for function in (getattr(module, op.name), getattr(module, naming.custom_op(op.name))):
        leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, flags)]
        expected_leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, flags)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = function(*leaves)
            expected = reference(op)(*expected_leaves)
        assert output.dtype == expected.dtype, f"{op_name}: {output.dtype}, the reference gives {expected.dtype}"
        torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)
        output.float().sum().backward()
        expected.float().sum().backward()
        for leaf, expected_leaf in zip(leaves, expected_leaves):
            if leaf.requires_grad:
                assert leaf.grad.dtype == leaf.dtype
                torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("op_name", ["linear", "bmm", "matmul"])
def test_products_run_in_bfloat16_under_cpu_autocast(op_name):
    """float32 inputs: the product in bfloat16 as torch's, gradients back in float32 (the backward,
    run outside the autocast region, used to mix bfloat16 and float32)."""
    op = CATALOG.op(op_name)
    module = generated_module(op_name)
    inputs = [t.requires_grad_() for t in make_inputs(op, dtype=torch.float32)]
    for function in (getattr(module, op.name), getattr(module, naming.custom_op(op.name))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = function(*inputs)
        assert output.dtype == torch.bfloat16
        gradients = torch.autograd.grad(output.sum(), inputs)
        assert [g.dtype for g in gradients] == [torch.float32] * len(inputs)
        expected = torch.autograd.grad(reference(op)(*[t.bfloat16() for t in inputs]).sum(), inputs)
        for got, want in zip(gradients, expected):
            torch.testing.assert_close(got, want)
