"""The CPU fast path of the ConvNet (``--ops fast``, the CPU default): the functions of
``networks.py``'s plain modules, computed faster on the CPU.

``apply_ops(model, "fast")`` swaps a built ConvNet's blocks for ``FastConvBlock`` (the same layer
modules: same parameters, state dict and initial weights) and its 2x2 average pooling for
``AvgPool2x2``; ``"plain"`` leaves the model as ``networks.py`` builds it. What the fast blocks run
on a CPU input:

* ``AvgPool2x2``: the pooling as two strided pairwise sums;
* the first block (conv, instance norm, act): ``conv_instance_norm``, one matmul per sample whose
  statistics come from the input patches; with ReLU and pooling in a call whose input needs no
  gradient, ``conv_relu_pool2x2`` (per chunk of samples in cache, a hand-written backward); while
  compiling a gradient-free call, ``conv_instance_norm_pool2x2``;
* the later blocks: ``nhwc_block`` channels-last in gradient-free calls, ``_NhwcTrainBlockFn``
  (channels-last, a hand-written backward) in calls whose network input needs no gradient.

Every path computes the plain layers' function up to rounding and supports what they support:
double backward (the hand-written backward passes differentiate a recomputation in plain ops when
asked to build a graph), ``torch.func`` transforms and other devices (the layers in order there).
tests/test_fast_ops.py and tests/test_double_backward.py check it; timings: docs/performance.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
from networks import ConvBlock, ConvNet

__all__ = ["OPS", "apply_ops", "build_model", "FastConvNet", "FastConvBlock", "AvgPool2x2", "conv_instance_norm",
           "conv_relu_pool2x2", "conv_instance_norm_pool2x2", "nhwc_block"]

# "fast": the blocks below on the CPU; "plain": torch's own modules, as the public reference code builds them
OPS = ("fast", "plain")


def apply_ops(model: nn.Module, ops: str) -> nn.Module:
    """``model`` (built by ``networks.build_model``) computed with ``ops``: "fast" makes a ConvNet a
    ``FastConvNet`` in place (its blocks ``FastConvBlock``s around the same layers, ``nn.AvgPool2d(2, 2)``
    as ``AvgPool2x2``) and returns it; other models, and "plain", are returned as they are. Draws no
    random numbers and keeps the parameters, so the state dict is unchanged."""
    if ops not in OPS:
        raise ValueError(f"unknown ops {ops!r}; choose one of: {', '.join(OPS)}")
    if ops == "plain" or not isinstance(model, ConvNet) or isinstance(model, FastConvNet):
        return model
    blocks = [FastConvBlock(*(_fast_pool(m) for m in block), fuse=d == 0) for d, block in enumerate(model.blocks)]
    for block, after in zip(blocks, blocks[1:]):
        block.channels_last_out = block.fuse and after.nhwc
        block.channels_last_train_out = block.relu_pool and after.nhwc_train
    model.blocks = nn.ModuleList(blocks)
    model.__class__ = FastConvNet      # the same module with the network-level dispatch below
    return model


def build_model(name: str, channel: int, num_classes: int, im_size=(32, 32), ops: str = "fast") -> nn.Module:
    """``networks.build_model`` with ``ops`` ("fast" or "plain"); the choice draws no random numbers,
    so both builds get the same weights from the same seed."""
    return apply_ops(networks.build_model(name, channel, num_classes, im_size), ops)


def _fast_pool(m: nn.Module) -> nn.Module:
    plain = (type(m) is nn.AvgPool2d and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2))
             and m.padding in (0, (0, 0)) and not m.ceil_mode and m.divisor_override is None)
    return AvgPool2x2() if plain else m


class FastConvNet(ConvNet):
    """A ConvNet whose blocks are ``FastConvBlock``s (``apply_ops``): it tells them whether a call's
    network input needs a gradient."""

    def forward_blocks(self, x):
        # a call whose input needs no gradient (real batches, training steps, inference) is usually
        # differentiated once w.r.t. the weights: its blocks may take the hand-written backward passes
        first_order = not _input_needs_grad(x)
        feats = []
        for block in self.blocks:
            x = block(x, first_order=first_order)
            feats.append(x)
        return x, feats


class FastConvBlock(ConvBlock):
    """A ConvNet block (conv -> [norm] -> act -> [pool], the same layers and state-dict keys) that
    picks its CPU fast path per call; on other devices it runs the layers in order.

    With ``fuse`` (the first block) conv, instance norm and act run as ``conv_instance_norm``.
    The other blocks (conv, an instance norm or none, an elementwise act, ``AvgPool2x2`` or none)
    run channels-last when nothing in the call needs a gradient (the test pass, DM's real
    embeddings): ``nhwc_block``; a fused first block followed by such a block
    (``channels_last_out``) then writes its map channels-last, so no layout conversion lies
    between them.

    In training, where the call is differentiated once (``FastConvNet.forward_blocks`` passes
    ``first_order`` when the network's input needs no gradient: the real batches' gradients, the
    inner loop's and evaluation's steps), a fused first block with ReLU and ``AvgPool2x2`` runs
    ``conv_relu_pool2x2`` and the blocks after it with an instance norm, ReLU and ``AvgPool2x2``
    (``nhwc_train``) run ``_NhwcTrainBlockFn``: channels-last convolutions, and the norm, ReLU and
    pooling per chunk in cache, forward and backward. The synthetic side (its input needs a
    gradient, differentiated twice) and bf16 autocast keep the layers in order.
    """

    def __init__(self, *layers: nn.Module, fuse: bool = False):
        super().__init__(*layers)
        self.fuse = bool(fuse) and len(layers) >= 3 and _fusable(layers[0], layers[1])
        self.nhwc = not self.fuse and _nhwc_layers(layers) is not None
        self.channels_last_out = False          # the fused block's map, where the next block is nhwc: apply_ops
        self.channels_last_train_out = False    # ... also in training, where the next block is nhwc_train
        # the fused block's pooling folded in while compiling: conv, norm, an elementwise act, AvgPool2x2
        self.pool_fusable = (self.fuse and len(layers) == 4 and type(layers[2]) in _ELEMENTWISE_ACTS
                             and type(layers[3]) is AvgPool2x2 and _taps(layers[0]) <= _POOL_FOLD_MAX_TAPS)
        # conv, norm, ReLU and AvgPool2x2 with the ReLU and pooling done in cache: conv_relu_pool2x2
        self.relu_pool = (self.fuse and len(layers) == 4 and type(layers[2]) is nn.ReLU
                          and type(layers[3]) is AvgPool2x2)
        # a channels-last block that trains channels-last too, where the call is differentiated once
        self.nhwc_train = (self.nhwc and len(layers) == 4 and _fusable(layers[0], layers[1], max_taps=None)
                           and type(layers[2]) is nn.ReLU and type(layers[3]) is AvgPool2x2)

    def forward(self, x, first_order: bool = False):
        """``first_order``: the caller (``FastConvNet.forward_blocks``) knows the network input needs
        no gradient, so a ``nhwc_train`` block may run ``_NhwcTrainBlockFn``."""
        if x.device.type == "cpu" and x.dim() == 4:
            if self.fuse:
                if self.pool_fusable and torch.compiler.is_compiling() and not _needs_grad(x, self):
                    return conv_instance_norm_pool2x2(x, self[0], self[1], self[2])
                if (self.relu_pool and not torch.compiler.is_compiling() and not _input_needs_grad(x)
                        and min(_conv_out_hw(x, self[0])) >= 2):
                    cl = self.channels_last_out and (not _needs_grad(x, self)
                                                     or self.channels_last_train_out and _trains_nhwc(first_order))
                    return conv_relu_pool2x2(x, self[0], self[1], channels_last=cl)
                x = conv_instance_norm(x, self[0], self[1], self[2],
                                       channels_last=self.channels_last_out and not _needs_grad(x, self))
                for layer in list(self)[3:]:
                    x = layer(x)
                return x
            if self.nhwc and not _needs_grad(x, self):
                return nhwc_block(x, *_nhwc_layers(list(self)))
            if self.nhwc_train and _trains_nhwc(first_order) and min(_conv_out_hw(x, self[0])) >= 2:
                conv, norm = self[0], self[1]
                return _NhwcTrainBlockFn.apply(x, conv.weight, conv.bias, norm.weight, norm.bias, conv, norm.eps)
        return super().forward(x)

    def extra_repr(self):
        return "fuse=True" if self.fuse else ("nhwc_inference=True" if self.nhwc else "")


_ELEMENTWISE_ACTS = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU)


def _needs_grad(x, module: nn.Module) -> bool:
    """Whether a call may need a gradient; True inside torch.func transforms (vmap cannot query
    channels-last strides), where the layers run in order."""
    return _input_needs_grad(x) or (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


def _trains_nhwc(first_order: bool) -> bool:
    """Whether ``nhwc_train`` blocks take this call: differentiated once, eager, not under autocast
    (``--precision bf16`` keeps the layers in order there, with their norms in fp32, as measured by
    its accuracy guard)."""
    return first_order and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")


def _input_needs_grad(x) -> bool:
    """Whether a call may need the gradient of its input (the synthetic side, a double backward
    through it); True inside torch.func transforms, as ``_needs_grad``."""
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    return transforms_active() or (torch.is_grad_enabled() and x.requires_grad)


def _conv_out_hw(x, conv: nn.Conv2d) -> tuple[int, int]:
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return x.shape[-2] + 2 * ph - kh + 1, x.shape[-1] + 2 * pw - kw + 1


def _nhwc_layers(layers):
    """``(conv, norm or None, act, pool or None)`` when ``nhwc_block`` can run these layers, else None."""
    layers = list(layers)
    conv = layers.pop(0) if layers and type(layers[0]) is nn.Conv2d else None
    instance_norm = layers and type(layers[0]) is nn.GroupNorm and layers[0].num_groups == layers[0].num_channels
    norm = layers.pop(0) if instance_norm else None
    act = layers.pop(0) if layers and type(layers[0]) in _ELEMENTWISE_ACTS else None
    pool = layers.pop(0) if layers and type(layers[0]) is AvgPool2x2 else None
    return (conv, norm, act, pool) if conv is not None and act is not None and not layers else None


# --------------------------------------------------------------------------- #
# 2x2 average pooling
# --------------------------------------------------------------------------- #
class _AvgPool2x2Fn(torch.autograd.Function):
    """2x2 average pooling at stride 2 as two strided pairwise sums.

    Forward: rows 0::2 + 1::2, then columns 0::2 + 1::2, times 1/4 (the summation order
    differs from ``avg_pool2d``'s, so results agree to rounding: ~2e-7 relative). Backward:
    the output gradient / 4 spread over each 2x2 window by two expand+reshape copies, made
    of differentiable ops, so double backward (the synthetic side's ``create_graph``) and
    ``torch.func`` transforms (the batched kernel's ``vmap(grad)``) work through it.
    An odd last row or column is dropped, as ``nn.AvgPool2d(2, 2)`` does.
    Why: it is several times faster than torch's NCHW ``avg_pool2d`` on the CPU (docs/performance.md).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        rows = torch.add(x[..., 0::2, :], x[..., 1::2, :])
        return torch.add(rows[..., 0::2], rows[..., 1::2]).mul_(0.25)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.in_hw = tuple(inputs[0].shape[-2:])

    @staticmethod
    def backward(ctx, grad):
        return _spread2x2(grad, ctx.in_hw)


def _spread2x2(grad, in_hw):
    """Each output gradient / 4 copied to its 2x2 window (zeros under a dropped odd row/column)."""
    lead, (h, w) = grad.shape[:-2], grad.shape[-2:]
    g = (grad * 0.25).unsqueeze(-1).expand(*lead, h, w, 2).reshape(*lead, h, 2 * w)
    g = g.unsqueeze(-2).expand(*lead, h, 2, 2 * w).reshape(*lead, 2 * h, 2 * w)
    if (2 * h, 2 * w) != in_hw:
        g = F.pad(g, (0, in_hw[1] - 2 * w, 0, in_hw[0] - 2 * h))
    return g


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)``, computed by ``_AvgPool2x2Fn`` on the CPU. On other devices (not
    measured there yet) and for a map smaller than 2x2 (torch's error then) it calls torch's."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x):
        if x.device.type == "cpu" and min(x.shape[-2:]) >= 2:
            return _AvgPool2x2Fn.apply(x)
        return F.avg_pool2d(x, 2, 2)


# --------------------------------------------------------------------------- #
# the first block: convolution and instance norm as one matmul per sample
# --------------------------------------------------------------------------- #
# The first convolution has few input channels (K = 9 or 27 taps per output value), so it is
# cheap in FLOPs but writes the largest map of the network. The per-sample K x K covariance costs
# K / C of the convolution's FLOPs (C output channels), so it grows with K; 27 (CIFAR) is the
# largest measured, and wider inputs keep the plain layers.
_FUSE_MAX_TAPS = 27


def _fusable(conv: nn.Module, norm: nn.Module | None, max_taps: int | None = _FUSE_MAX_TAPS) -> bool:
    """A stride-1 zero-padded convolution followed by an affine instance norm (``max_taps``: at most
    that many input values per output value; None: any)."""
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.GroupNorm) and norm.affine
            and norm.num_groups == norm.num_channels == conv.out_channels
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and (max_taps is None or _taps(conv) <= max_taps))


def _taps(conv: nn.Conv2d) -> int:
    """Input values per output value of a convolution (K of its im2col)."""
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _conv_instance_norm_terms(x, conv: nn.Conv2d, norm: nn.GroupNorm):
    """What ``conv_instance_norm`` and ``conv_instance_norm_pool2x2`` are built from: the input
    patches centred per sample ([n, K, L]), the flattened weights ([C, K]), each sample's scale of
    each output channel (gamma / std, [n, C]), the shift (beta; the conv bias enters as ``b - b``)
    and the output map's size. The statistics stay fp32 under autocast, as autocast keeps norms."""
    ho, wo = _conv_out_hw(x, conv)
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding)           # [n, K, L]
    centred = patches - patches.mean(-1, keepdim=True)
    with torch.autocast(x.device.type, enabled=False):
        cov = centred @ centred.transpose(1, 2) / centred.shape[-1]         # [n, K, K]
        w = conv.weight.flatten(1)                                          # [C, K]
        var = ((w @ cov) * w).sum(-1)                                       # [n, C]
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    shift = norm.bias if conv.bias is None else norm.bias + (conv.bias - conv.bias)
    return centred, w, scale, shift, (ho, wo)


