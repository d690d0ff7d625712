"""Data augmentation: DSA (differentiable siamese augmentation) and DC's augmentation.

DSA (Zhao & Bilen, 2021): ``DiffAugment(x, strategy, seed, param)`` picks one of
the strategy's transforms at random per call.

* ``seed >= 0`` (siamese): the transform and its parameters are drawn from a
  generator seeded with ``seed``, once, and shared by every sample. Calling it on
  the real and the synthetic batch of a class with the same seed applies the
  identical transform to both.
* ``seed == -1``: parameters are drawn per sample from ``generator`` (or the
  global torch RNG), as during evaluation training.

All random numbers are drawn on the CPU and moved to the images' device, so
the same seed gives the same transform on any device.

DC augmentation (``augment`` with ``get_daparam``) is what the reference uses to
evaluate DC sets on MNIST (crop, scale, rotate) and for BatchNorm ConvNets
(crop, noise); here it is vectorised, one transform chosen per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F

__all__ = ["ParamDiffAug", "DiffAugment", "DSA_TRANSFORMS", "get_daparam", "augment"]


@dataclass
class ParamDiffAug:
    """DSA parameters of the reference code (aug_mode 'S': one transform per call)."""
    aug_mode: str = "S"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def to_dict(self):
        return asdict(self)


def _rand(n, g, *shape):
    return torch.rand(n, *shape, generator=g)


def _draws(x, siamese):
    """Number of independent parameter draws: one shared by all, or one per sample."""
    return 1 if siamese else x.shape[0]


def _bcast(t, x):
    """(n, ...) CPU parameters -> x's device, broadcast over the batch when n == 1."""
    t = t.to(x.device, x.dtype)
    return t.expand(x.shape[0], *t.shape[1:]) if t.shape[0] == 1 else t


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def rand_scale(x, p, g, siamese):
    n, r = _draws(x, siamese), p.ratio_scale
    sx = _rand(n, g) * (r - 1.0 / r) + 1.0 / r
    sy = _rand(n, g) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _affine(x, _bcast(theta, x))


