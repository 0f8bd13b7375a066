"""The seed article's network, backward chained by hand through the generated functions only."""

import pytest
import torch

from conftest import generated_module


def seed_data(dtype):
    torch.manual_seed(0)
    data = dict(input=torch.randn(1000, 784), target=torch.randn(1000),
                w1=torch.randn(784, 50), b1=torch.zeros(50), w2=torch.randn(50, 1), b2=torch.zeros(1))
    # The article's weights are scaled so the activations stay in range.
    data["w1"] = data["w1"] / 784 ** 0.5
    data["w2"] = data["w2"] / 50 ** 0.5
    return {name: value.to(dtype) for name, value in data.items()}


def autograd_gradients(data):
    leaves = {name: value.clone().requires_grad_(name != "target") for name, value in data.items()}
    l1 = leaves["input"] @ leaves["w1"] + leaves["b1"]
    l2 = torch.relu(l1)
    output = l2 @ leaves["w2"] + leaves["b2"]
    loss = torch.nn.functional.mse_loss(output.squeeze(-1), leaves["target"])
    loss.backward()
    return loss, {name: leaves[name].grad for name in ("input", "w1", "b1", "w2", "b2")}


def generated_gradients(data, style):
    linear, relu, mse = (generated_module(name, style) for name in ("linear", "relu", "mse"))
    l1 = linear.linear_forward(data["input"], data["w1"], data["b1"])
    l2 = relu.relu_forward(l1)
    output = linear.linear_forward(l2, data["w2"], data["b2"])
    prediction = output.squeeze(-1)
    loss = mse.mse_forward(prediction, data["target"])

    grad_prediction, _ = mse.mse_backward(torch.ones_like(loss), prediction, data["target"],
                                          needs_input_grad=(True, False))
    grad_output = grad_prediction.unsqueeze(-1)        # backward of the squeeze(-1)
    grad_l2, grad_w2, grad_b2 = linear.linear_backward(grad_output, l2, data["w2"], data["b2"])
    (grad_l1,) = relu.relu_backward(grad_l2, l1, l2)
    grad_input, grad_w1, grad_b1 = linear.linear_backward(grad_l1, data["input"], data["w1"], data["b1"])
    return loss, dict(input=grad_input, w1=grad_w1, b1=grad_b1, w2=grad_w2, b2=grad_b2)


@pytest.mark.parametrize("style", ["contraction", "broadcast"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_seed_network_matches_autograd(style, dtype):
    data = seed_data(dtype)
    expected_loss, expected = autograd_gradients(data)
    loss, actual = generated_gradients(data, style)
    torch.testing.assert_close(loss, expected_loss.detach())
    for name in ("input", "w1", "b1", "w2", "b2"):
        assert actual[name].shape == data[name].shape, name
        assert actual[name].dtype == dtype, name
        assert actual[name].abs().max() > 0, f"{name}: an all-zero gradient would prove nothing"
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"grad of {name}: {m}")


def test_sgd_training_with_generated_functions_tracks_torch():
    """A few SGD steps through the generated autograd Functions give torch's losses step by step."""
    data = seed_data(torch.float64)
    linear, relu, mse = (generated_module(name) for name in ("linear", "relu", "mse"))
    names = ("w1", "b1", "w2", "b2")
    generated = {name: data[name].clone().requires_grad_() for name in names}
    plain = {name: data[name].clone().requires_grad_() for name in names}

    def generated_loss(p):
        hidden = relu.relu(linear.linear(data["input"], p["w1"], p["b1"]))
        return mse.mse(linear.linear(hidden, p["w2"], p["b2"]).squeeze(-1), data["target"])

    def plain_loss(p):
        hidden = torch.relu(data["input"] @ p["w1"] + p["b1"])
        return torch.nn.functional.mse_loss((hidden @ p["w2"] + p["b2"]).squeeze(-1), data["target"])

    losses = []
    for _ in range(5):
        for params, loss_fn in ((generated, generated_loss), (plain, plain_loss)):
            loss = loss_fn(params)
            loss.backward()
            with torch.no_grad():
                for value in params.values():
                    value -= 0.05 * value.grad
                    value.grad = None
            losses.append(loss.detach())
        torch.testing.assert_close(losses[-2], losses[-1])
    assert losses[-1] < losses[0], "training should reduce the loss, or the comparison proves little"