def _matmul_operands(x, conv: nn.Conv2d, norm: nn.GroupNorm):
    """``conv_instance_norm``'s matmul as [C, K+1] x [K+1, L] per sample: the scaled weights with
    beta as a last column, the centred patches with a row of ones; and the output map's size."""
    n = x.shape[0]
    centred, w, scale, shift, hw = _conv_instance_norm_terms(x, conv, norm)
    lhs = torch.cat([scale.unsqueeze(-1) * w, shift.expand(n, -1).unsqueeze(-1)], dim=-1)
    rhs = torch.cat([centred, centred.new_ones(n, 1, centred.shape[-1])], dim=1)
    return lhs, rhs, hw


def conv_instance_norm(x, conv: nn.Conv2d, norm: nn.GroupNorm, act: nn.Module | None = None,
                       channels_last: bool = False):
    """``act(norm(conv(x)))`` for an instance norm (one group per channel), as one matmul per sample.

    The convolution is linear in the input patches ``p`` (im2col, [K, L] per sample), so the
    normalised output of channel c is ``gamma_c (w_c . (p - m)) / sqrt(w_c' S w_c + eps) + beta_c``
    with the patches' per-sample mean ``m`` and biased covariance ``S`` (K x K): the convolution's
    bias cancels, and the mean and variance of every output channel come from S instead of a pass
    over the output map. What is left is one [C, K+1] x [K+1, L] matmul per sample that writes the
    normalised map once (the +1 row carries beta), and its backward reads the output gradient once.
    The plain layers need a convolution, a group norm forward (two passes over the map) and their
    backward passes (the group norm's reads the map and its gradient twice more).

    Exact up to rounding (float64: 1e-15 relative; tests/test_fast_ops.py). The bias enters as
    ``b - b``, so its gradient is an exact zero rather than the rounding noise (~1e-8) the plain
    layers give it, and ``autograd.grad`` over all parameters still finds it in the graph. Made of
    differentiable ops: double backward and ``torch.func`` transforms go through it. Stride 1,
    zero padding, no dilation or groups (``_fusable`` checks); ``act`` must be elementwise.
    ``channels_last``: the matmul is taken the other way round ([L, K+1] x [K+1, C] per sample),
    so the map comes out channels-last (an NCHW view with channels-last strides; the same values)
    for the channels-last blocks after it (``nhwc_block``). Under autocast (``--precision bf16``)
    the statistics stay fp32, as autocast keeps norms in fp32 on CUDA; the last matmul runs in bf16.
    """
    n = x.shape[0]
    lhs, rhs, (ho, wo) = _matmul_operands(x, conv, norm)
    z = rhs.transpose(1, 2) @ lhs.transpose(1, 2) if channels_last else lhs @ rhs   # [n, L, C] or [n, C, L]
    if act is not None:
        z = act(z)            # in place is fine: a fresh tensor, not a view (matmul's backward keeps no output)
    return z.view(n, ho, wo, -1).permute(0, 3, 1, 2) if channels_last else z.view(n, -1, ho, wo)


