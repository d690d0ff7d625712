"""Double backward through every model, with the CPU fast path on and off: one SGD step taken with
``create_graph=True`` (w1 = w0 - lr * grad(loss(w0), w0)), the loss after that step differentiated
w.r.t. the initial weights w0. The images need no gradient, so the fast ConvNet takes its
hand-written backward passes in the first step, and those must be differentiable too."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import networks
from dcbs.fast_ops import build_model

LR = 0.1


def _meta_gradient(name, ops, channel, im_size):
    """d loss(w1) / d w0 in float64, with w1 one SGD step from w0 and the step's graph kept."""
    torch.manual_seed(0)
    net = build_model(name, channel, 10, im_size, ops=ops).double()
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(3, channel, *im_size, generator=g, dtype=torch.float64) for _ in range(2))
    y0, y1 = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    assert not x0.requires_grad and not x1.requires_grad
    w0 = dict(net.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(x0)[0], y0), list(w0.values()), create_graph=True)
    w1 = {k: w - LR * gk for (k, w), gk in zip(w0.items(), grads)}
    loss1 = F.cross_entropy(functional_call(net, w1, (x1,))[0], y1)
    return dict(zip(w0, torch.autograd.grad(loss1, list(w0.values()))))


@functools.lru_cache(maxsize=None)
def _plain(name, channel, im_size):
    return _meta_gradient(name, "plain", channel, im_size)


@pytest.mark.parametrize("ops", ["fast", "plain"])
@pytest.mark.parametrize("name", sorted(networks.MODELS))
def test_gradient_through_an_sgd_step_equals_the_plain_models(name, ops):
    got, want = _meta_gradient(name, ops, 1, (28, 28)), _plain(name, 1, (28, 28))
    assert got.keys() == want.keys()
    assert any(t.abs().sum() > 0 for t in want.values())
    for k in want:       # a conv bias before an instance norm: an exact zero (fast) or rounding noise (plain)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-12, msg=f"{name} --ops {ops}: {k}")


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetD4", "ConvNetNP", "ConvNetAS"])
def test_gradient_through_an_sgd_step_on_cifar_shaped_images(name):
    """Three input channels: 27 taps per first-block output, the largest the fused block takes."""
    got, want = _meta_gradient(name, "fast", 3, (32, 32)), _plain(name, 3, (32, 32))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-12, msg=f"{name}: {k}")


def test_the_sgd_step_runs_the_hand_written_backward_passes():
    """What the test above differentiates twice: the fast ConvNet's first block takes its chunked
    ReLU and pooling, the later blocks their channels-last training block, when the images need no
    gradient."""
    net = build_model("ConvNet", 1, 10, (28, 28)).double()
    _, feats = net(torch.randn(2, 1, 28, 28, dtype=torch.float64))
    assert feats[0].grad_fn.name() == "_ReluPool2x2FnBackward"
    assert [f.grad_fn.name() for f in feats[1:]] == ["_NhwcTrainBlockFnBackward"] * 2
