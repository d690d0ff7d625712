"""The fast layers (``--ops fast``, the default) compute what torch's own layers compute."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import networks
from dcbs import fast_ops
from dcbs.fast_ops import AvgPool2x2, FastConvBlock, apply_ops, build_model, conv_instance_norm
from dcbs.samplers import ClassSampler
from test_kernels import _step, assert_same_update, check_flag_through_the_command_line


@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (3, 5)])
def test_avgpool_forward_and_backward_equal_torch(hw):
    x = torch.randn(3, 4, *hw, dtype=torch.float64, requires_grad=True)
    fast, plain = AvgPool2x2(), torch.nn.AvgPool2d(2, 2)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-15)
    w = torch.randn_like(plain(x))
    g_fast, = torch.autograd.grad((fast(x) * w).sum(), x)
    g_plain, = torch.autograd.grad((plain(x) * w).sum(), x)
    torch.testing.assert_close(g_fast, g_plain, rtol=0, atol=1e-15)   # odd row/column: zero gradient


def test_avgpool_refuses_a_map_smaller_than_its_window_as_torch_does():
    with pytest.raises(RuntimeError, match="too small"):
        AvgPool2x2()(torch.randn(1, 2, 1, 5))


def test_avgpool_double_backward_and_vmap_grad():
    """The synthetic side differentiates through the gradient (create_graph), the batched kernel
    takes vmap(grad) over classes: both must see the same function as torch's pooling."""
    fast = AvgPool2x2()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fast(t) ** 2, (x,))
    xs = torch.randn(4, 2, 3, 6, 6, dtype=torch.float64)
    got = vmap(grad(lambda t: (fast(t) ** 3).sum()))(xs)
    want = vmap(grad(lambda t: (F.avg_pool2d(t, 2, 2) ** 3).sum()))(xs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_float32_rounding_of_the_fast_pooling_is_tiny():
    x = torch.randn(16, 128, 32, 32)
    assert (AvgPool2x2()(x) - F.avg_pool2d(x, 2, 2)).abs().max() < 1e-6


def test_layers_choice_keeps_weights_and_state_dict():
    torch.manual_seed(0)
    fast = build_model("ConvNet", 3, 10, (32, 32), ops="fast")
    torch.manual_seed(0)
    plain = build_model("ConvNet", 3, 10, (32, 32), ops="plain")
    assert [type(m) for m in fast.modules() if isinstance(m, torch.nn.AvgPool2d)] == [AvgPool2x2] * 3
    assert [type(m) for m in plain.modules() if isinstance(m, torch.nn.AvgPool2d)] == [torch.nn.AvgPool2d] * 3
    assert [b.fuse for b in fast.blocks] == [True, False, False]       # only the first block
    assert [type(b) for b in plain.blocks] == [networks.ConvBlock] * 3
    sd_f, sd_p = fast.state_dict(), plain.state_dict()
    assert sd_f.keys() == sd_p.keys() and all(torch.equal(sd_f[k], sd_p[k]) for k in sd_f)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(fast(x)[0], plain(x)[0], rtol=1e-5, atol=1e-6)


def test_ops_are_applied_to_a_built_model():
    """One switch, on the model: networks.py builds the plain modules, ``apply_ops`` makes a ConvNet
    fast in place (idempotent), "plain" and other models are left as they are; no process state."""
    assert type(build_model("ConvNet", 1, 10, (28, 28)).blocks[0][3]) is AvgPool2x2          # default: fast
    assert type(build_model("ConvNet", 1, 10, (28, 28), ops="plain").blocks[0][3]) is torch.nn.AvgPool2d
    plain = networks.build_model("ConvNet", 1, 10, (28, 28))
    assert type(plain) is networks.ConvNet and type(plain.blocks[0]) is networks.ConvBlock
    assert apply_ops(plain, "plain") is plain and type(plain.blocks[0]) is networks.ConvBlock
    fast = apply_ops(plain, "fast")
    assert fast is plain and isinstance(fast, networks.ConvNet) and fast.blocks[0].fuse
    assert apply_ops(fast, "fast").blocks[0] is fast.blocks[0]
    assert type(networks.build_model("ConvNet", 1, 10, (28, 28)).blocks[0]) is networks.ConvBlock   # unchanged
    lenet = networks.build_model("LeNet", 1, 10, (28, 28))
    assert apply_ops(lenet, "fast") is lenet and type(lenet) is networks.LeNet
    with pytest.raises(ValueError, match="fast, plain"):
        apply_ops(lenet, "fused")
    with pytest.raises(ValueError, match="fast, plain"):
        build_model("ConvNet", 1, 10, (28, 28), ops="fused")
    assert not hasattr(networks, "set_ops") and not hasattr(networks, "ops")


def _conv_norm(cin, pad, dtype=torch.float64):
    conv, norm = torch.nn.Conv2d(cin, 16, 3, padding=pad), torch.nn.GroupNorm(16, 16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    return conv.to(dtype), norm.to(dtype)


@pytest.mark.parametrize("cin,hw,pad,act", [(1, (28, 28), 3, torch.nn.ReLU(inplace=True)),
                                            (3, (32, 32), 1, torch.nn.ReLU(inplace=True)),
                                            (3, (7, 5), 1, torch.nn.Sigmoid()), (2, (6, 6), 0, None)])
def test_fused_conv_instance_norm_is_the_plain_layers(cin, hw, pad, act):
    """float64: forward and every gradient (weights, norm affine, input) equal the plain layers'
    to 1e-12; the conv bias cancels in the norm, so its gradient is an exact zero (present, so
    autograd.grad over all parameters does not fail)."""
    conv, norm = _conv_norm(cin, pad)
    x = torch.randn(5, cin, *hw, dtype=torch.float64, requires_grad=True)
    plain = norm(conv(x)) if act is None else act(norm(conv(x)))
    fused = conv_instance_norm(x, conv, norm, act)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    w = torch.randn_like(plain)
    params = [conv.weight, norm.weight, norm.bias, x]
    *got, g_bias = torch.autograd.grad((fused * w).sum(), params + [conv.bias])
    for a, b in zip(got, torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(g_bias, torch.zeros_like(g_bias))


def test_fused_conv_instance_norm_channels_last_output():
    """``channels_last=True`` takes the matmul the other way round: the same map (float64), with
    channels-last strides, and the same gradients."""
    conv, norm = _conv_norm(3, 1)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    want = conv_instance_norm(x, conv, norm, torch.nn.ReLU())
    got = conv_instance_norm(x, conv, norm, torch.nn.ReLU(), channels_last=True)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gw = torch.autograd.grad(want.square().sum(), [x, conv.weight])
    gg = torch.autograd.grad(got.square().sum(), [x, conv.weight])
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_conv_instance_norm_double_backward_and_vmap():
    """The synthetic side differentiates the gradient (create_graph), and the batched kernel takes
    per-class gradients with vmap(grad): both go through the fused block."""
    conv, norm = _conv_norm(1, 1)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: conv_instance_norm(t, conv, norm, torch.nn.Tanh()), (x,))
    from torch.func import functional_call
    fused, plain = FastConvBlock(conv, norm, torch.nn.Tanh(), fuse=True), networks.ConvBlock(conv, norm, torch.nn.Tanh())
    params = {k: v.detach() for k, v in fused.named_parameters()}
    xs = torch.randn(3, 4, 1, 6, 6, dtype=torch.float64)

    def grads(block):
        return vmap(grad(lambda p, xc: functional_call(block, p, (xc,)).pow(3).sum()), in_dims=(None, 0))(params, xs)

    got, want = grads(fused), grads(plain)
    for k in ("0.weight", "1.weight", "1.bias"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    assert torch.equal(got["0.bias"], torch.zeros_like(got["0.bias"]))


def test_fused_block_only_where_it_holds():
    """Fused: the fast layers' first ConvNet block with an instance norm and few input taps, on a
    CPU input. Not: plain layers, batch norm, a wide input (36 taps), another device."""
    assert build_model("ConvNet", 3, 10, (32, 32)).blocks[0].fuse
    assert not isinstance(build_model("ConvNet", 3, 10, (32, 32), ops="plain").blocks[0], FastConvBlock)
    assert not build_model("ConvNetBN", 3, 10, (32, 32)).blocks[0].fuse
    assert not build_model("ConvNet", 4, 10, (32, 32)).blocks[0].fuse
    conv, norm = _conv_norm(1, 1, torch.float32)
    block = FastConvBlock(conv, norm, torch.nn.ReLU(), fuse=True)
    assert block.fuse and "fuse=True" in repr(block)
    assert block.to("meta")(torch.randn(2, 1, 6, 6, device="meta")).shape == (2, 16, 6, 6)   # plain path


@pytest.mark.parametrize("cin,hw,pad,act", [(1, (28, 28), 3, torch.nn.ReLU(inplace=True)),
                                            (1, (9, 7), 1, torch.nn.Sigmoid()),
                                            (3, (8, 8), 1, torch.nn.LeakyReLU(0.01))])
def test_first_block_with_its_pooling_folded_in_is_the_plain_layers(cin, hw, pad, act):
    """``conv_instance_norm_pool2x2`` (the compiled inference path) equals conv, instance norm,
    act and 2x2 average pooling in float64 (1e-12), an odd map's last row dropped as the pooling
    drops it, and comes out channels-last for the blocks after it."""
    conv, norm = _conv_norm(cin, pad)
    x = torch.randn(5, cin, *hw, dtype=torch.float64)
    want = torch.nn.AvgPool2d(2, 2)(act(norm(conv(x))))
    got = fast_ops.conv_instance_norm_pool2x2(x, conv, norm, act)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)


def test_first_block_folds_its_pooling_only_while_compiling_without_a_gradient(monkeypatch):
    """ConvBlock takes the folded block when torch.compile traces a call that needs no gradient,
    for one-channel inputs (9 taps; CIFAR's 27 measured slower); elsewhere the fused block as
    before. ``is_compiling`` is patched, so the dispatch is checked eagerly in float64."""
    calls = []
    real = fast_ops.conv_instance_norm_pool2x2
    monkeypatch.setattr(fast_ops, "conv_instance_norm_pool2x2", lambda *a: calls.append(a[0].shape) or real(*a))
    plain, fast = _pair("ConvNet", 1, (28, 28))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        want = plain(x)[0]
        fast(x)
    assert calls == [] and fast.blocks[0].pool_fusable
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        got, feats = fast(x)
    assert calls == [x.shape] and feats[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    fast(x)[0].sum().backward()                              # a gradient is needed: not folded
    assert len(calls) == 1
    cifar = build_model("ConvNet", 3, 10, (32, 32))
    with torch.no_grad():
        cifar(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1 and not cifar.blocks[0].pool_fusable
    assert not build_model("ConvNetMP", 1, 10, (28, 28)).blocks[0].pool_fusable     # max pooling
    assert not build_model("ConvNetNP", 1, 10, (28, 28)).blocks[0].pool_fusable     # no pooling


@pytest.mark.parametrize("cin,hw,pad", [(1, (28, 28), 3), (3, (9, 7), 1), (3, (6, 6), 0)])
def test_first_block_relu_pool_is_the_plain_layers(monkeypatch, cin, hw, pad):
    """``conv_relu_pool2x2`` (the fused first block with its ReLU and pooling done per chunk, in
    window-major order) equals conv, instance norm, ReLU and 2x2 average pooling in float64: the
    output in NCHW and channels-last, and, where only the weights need a gradient, every weight
    gradient (the conv bias's an exact zero); an odd map's last row/column is dropped. Chunks of
    one sample in float64; in float32 (and bf16 under autocast), chunks of two over five samples (a
    partial last chunk), the forward is ``conv_instance_norm`` followed by ``AvgPool2x2`` to the bit."""
    monkeypatch.setattr(fast_ops, "_CHUNK_BYTES", 1)                # one sample per chunk
    conv, norm = _conv_norm(cin, pad)
    x = torch.randn(5, cin, *hw, dtype=torch.float64)
    want = torch.nn.AvgPool2d(2, 2)(torch.relu(norm(conv(x))))
    for cl in (False, True):
        with torch.no_grad():
            got = fast_ops.conv_relu_pool2x2(x, conv, norm, channels_last=cl)
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
        got = fast_ops.conv_relu_pool2x2(x, conv, norm, channels_last=cl)
        assert got.grad_fn.name() == "_ReluPool2x2FnBackward"
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        w = torch.randn_like(want)
        params = [conv.weight, norm.weight, norm.bias]
        *g, g_bias = torch.autograd.grad((got * w).sum(), params + [conv.bias])
        for a, b in zip(g, torch.autograd.grad((want * w).sum(), params, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
        assert torch.equal(g_bias, torch.zeros_like(g_bias))
    monkeypatch.setattr(fast_ops, "_CHUNK_BYTES", 2 * 16 * hw[0] * hw[1] * 4)   # two samples per chunk
    conv32, norm32 = conv.float(), norm.float()
    x32 = x.float()
    with torch.no_grad():
        for cl in (False, True):
            ref = AvgPool2x2()(conv_instance_norm(x32, conv32, norm32, torch.nn.ReLU(), channels_last=cl))
            assert torch.equal(fast_ops.conv_relu_pool2x2(x32, conv32, norm32, channels_last=cl), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):                  # --precision bf16: the same bf16 map
            ref = AvgPool2x2()(conv_instance_norm(x32, conv32, norm32, torch.nn.ReLU()))
            got = fast_ops.conv_relu_pool2x2(x32, conv32, norm32)
        assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)


@pytest.mark.parametrize("hw", [(8, 8), (7, 5)])
def test_channels_last_training_block_is_the_plain_layers(monkeypatch, hw):
    """``_NhwcTrainBlockFn`` (conv, instance norm, ReLU, 2x2 pooling channels-last, its backward
    per chunk in closed form) equals the layers in order in float64: output, the input's and the
    weights' gradients (1e-12; the conv bias's an exact zero), for even and odd maps, with a partial
    last chunk; gradcheck; and in float32 its forward is ``nhwc_block``'s to the bit."""
    conv, norm = _conv_norm(4, 1)
    x = torch.randn(5, 4, *hw, dtype=torch.float64, requires_grad=True)
    want = torch.nn.AvgPool2d(2, 2)(torch.relu(norm(conv(x))))
    monkeypatch.setattr(fast_ops, "_CHUNK_BYTES", 2 * 16 * hw[0] * hw[1] * 8)   # two samples per chunk
    fn = lambda t, *p: fast_ops._NhwcTrainBlockFn.apply(t, *p, conv, norm.eps)
    params = [conv.weight, conv.bias, norm.weight, norm.bias]
    got = fn(x, *params)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn_like(want)
    gx, gw, gb, gg, gbeta = torch.autograd.grad((got * w).sum(), [x, *params])
    for a, b in zip((gx, gw, gg, gbeta), torch.autograd.grad((want * w).sum(), [x, conv.weight, norm.weight, norm.bias])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert torch.equal(gb, torch.zeros_like(gb))
    small = torch.randn(3, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (small, *params))
    conv32, norm32 = conv.float(), norm.float()
    x32 = x.detach().float()
    with torch.no_grad():
        ref = fast_ops.nhwc_block(x32, conv32, norm32, torch.nn.ReLU(), AvgPool2x2())
        assert torch.equal(fn(x32, *[p.float() for p in params]), ref)


class _ReluPoolBlock(torch.nn.Sequential):
    def forward(self, x):
        return fast_ops.conv_relu_pool2x2(x, self[0], self[1])


def test_first_order_paths_have_a_second_derivative():
    """The chunked first block and the channels-last training blocks have hand-written backward
    passes; asked to build a graph (create_graph: a real-side gradient differentiated again) they
    differentiate a recomputation in plain ops, so a second derivative is the plain layers' one:
    gradgradcheck of both, and a whole ConvNet's against the plain layers. DC's synthetic side (its
    input needs a gradient) takes the layers in order and differentiates twice."""
    from torch.func import functional_call
    conv, norm = _conv_norm(2, 1)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    block = _ReluPoolBlock(conv, norm)
    first = lambda w, g, b: functional_call(block, {"0.weight": w, "1.weight": g, "1.bias": b}, (x,))
    params = [t.detach().clone().requires_grad_() for t in (conv.weight, norm.weight, norm.bias)]
    assert first(*params).grad_fn.name() == "_ReluPool2x2FnBackward"
    assert torch.autograd.gradgradcheck(first, params)
    conv, norm = _conv_norm(4, 1)
    fn = lambda t, *p: fast_ops._NhwcTrainBlockFn.apply(t, *p, conv, norm.eps)
    small = torch.randn(3, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fn, (small, conv.weight, conv.bias, norm.weight, norm.bias))
    plain, fast = _pair("ConvNet", 1, (28, 28))
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (4,))

    def second(net):
        g = torch.autograd.grad(F.cross_entropy(net(x)[0], y), list(net.parameters()), create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), list(net.parameters()))
    for a, b in zip(second(fast), second(plain)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    net = build_model("ConvNet", 1, 10, (28, 28))
    xs = torch.randn(4, 1, 28, 28, requires_grad=True)                       # the synthetic side
    g = torch.autograd.grad(F.cross_entropy(net(xs)[0], y), list(net.parameters()), create_graph=True)
    (gx,) = torch.autograd.grad(sum(t.square().sum() for t in g), xs)
    assert gx.abs().sum() > 0


def _pair(model, channel, im_size, dtype=torch.float64):
    torch.manual_seed(3)
    plain = build_model(model, channel, 10, im_size, ops="plain").to(dtype)
    fast = build_model(model, channel, 10, im_size, ops="fast").to(dtype)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("model,channel,im_size", [("ConvNet", 1, (28, 28)), ("ConvNet", 3, (32, 32)),
                                                   ("ConvNetD4", 3, (32, 32)), ("ConvNetNN", 1, (28, 28)),
                                                   ("ConvNetAS", 3, (30, 30)), ("ConvNetAL", 3, (32, 32)),
                                                   ("ConvNetNP", 1, (28, 28)), ("ConvNetW32", 3, (32, 32))])
def test_channels_last_inference_is_the_plain_layers(model, channel, im_size):
    """Without a gradient (inference mode, no_grad, or frozen weights and input as DM's real side)
    the fast blocks after the first run channels-last: the same logits and block outputs as the
    plain layers (float64: 1e-12), including odd maps (30x30 -> 15 -> 7) and no norm/no pooling."""
    plain, fast = _pair(model, channel, im_size)
    assert all(b.nhwc for b in fast.blocks[1:]) and not any(isinstance(b, FastConvBlock) for b in plain.blocks)
    x = torch.randn(5, channel, *im_size, dtype=torch.float64)
    want, want_feats = plain(x)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            got, feats = fast(x)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        for f, w in zip(feats, want_feats):
            torch.testing.assert_close(f, w.detach(), rtol=1e-12, atol=1e-12)
        assert feats[-1].is_contiguous(memory_format=torch.channels_last) and not feats[-1].is_contiguous()
        if fast.blocks[0].fuse:                         # the fused first block feeds them channels-last
            assert fast.blocks[0].channels_last_out and not feats[0].is_contiguous()
    for p in fast.parameters():
        p.requires_grad_(False)
    emb, (_, feats) = fast.embed(x), fast(x)                # grad mode on, nothing to differentiate
    assert feats[-1].is_contiguous(memory_format=torch.channels_last) and not emb.requires_grad
    torch.testing.assert_close(emb, plain.embed(x).detach(), rtol=1e-12, atol=1e-12)


def test_channels_last_training_only_where_the_call_is_differentiated_once():
    """A call whose input needs a gradient (the synthetic side, which DC differentiates twice) runs
    the layers in order in NCHW, and its gradients are the plain layers'; one whose input needs none
    (real batches, training steps) runs the blocks channels-last and the first block's chunked
    backward; under bf16 autocast the blocks after the first run in order. The float32 inference
    logits agree with the plain layers' to rounding."""
    plain, fast = _pair("ConvNet", 3, (32, 32))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _, feats = fast(x)                                     # weights need a gradient, the input not
    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f in feats)
    assert feats[1].grad_fn.name() == "_NhwcTrainBlockFnBackward"
    assert feats[0].grad_fn.name() == "_ReluPool2x2FnBackward"
    xg = x.clone().requires_grad_(True)
    out, feats = fast(xg)
    assert all(f.is_contiguous() for f in feats)
    gx, *gw = torch.autograd.grad(out.square().sum(), [xg, *fast.parameters()])
    xp = x.clone().requires_grad_(True)
    gp, *gwp = torch.autograd.grad(plain(xp)[0].square().sum(), [xp, *plain.parameters()])
    for a, b in zip([gx, *gw], [gp, *gwp]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    plain32, fast32 = _pair("ConvNet", 1, (28, 28), torch.float32)
    x32 = torch.randn(64, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, feats = fast32(x32)
    assert feats[0].grad_fn.name() == "_ReluPool2x2FnBackward" and feats[0].is_contiguous()
    assert all(f.grad_fn.name() != "_NhwcTrainBlockFnBackward" and f.is_contiguous() for f in feats[1:])
    with torch.inference_mode():
        torch.testing.assert_close(fast32(x32)[0], plain32(x32)[0], rtol=1e-4, atol=1e-5)
    assert not build_model("ConvNetBN", 3, 10, (32, 32)).blocks[1].nhwc        # batch norm: layers in order
    mp = build_model("ConvNetMP", 3, 10, (32, 32))                        # max pooling: layers in order,
    assert not mp.blocks[1].nhwc and not mp.blocks[0].channels_last_out    # and NCHW out of the fused block
    with torch.inference_mode():
        assert all(f.is_contiguous() for f in mp(torch.randn(2, 3, 32, 32))[1])
    assert not build_model("ConvNetNN", 3, 10, (32, 32)).blocks[1].nhwc_train   # no norm: trains in order
    assert "nhwc_inference=True" in repr(fast.blocks[1])
    assert fast.to("meta")(x.to("meta"))[0].shape == (4, 10)                   # other devices: in order


def _grads(model, ops, dtype, x, y):
    torch.manual_seed(1)
    net = build_model(model, 1, 10, (28, 28), ops=ops).to(dtype)
    g = torch.autograd.grad(F.cross_entropy(net(x.to(dtype))[0], y), list(net.parameters()))
    return torch.cat([t.flatten() for t in g])


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN", "ConvNetD4"])
def test_real_gradients_equal_between_fast_and_plain_layers(model):
    """float64: the same function (1e-10). float32: rounding only, judged against float64. How far
    float32 lands from float64 depends on the batch (1e-6 to 2e-3 relative for plain layers over a
    few seeds: instance norm over a 2x2 map is ill-conditioned), so the fast layers must be no less
    accurate than the plain ones rather than within a fixed bound; a wrong layer is off by O(1)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    f64, p64 = _grads(model, "fast", torch.float64, x, y), _grads(model, "plain", torch.float64, x, y)
    assert (f64 - p64).norm() <= 1e-10 * p64.norm()
    f32, p32 = _grads(model, "fast", torch.float32, x, y), _grads(model, "plain", torch.float32, x, y)
    assert (f32 - p32).norm() <= 1e-3 * p32.norm()
    err_fast, err_plain = (f32 - p64.float()).norm(), (p32 - p64.float()).norm()
    assert err_fast <= 5 * err_plain                     # no less accurate than the plain layers


@pytest.mark.parametrize("kernel,model,method,ipc", [("loop", "ConvNet", "DC", 1), ("loop", "ConvNet", "DSA", 2),
                                                     ("loop", "ConvNetBN", "DC", 1), ("loop", "ConvNet", "DM", 2),
                                                     ("batched", "ConvNet", "DC", 2)])
def test_fast_layers_make_the_same_update_as_plain_layers(digits, kernel, model, method, ipc):
    """One whole iteration (real gradients, the synthetic side's double backward, the matching
    loss) with fast pooling against the straightforward path: loop kernel and torch's pooling."""
    sampler = ClassSampler(digits.indices_class, 11)
    row_p, syn_p, start = _step("loop", model, method, digits, sampler, ipc, ops="plain")
    row_f, syn_f, _ = _step(kernel, model, method, digits, sampler, ipc, ops="fast")
    assert not torch.equal(syn_p, start)
    assert_same_update(syn_f, syn_p, start)
    assert row_f["loss"] == pytest.approx(row_p["loss"], rel=1e-4)


def test_ops_flag_through_the_command_line(tmp_path):
    check_flag_through_the_command_line(tmp_path, "ops", ("plain", "fast"), ipc=1)