# The fused first block's map is the network's largest (256 FashionMNIST- or CIFAR-shaped images:
# 256 x 128 x 32 x 32 floats, 134 MB): conv_instance_norm writes it, the ReLU and the pooling read
# and write it again, and the backward spreads the pooled gradient over it, masks it and reads it
# once more. conv_relu_pool2x2 does that work in chunks of samples whose map fits in cache.
_CHUNK_BYTES = 4 << 20


def _window_major(rhs, ho: int, wo: int):
    """``rhs``'s columns (one per output position, [n, K, ho*wo]) reordered so that the four
    positions of each 2x2 pooling window lie in four contiguous blocks: [n, K, 4 * h2 * w2], block
    ``2 * dy + dx`` holding position (2i + dy, 2j + dx) at column i * w2 + j. An odd last row or
    column, which the pooling drops, is left out (its gradient is zero)."""
    n, k, _ = rhs.shape
    h2, w2 = ho // 2, wo // 2
    r = rhs.view(n, k, ho, wo)[..., :2 * h2, :2 * w2].reshape(n, k, h2, 2, w2, 2)
    return r.permute(0, 1, 3, 5, 2, 4).reshape(n, k, 4 * h2 * w2)


def _pool_blocks_into(z, dim: int, out):
    """``out`` = the mean of the four window blocks of ``z`` (its dimension ``dim``, of size 4),
    summed as ``_AvgPool2x2Fn`` sums a window (rows first, then columns: (z0 + z2) + (z1 + z3)), so
    the values are the same to the bit."""
    z0, z1, z2, z3 = z.unbind(dim)
    torch.add(z0, z2, out=out)
    return out.add_(torch.add(z1, z3)).mul_(0.25)


