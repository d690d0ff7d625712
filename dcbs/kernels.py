"""How one outer step of gradient matching computes its per-class gradients and loss.

The condensation loop (``condense.gradient_matching_step``) is written once; the
*kernel* is the only part that changes:

* ``loop`` (default) - the protocol as it reads: for each class, one backward
  pass for the real batch and one (keeping the graph) for the synthetic images,
  then the matching distance. This is the straightforward path the benchmark
  compares against.
* ``batched`` - every class at once: the real batches are stacked to
  [classes, n, ...] and the per-class gradients come from ``torch.func``
  ``vmap(grad(...))`` over classes (no graph for the real side); the same for
  the synthetic images (the outer autograd differentiates through it). Batch
  Sampling's uneven per-class batch sizes are padded with zero images whose loss
  weight is 0, so each class still gets the mean loss over its own images. Only
  valid where a sample's output does not depend on the other samples of its
  batch: instance/group/layer norm, no norm, or BatchNorm after ``_freeze_bn``
  put it in eval mode (which the loop does before every outer step).

Both compute the same thing up to floating-point rounding (tests/test_kernels.py).
A kernel is called as ``kernel(net, batch, num_classes, metric, diag, amp)`` where
``batch(c)`` returns ``(img_real, lab_real, img_syn, lab_syn)`` of class ``c``
(siamese augmentation already applied; classes are drawn in order 0..C-1, so
the sampler's random stream is the same for every kernel) and ``amp()`` is the
context the real batches' forward passes run in (``precision.autocast``: bf16
autocast for ``--precision bf16``, else a no-op; the synthetic side always runs
outside it), and returns the matching loss summed over classes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .matching import match_loss, match_loss_batched
from .precision import upcast

__all__ = ["KERNELS", "loop_kernel", "batched_kernel", "per_class_grads"]


def loop_kernel(net, batch, num_classes: int, metric: str, diag, amp=contextlib.nullcontext) -> torch.Tensor:
    params = list(net.parameters())
    loss = None
    for c in range(num_classes):
        img_real, lab_real, img_syn, lab_syn = batch(c)
        with amp():
            out_real = net(img_real)[0]
        gw_real = torch.autograd.grad(F.cross_entropy(upcast(out_real), lab_real), params)
        gw_real = [g.detach() for g in gw_real]
        gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn)[0], lab_syn), params, create_graph=True)
        diag.add_grads(gw_real, gw_syn)
        term = match_loss(gw_syn, gw_real, metric)
        loss = term if loss is None else loss + term
    return loss


def _stack_padded(xs: list[torch.Tensor]):
    """[classes, n_max, ...] (zero-padded, differentiable) and per-sample weights 1/n_c (0 for padding)."""
    sizes = [x.shape[0] for x in xs]
    n = max(sizes)
    if all(s == n for s in sizes):
        stacked = torch.stack(xs)
    else:
        stacked = torch.stack([x if x.shape[0] == n else torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])
                               for x in xs])
    w = torch.zeros(len(xs), n, device=stacked.device, dtype=stacked.dtype)
    for c, s in enumerate(sizes):
        w[c, :s] = 1.0 / s
    return stacked, w


def per_class_grads(net: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor],
                    amp=contextlib.nullcontext) -> dict:
    """Gradient of each class's mean cross-entropy w.r.t. the network parameters, for all classes
    in one vmapped pass: {name: [classes, *shape]}. Differentiable w.r.t. ``xs`` when they
    require grad (the synthetic side); the parameters are taken detached. The forward pass runs
    in ``amp()``, the loss at full precision (``precision.upcast``)."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v for k, v in net.named_buffers()}
    x, w = _stack_padded(xs)
    y = torch.zeros(w.shape, dtype=torch.long, device=x.device)
    for c, t in enumerate(ys):
        y[c, :t.shape[0]] = t

    def class_loss(p, xc, yc, wc):
        with amp():
            logits = functional_call(net, (p, buffers), (xc,))[0]
        return (F.cross_entropy(upcast(logits), yc, reduction="none") * wc).sum()

    return vmap(grad(class_loss), in_dims=(None, 0, 0, 0))(params, x, y, w)


# Classes per vmapped pass: the real side holds chunk x batch_real activations at once
# (10 CIFAR classes x 256 images: about 1.3 GB per ConvNet layer output), so CIFAR-100 is
# done in ten passes rather than one that would need ten times the memory.
CLASSES_PER_PASS = 10


def batched_kernel(net, batch, num_classes: int, metric: str, diag, amp=contextlib.nullcontext) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    loss = None
    for start in range(0, num_classes, CLASSES_PER_PASS):
        parts = [batch(c) for c in range(start, min(start + CLASSES_PER_PASS, num_classes))]
        reals, lab_reals, syns, lab_syns = (list(t) for t in zip(*parts))
        g_real = per_class_grads(net, [r.detach() for r in reals], lab_reals, amp)
        gw_real = [g_real[n].detach() for n in names]
        del g_real, reals
        g_syn = per_class_grads(net, syns, lab_syns)
        gw_syn = [g_syn[n] for n in names]
        diag.add_grads_batched(gw_real, gw_syn)
        term = match_loss_batched(gw_syn, gw_real, metric)
        loss = term if loss is None else loss + term
    return loss


KERNELS = {"loop": loop_kernel, "batched": batched_kernel}
