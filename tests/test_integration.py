"""Generated ops inside PyTorch: autograd.Function, torch.library custom op, compile, vmap, dtypes."""

import pytest
import torch

from derive import naming
from derive.testing import autograd_gradients, call_backward, make_inputs, reference

from conftest import CATALOG, OPS, REPRESENTATIVE_OPS, generated_module, half_by_default, representative

SMALL = {"...": 2}


def differentiable_inputs(op, dtype=torch.float64, seed=0):
    inputs = make_inputs(op, SMALL, dtype, seed)
    return [t.requires_grad_(meta.differentiable) for t, meta in zip(inputs, op.inputs)]


def function(op):
    return getattr(generated_module(op.name), op.name)


def custom_op(op):
    return getattr(generated_module(op.name), naming.custom_op(op.name))


@pytest.mark.parametrize("op_name", half_by_default(OPS))
def test_function_gradcheck_and_gradgradcheck(op_name):
    op = CATALOG.op(op_name)
    inputs = differentiable_inputs(op)
    assert torch.autograd.gradcheck(function(op), inputs)
    assert torch.autograd.gradgradcheck(function(op), inputs)


@pytest.mark.parametrize("op_name", representative(OPS))
def test_custom_op_passes_opcheck(op_name):
    op = CATALOG.op(op_name)
    torch.library.opcheck(custom_op(op), tuple(differentiable_inputs(op)))


@pytest.mark.parametrize("op_name", OPS)
def test_custom_op_gradients_match_reference(op_name):
    op = CATALOG.op(op_name)
    inputs = differentiable_inputs(op)
    output = custom_op(op)(*inputs)
    grad_output = torch.randn_like(output)
    flags = [meta.differentiable for meta in op.inputs]
    expected = autograd_gradients(reference(op), inputs, grad_output, flags)
    actual = autograd_gradients(custom_op(op), inputs, grad_output, flags)
    for want, got in zip(expected, actual):
        if want is not None:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op_name", OPS)
def test_func_grad_and_vmap(op_name):
    op = CATALOG.op(op_name)
    fn = function(op)
    inputs = differentiable_inputs(op)
    first = next(p for p, meta in enumerate(op.inputs) if meta.differentiable)

    def loss(value):
        arguments = list(inputs)
        arguments[first] = value
        return fn(*arguments).sum()

    expected = autograd_gradients(lambda *xs: reference(op)(*xs).sum(), inputs, None,
                                  [p == first for p in range(len(inputs))])[first]
    torch.testing.assert_close(torch.func.grad(loss)(inputs[first].detach()), expected)

    batch = [torch.stack([t.detach(), t.detach() * 0.5 + 0.25 if t.is_floating_point() else t.flip(-1)])
             for t in inputs]
    in_dims = tuple(0 for _ in batch)
    mapped = torch.vmap(fn, in_dims=in_dims)(*batch)
    looped = torch.stack([fn(*[b[i] for b in batch]) for i in range(2)])
    torch.testing.assert_close(mapped, looped)


# Every dtype for every op under `-m slow` (CI). By default every op in float32 or float64 (taken in turn), and
# the half-precision types for one op per kind of generated code.
def _by_default(number: int, name: str, dtype) -> bool:
    if dtype in (torch.float32, torch.float64):
        return number % 2 == (dtype == torch.float64)
    return name in REPRESENTATIVE_OPS


@pytest.mark.parametrize("op_name, dtype", [
    pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}",
                 marks=[] if _by_default(number, name, dtype) else [pytest.mark.slow])
    for number, name in enumerate(OPS) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)])
def test_gradients_keep_the_input_dtype(op_name, dtype):
    op = CATALOG.op(op_name)
    module = generated_module(op.name)
    inputs = make_inputs(op, SMALL, dtype)
    output = getattr(module, naming.forward(op.name))(*inputs)
    assert output.dtype == dtype
    grads = call_backward(op, module, torch.ones_like(output), inputs, output)
    for meta, tensor, grad in zip(op.inputs, inputs, grads):
        if meta.differentiable:
            assert grad.dtype == dtype and grad.shape == tensor.shape


# Every op through torch.compile's graph capture and AOTAutograd (fake kernel, registered backward, fullgraph)
# with the aot_eager backend; the default backend, Inductor, which also compiles the traced backward into C++
# kernels (over ten seconds of compiler on a cold cache), on one representative op: a matrix-free loss with
# the fused log-softmax kernel and its in-place one-hot term.
INDUCTOR_OPS = [name for name in ("cross_entropy",) if name in OPS]
COMPILE_CASES = [*[pytest.param(name, "aot_eager", marks=[] if name in REPRESENTATIVE_OPS else pytest.mark.slow)
                   for name in OPS],
                 *[pytest.param(name, "inductor", marks=pytest.mark.slow) for name in INDUCTOR_OPS]]


@pytest.mark.parametrize("op_name, backend", COMPILE_CASES)
def test_compiled_custom_op_matches_eager(op_name, backend):
    op = CATALOG.op(op_name)
    torch._dynamo.reset()
    inputs = differentiable_inputs(op)
    flags = [meta.differentiable for meta in op.inputs]
    grad_output = torch.randn_like(custom_op(op)(*inputs))
    compiled = torch.compile(custom_op(op), fullgraph=True, backend=backend)
    eager = autograd_gradients(custom_op(op), inputs, grad_output, flags)
    actual = autograd_gradients(compiled, inputs, grad_output, flags)
    torch.testing.assert_close(compiled(*inputs), custom_op(op)(*inputs))
    for want, got in zip(eager, actual):
        if want is not None:
            torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@pytest.mark.parametrize("op_name", OPS)
def test_gradients_on_cuda_match_the_cpu(op_name):
    op = CATALOG.op(op_name)
    module = generated_module(op.name)
    inputs = make_inputs(op, SMALL)
    output = getattr(module, naming.forward(op.name))(*inputs)
    grad_output = torch.randn_like(output)
    on_cpu = call_backward(op, module, grad_output, inputs, output)
    on_gpu = call_backward(op, module, grad_output.cuda(), [t.cuda() for t in inputs], output.cuda())
    for want, got in zip(on_cpu, on_gpu):
        if want is not None:
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), want)


@pytest.mark.parametrize("op_name", OPS)
def test_jacrev_and_per_sample_gradients(op_name):
    """jacrev runs the backward under vmap with a batched grad_output and unbatched inputs; per-sample
    gradients (vmap of grad) batch everything. Both must agree with the reference op's."""
    op = CATALOG.op(op_name)
    fn, ref = function(op), reference(op)
    inputs = [t.detach() for t in differentiable_inputs(op)]
    wrt = [p for p, meta in enumerate(op.inputs) if meta.differentiable]
    for p in wrt:
        jacobians = [torch.func.jacrev(f, argnums=p)(*inputs) for f in (fn, ref)]
        torch.testing.assert_close(jacobians[0], jacobians[1], msg=lambda m: f"input {p}: {m}")

    first = wrt[0]

    def at(f, value, *others):
        arguments = list(others)
        arguments.insert(first, value)
        return f(*arguments)

    batch = [torch.stack([t, t * 0.5 + 0.25 if t.is_floating_point() else t.flip(-1)]) for t in inputs]
    per_sample = [torch.vmap(torch.func.grad(lambda v, *o: at(f, v, *o).sum()))(batch[first], *batch[:first],
                                                                               *batch[first + 1:])
                  for f in (fn, ref)]
    torch.testing.assert_close(per_sample[0], per_sample[1])