def _chunk(n_per_sample: int, element_size: int) -> int:
    """Samples per chunk: as many as fit ``_CHUNK_BYTES`` of map (at least one)."""
    return max(1, _CHUNK_BYTES // (n_per_sample * element_size))


def _relu_pool2x2_chunks(lhs, rhs, pooled_hw, channels_last: bool, keep_map: bool):
    """``(pooled, z)``: ``AvgPool2x2(relu(lhs @ rhs))`` per chunk of samples, ``rhs`` window-major.
    The pooled map comes out NCHW or, with ``channels_last``, as an NCHW view with channels-last
    strides (the matmul then taken [4 q, K] x [K, C]); ``z``, the ReLU's output ([n, C, 4 q] or
    [n, 4 q, C]), is kept for a backward with ``keep_map``, else each chunk's is dropped (None)."""
    n, c, _ = lhs.shape
    q = pooled_hw[0] * pooled_hw[1]
    m = _chunk(c * 4 * q, lhs.element_size())
    if channels_last:
        a, b, map_shape, blocks, dim = rhs.transpose(1, 2), lhs.transpose(1, 2), (n, 4 * q, c), (4, q, c), 1
        out = lhs.new_empty(n, q, c)
    else:
        a, b, map_shape, blocks, dim = lhs, rhs, (n, c, 4 * q), (c, 4, q), 2
        out = lhs.new_empty(n, c, q)
    z = lhs.new_empty(map_shape) if keep_map else None
    for i in range(0, n, m):
        zc = torch.bmm(a[i:i + m], b[i:i + m], **({"out": z[i:i + m]} if keep_map else {})).relu_()
        _pool_blocks_into(zc.view(-1, *blocks), dim, out[i:i + m])
    out = out.view(n, *pooled_hw, c).permute(0, 3, 1, 2) if channels_last else out.view(n, c, *pooled_hw)
    return out, z


def _differentiable_backward(fn, inputs, needs_grad, grad):
    """The gradients of ``fn(*inputs)`` for the output gradient ``grad``, as a graph over the inputs
    and ``grad``: what a hand-written backward below returns when asked to build one
    (``create_graph=True``, a double backward), from a recomputation in differentiable ops.
    ``needs_grad``: one flag per input (``ctx.needs_input_grad``); None where it is False."""
    wanted = [t for t, need in zip(inputs, needs_grad) if need]
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):   # the forward ran outside autocast too
        out = fn(*inputs)
    got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs_grad)