def rand_rotate(x, p, g, siamese):
    n = _draws(x, siamese)
    a = (_rand(n, g) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(-a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, _bcast(theta, x))


def rand_flip(x, p, g, siamese):
    f = _bcast((_rand(_draws(x, siamese), g, 1, 1, 1) < p.prob_flip), x)
    return torch.where(f.bool(), x.flip(3), x)


def rand_brightness(x, p, g, siamese):
    b = _bcast(_rand(_draws(x, siamese), g, 1, 1, 1), x)
    return x + (b - 0.5) * p.brightness


def rand_saturation(x, p, g, siamese):
    s = _bcast(_rand(_draws(x, siamese), g, 1, 1, 1), x)
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (s * p.saturation) + m


def rand_contrast(x, p, g, siamese):
    c = _bcast(_rand(_draws(x, siamese), g, 1, 1, 1), x)
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (c + p.contrast) + m


def _shift_index(size, shift):
    """For each sample, source row/col index into a 1-pixel zero-padded map (0 = pad)."""
    base = torch.arange(size, device=shift.device).view(1, -1)
    return torch.clamp(base + shift.view(-1, 1) + 1, 0, size + 1)


def rand_crop(x, p, g, siamese):
    """Translate by up to ratio_crop_pad of the size, zero-filled (the reference's pad-and-crop)."""
    n, (h, w) = _draws(x, siamese), x.shape[2:]
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    tx = _bcast(torch.randint(-sh, sh + 1, (n,), generator=g), x).long()
    ty = _bcast(torch.randint(-sw, sw + 1, (n,), generator=g), x).long()
    xp = F.pad(x, [1, 1, 1, 1])
    rows = _shift_index(h, tx)                       # (B, h)
    cols = _shift_index(w, ty)                       # (B, w)
    b, c = x.shape[:2]
    xp = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return xp.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def rand_cutout(x, p, g, siamese):
    n, (h, w) = _draws(x, siamese), x.shape[2:]
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    ox = _bcast(torch.randint(0, h + (1 - ch % 2), (n,), generator=g), x).long()
    oy = _bcast(torch.randint(0, w + (1 - cw % 2), (n,), generator=g), x).long()
    r = torch.arange(h, device=x.device).view(1, -1)
    c = torch.arange(w, device=x.device).view(1, -1)
    # the reference clamps the cutout window to the image, which is an interval test here
    rin = (r >= (ox.view(-1, 1) - ch // 2).clamp(min=0)) & (r <= (ox.view(-1, 1) - ch // 2 + ch - 1).clamp(max=h - 1))
    cin = (c >= (oy.view(-1, 1) - cw // 2).clamp(min=0)) & (c <= (oy.view(-1, 1) - cw // 2 + cw - 1).clamp(max=w - 1))
    mask = ~(rin.unsqueeze(2) & cin.unsqueeze(1))
    return x * mask.unsqueeze(1).to(x.dtype)


DSA_TRANSFORMS = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "crop": [rand_crop],
    "cutout": [rand_cutout],
    "flip": [rand_flip],
    "scale": [rand_scale],
    "rotate": [rand_rotate],
}


def DiffAugment(x, strategy="", seed=-1, param=None, generator=None):
    """Applies one randomly chosen DSA transform of ``strategy`` to the batch ``x``.

    seed >= 0: siamese (same transform and parameters for every sample and for every
    call with that seed); seed == -1: parameters per sample, drawn from ``generator``.
    """
    if strategy in ("", "none", "None") or x.shape[0] == 0:
        return x
    param = param or ParamDiffAug()
    siamese = seed != -1
    g = torch.Generator().manual_seed(int(seed)) if siamese else generator
    names = strategy.split("_")
    for name in names:
        if name not in DSA_TRANSFORMS:
            raise ValueError(f"unknown DSA transform {name!r} in {strategy!r}; "
                             f"known: {', '.join(DSA_TRANSFORMS)}")
    if param.aug_mode == "M":
        chosen = names
    else:
        chosen = [names[int(torch.randint(0, len(names), (1,), generator=g))]]
    for name in chosen:
        for fn in DSA_TRANSFORMS[name]:
            x = fn(x, param, g, siamese)
    return x.contiguous()


# --------------------------------------------------------------------------- #
# DC augmentation (used in evaluation only)
# --------------------------------------------------------------------------- #
def get_daparam(dataset, model, model_eval, ipc):
    """DC's evaluation augmentation: crop/scale/rotate for MNIST, crop/noise for ConvNetBN."""
    param = {"crop": 4, "scale": 0.2, "rotate": 45, "noise": 0.001, "strategy": "none"}
    if dataset == "MNIST":
        param["strategy"] = "crop_scale_rotate"
    if model_eval in ("ConvNetBN",):
        param["strategy"] = "crop_noise"
    return param


def augment(images, dc_aug_param, generator=None):
    """DC augmentation: for each sample one transform of the strategy, fill = channel mean.

    Vectorised equivalent of the reference's per-image loop (scipy rotation is
    replaced by a bilinear rotation about the centre).
    """
    if not dc_aug_param or dc_aug_param.get("strategy", "none") == "none":
        return images
    g = generator
    n, c, h, w = images.shape
    dev = images.device
    fill = images.mean(dim=(0, 2, 3)).view(1, c, 1, 1)
    augs = dc_aug_param["strategy"].split("_")
    choice = torch.randint(0, len(augs), (n,), generator=g)
    out = images.clone()
    for k, name in enumerate(augs):
        sel = (choice == k).nonzero().flatten()
        if len(sel) == 0:
            continue
        x = images[sel.to(dev)]
        m = len(sel)
        if name == "crop":
            cr = dc_aug_param["crop"]
            xp = F.pad(x - fill, [cr, cr, cr, cr]) + fill
            r = torch.randint(0, 2 * cr, (m,), generator=g)
            q = torch.randint(0, 2 * cr, (m,), generator=g)
            x = torch.stack([xp[i, :, r[i]:r[i] + h, q[i]:q[i] + w] for i in range(m)])
        elif name == "scale":
            s = dc_aug_param["scale"]
            sh = (torch.rand(m, generator=g) * 2 * s + 1 - s)
            sw = (torch.rand(m, generator=g) * 2 * s + 1 - s)
            theta = torch.zeros(m, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = 1 / sw, 1 / sh
            x = _affine(x - fill, theta.to(dev)) + fill
        elif name == "rotate":
            rot = dc_aug_param["rotate"]
            a = torch.randint(-rot, rot, (m,), generator=g).float() / 180 * math.pi
            theta = torch.zeros(m, 2, 3)
            theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
            theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
            x = _affine(x - fill, theta.to(dev)) + fill
        elif name == "noise":
            x = x + dc_aug_param["noise"] * torch.randn(x.shape, generator=g).to(dev)
        else:
            raise ValueError(f"unknown DC augmentation {name!r}")
        out[sel.to(dev)] = x
    return out