def _relu_pool2x2_in_order(lhs, rhs, pooled_hw):
    """``_ReluPool2x2Fn``'s function in differentiable ops: relu(lhs @ rhs), the mean of each
    window's four blocks (``rhs`` window-major)."""
    n, c, _ = lhs.shape
    return torch.relu(lhs @ rhs).view(n, c, 4, *pooled_hw).sum(2) * 0.25


class _ReluPool2x2Fn(torch.autograd.Function):
    """``AvgPool2x2(relu(lhs @ rhs))`` with ``rhs`` in window-major order, for a call that needs
    the gradient of ``lhs`` only (the weights', not the input's).

    Forward, per chunk of samples: the matmul into the saved map ``z`` (the ReLU's output, which
    the layers in order save too), the ReLU in place and the pooling while the chunk is in cache.
    Backward, per chunk: the pooled gradient / 4 broadcast over the four window blocks and masked by
    ``z > 0`` in one ``threshold_backward``, then the matmul with ``rhs``. The layers in order make
    four passes over the full map for that (two spreading copies, the ReLU backward, the matmul).
    ``channels_last``: the map is [n, 4 q, C] and the pooled output channels-last, for a block after
    it that trains channels-last (``_NhwcTrainBlockFn``); MKL's matmul with K = 10 rows (one
    input channel's 9 taps + 1) is also faster this way round. Asked for a double backward, the
    backward differentiates ``_relu_pool2x2_in_order`` instead (``_differentiable_backward``).
    """

    @staticmethod
    def forward(ctx, lhs, rhs, pooled_hw, channels_last):
        out, z = _relu_pool2x2_chunks(lhs, rhs, pooled_hw, channels_last, keep_map=True)
        ctx.save_for_backward(lhs, rhs, z)
        ctx.pooled_hw, ctx.channels_last = pooled_hw, channels_last
        return out

    @staticmethod
    def backward(ctx, grad):
        lhs, rhs, z = ctx.saved_tensors
        if torch.is_grad_enabled():                 # create_graph=True: a backward that can be differentiated
            fn = lambda a, b: _relu_pool2x2_in_order(a, b, ctx.pooled_hw)
            return _differentiable_backward(fn, (lhs, rhs), ctx.needs_input_grad[:2], grad) + (None, None)
        n, k = rhs.shape[:2]
        c, q = grad.shape[1], grad.shape[2] * grad.shape[3]
        m = _chunk(c * 4 * q, z.element_size())
        grad_lhs = z.new_empty(n, c, k)
        if ctx.channels_last:
            grad = grad.permute(0, 2, 3, 1).reshape(n, 1, q, c)             # a view when channels-last
            for i in range(0, n, m):
                zc = z[i:i + m].view(-1, 4, q, c)
                g = torch.ops.aten.threshold_backward((grad[i:i + m] * 0.25).expand_as(zc), zc, 0)
                grad_lhs[i:i + m].copy_(torch.bmm(rhs[i:i + m], g.view(-1, 4 * q, c)).transpose(1, 2))
        else:
            grad = grad.contiguous().view(n, c, 1, q)
            for i in range(0, n, m):
                zc = z[i:i + m].view(-1, c, 4, q)
                g = torch.ops.aten.threshold_backward((grad[i:i + m] * 0.25).expand_as(zc), zc, 0)
                torch.bmm(g.view(-1, c, 4 * q), rhs[i:i + m].transpose(1, 2), out=grad_lhs[i:i + m])
        return grad_lhs, None, None, None


def conv_relu_pool2x2(x, conv: nn.Conv2d, norm: nn.GroupNorm, channels_last: bool = False):
    """``AvgPool2x2(relu(norm(conv(x))))`` for an instance norm: ``conv_instance_norm``'s matmul with
    the ReLU and the pooling done per chunk of samples in cache (``_ReluPool2x2Fn``).

    For calls that need no gradient of ``x`` (the real batches' gradients, the inner loop's and
    evaluation's training steps, the test pass, DM's real side): with a gradient of the weights the
    backward is ``_ReluPool2x2Fn``'s, and ``FastConvBlock`` sends a call whose input needs a gradient
    (the synthetic side) or runs inside ``torch.func`` transforms to ``conv_instance_norm``. Without a gradient
    the map is not kept and, with ``channels_last``, the matmul is taken the other way round so the
    pooled map comes out channels-last for the blocks after it.

    The same values as the layers in order up to rounding (float64: tests/test_fast_ops.py): the
    forward's float32 values are those of ``conv_instance_norm`` (its matmul taken the same way
    round) and ``AvgPool2x2`` to the bit, the gradients' summation order differs (rounding only).
    Under autocast (``--precision bf16``) the matmuls, ReLU and pooling run in bf16, as they do in
    the layers in order there, and the statistics stay fp32.
    """
    lhs, rhs, (ho, wo) = _matmul_operands(x, conv, norm)
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        lhs, rhs = lhs.to(dtype), rhs.to(dtype)
    rhs = _window_major(rhs, ho, wo)
    pooled_hw = (ho // 2, wo // 2)
    with torch.autocast(kind, enabled=False):
        if torch.is_grad_enabled() and lhs.requires_grad:
            return _ReluPool2x2Fn.apply(lhs, rhs, pooled_hw, channels_last)
        return _relu_pool2x2_chunks(lhs, rhs, pooled_hw, channels_last, keep_map=False)[0]


# conv_instance_norm_pool2x2 unrolls 4 x K products per pooled value: at K = 9 (one input channel)
# inductor's loop beats the matmul and separate pooling, at K = 27 (CIFAR) it loses
_POOL_FOLD_MAX_TAPS = 9


def conv_instance_norm_pool2x2(x, conv: nn.Conv2d, norm: nn.GroupNorm, act: nn.Module):
    """``AvgPool2x2(act(norm(conv(x))))`` as one elementwise expression over the pooled map, for
    gradient-free calls under ``torch.compile`` (``--compile``: the test pass, DM's real embeddings).

    The statistics are ``conv_instance_norm``'s (``_conv_instance_norm_terms``). Each pooled
    value is then written out as the mean of ``act`` over its 2x2 window, each of the four a sum
    of K products of a centred patch value and a scaled weight: inductor makes that one vectorised
    loop which reads the small patch tensor and writes only the pooled map, where
    ``conv_instance_norm`` writes the full map (a matmul) and the pooling reads it again. Eagerly
    it would be slower (K+1 passes over the pooled map), so ``FastConvBlock`` calls it only while
    compiling, and only for K <= 9 taps. Returns an NCHW view with channels-last
    strides, the layout the channels-last blocks after it take; an odd last row or
    column is dropped, as the pooling does. Exact up to rounding (tests/test_fast_ops.py).
    """
    n = x.shape[0]
    centred, w, scale, shift, (ho, wo) = _conv_instance_norm_terms(x, conv, norm)
    k = centred.shape[1]
    lhs = scale.unsqueeze(1) * w.t()                                        # [n, K, C]
    h2, w2 = ho // 2, wo // 2
    windows = centred.view(n, k, ho, wo)[..., :2 * h2, :2 * w2].reshape(n, k, h2, 2, w2, 2)
    pooled = 0
    for dy in (0, 1):
        for dx in (0, 1):
            z = shift
            for t in range(k):   # unrolled on purpose: one fused expression, no [n, 4, h2, w2, C] buffer
                z = z + windows[:, t, :, dy, :, dx, None] * lhs[:, t, None, None, :]
            pooled = pooled + act(z)
    return (pooled * 0.25).permute(0, 3, 1, 2)                              # [n, C, h2, w2], channels-last


# --------------------------------------------------------------------------- #
# the later blocks, channels-last
# --------------------------------------------------------------------------- #
def nhwc_block(x, conv: nn.Conv2d, norm: nn.GroupNorm | None, act: nn.Module, pool: nn.Module | None):
    """``pool(act(norm(conv(x))))`` computed channels-last, for calls that need no gradient.

    oneDNN's channels-last convolution forward is faster than its NCHW one on the CPU, its weight
    gradient was not, so only gradient-free calls come here; training runs channels-last through
    ``_NhwcTrainBlockFn`` (its own backward, per chunk), where the call is differentiated once.
    torch's group norm is slow on channels-last maps, so
    the instance norm is done here on the [n, H*W, C] view: the mean, then the variance of the
    centred map (two passes rather than E[y^2] - E[y]^2, which cancels when the mean is large),
    then scale and shift; the pooling module runs
    on the channels-last map as it is (as fast as a channels-last copy of its code here). The
    result equals the layers in order up to rounding (tests/test_fast_ops.py) and is an NCHW
    tensor with channels-last strides.
    """
    y = conv(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)   # [n, H, W, C], contiguous
    n, h, w, c = y.shape
    y = y.reshape(n, h * w, c)
    if norm is not None:
        y = y.sub_(y.mean(1, keepdim=True))      # in place: the convolution's output, held by no graph
        scale = torch.rsqrt(y.square().mean(1, keepdim=True) + norm.eps)
        if norm.affine:
            y = torch.addcmul(norm.bias, y, scale * norm.weight)
        else:
            y = y.mul_(scale)
    y = act(y).view(n, h, w, c).permute(0, 3, 1, 2)
    return y if pool is None else pool(y)


def _pool2x2_nhwc_into(a, out):
    """``out`` [m, h2, w2, C] = the 2x2 means of ``a`` [m, H, W, C] (an odd last row or column
    dropped), summed as ``_AvgPool2x2Fn`` sums them: rows first, then columns."""
    h2, w2 = out.shape[1], out.shape[2]
    rows = torch.add(a[:, 0:2 * h2:2], a[:, 1:2 * h2:2])
    torch.add(rows[:, :, 0:2 * w2:2], rows[:, :, 1:2 * w2:2], out=out)
    return out.mul_(0.25)


class _NhwcTrainBlockFn(torch.autograd.Function):
    """``AvgPool2x2(relu(instance_norm(conv(x))))`` channels-last, for a call differentiated once.

    Forward: oneDNN's channels-last convolution over the whole batch, then per chunk of samples
    (in cache) the instance norm on the [m, H*W, C] view as ``nhwc_block`` computes it (the same
    float32 values), the ReLU and the pooling. Saved: the input, the centred convolution output
    and the per-sample 1/std. Backward, per chunk:
    the pre-ReLU map recomputed, the pooled gradient / 4 broadcast over each window and masked in
    one ``threshold_backward``, the instance norm's backward in closed form (``dy = r (g gamma - mean(g
    gamma)) - r^3 yc mean(g gamma yc)`` for the centred output ``yc`` and r = 1/std); then the
    convolution's backward over the whole batch, channels-last. The convolution's bias cancels in
    the norm: its gradient is an exact zero (the layers in order give it rounding noise, ~1e-8).
    Asked for a double backward, the backward differentiates ``_nhwc_train_block_in_order`` instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, conv, eps):
        inp, x = x, x.contiguous(memory_format=torch.channels_last)
        y = conv(x)                   # the module (its hooks see the call, as nhwc_block's); channels-last
        n, c, h, w = y.shape
        yv = y.permute(0, 2, 3, 1).view(n, h * w, c)
        h2, w2 = h // 2, w // 2
        out = y.new_empty(n, h2, w2, c)
        rstd = y.new_empty(n, 1, c)
        m = _chunk(h * w * c, y.element_size())
        for i in range(0, n, m):
            yc = yv[i:i + m]
            yc.sub_(yc.mean(1, keepdim=True))
            r = torch.rsqrt(yc.square().mean(1, keepdim=True) + eps, out=rstd[i:i + m])
            a = torch.addcmul(beta, yc, r * gamma).relu_()
            _pool2x2_nhwc_into(a.view(-1, h, w, c), out[i:i + m])
        ctx.save_for_backward(x, weight, gamma, beta, y, rstd, inp)   # inp: the input as given, for a double backward
        ctx.conf = (conv.padding, bias is not None, eps)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        x, weight, gamma, beta, y, rstd, inp = ctx.saved_tensors
        padding, has_bias, eps = ctx.conf
        if torch.is_grad_enabled():                 # create_graph=True: a backward that can be differentiated
            fn = lambda t, wt, g, b: _nhwc_train_block_in_order(t, wt, g, b, padding, eps)
            needs = [ctx.needs_input_grad[i] for i in (0, 1, 3, 4)]
            gx, gw, grad_gamma, grad_beta = _differentiable_backward(fn, (inp, weight, gamma, beta), needs, grad)
            grad_bias = weight.new_zeros(weight.shape[0]) if has_bias else None
            return gx, gw, grad_bias, grad_gamma, grad_beta, None, None
        n, c, h, w = y.shape
        h2, w2 = grad.shape[-2:]
        hw = h * w
        yv = y.permute(0, 2, 3, 1).view(n, hw, c)
        dy = torch.empty_like(y)                                             # channels-last, as y
        dyv = dy.permute(0, 2, 3, 1).view(n, hw, c)
        gp = (grad * 0.25).permute(0, 2, 3, 1).contiguous()                  # [n, h2, w2, C]
        ga = y.new_zeros(min(n, _chunk(hw * c, y.element_size())), h, w, c)  # odd edge: stays zero
        s1 = y.new_empty(n, 1, c)
        s2 = y.new_empty(n, 1, c)
        m = ga.shape[0]
        for i in range(0, n, m):
            yc, r = yv[i:i + m], rstd[i:i + m]
            k = yc.shape[0]
            rg = r * gamma
            a = torch.addcmul(beta, yc, rg).view(k, h, w, c)
            window = (k, h2, 2, w2, 2, c)
            gak = ga[:k]
            torch.ops.aten.threshold_backward.grad_input(
                gp[i:i + m].view(k, h2, 1, w2, 1, c).expand(window), a[:, :2 * h2, :2 * w2].view(window), 0,
                grad_input=gak[:, :2 * h2, :2 * w2].view(window))
            g = gak.view(k, hw, c)
            torch.sum(g, 1, keepdim=True, out=s1[i:i + m])
            torch.sum(g * yc, 1, keepdim=True, out=s2[i:i + m])
            coef = s2[i:i + m] * (rg * r * r / hw)
            torch.mul(yc, coef.neg_(), out=dyv[i:i + m]).addcmul_(g, rg).sub_(rg * s1[i:i + m] / hw)
        grad_gamma = (s2 * rstd).sum((0, 1))
        grad_beta = s1.sum((0, 1))
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        grad_bias = weight.new_zeros(weight.shape[0]) if has_bias else None
        return gx, gw.contiguous(), grad_bias, grad_gamma, grad_beta, None, None


def _nhwc_train_block_in_order(x, weight, gamma, beta, padding, eps):
    """``_NhwcTrainBlockFn``'s function in differentiable ops (the conv bias left out: it cancels in
    the instance norm, its gradient is zero)."""
    y = F.conv2d(x, weight, None, padding=padding)
    return F.avg_pool2d(F.relu(F.group_norm(y, y.shape[1], gamma, beta, eps)), 2, 2)
