"""The gradient-matching distance (the seed's eq. 1) and the outer/inner loop schedule."""
from __future__ import annotations

import logging

import torch

__all__ = ["distance_wb", "match_loss", "match_loss_batched", "get_loops", "DIS_METRICS"]

log = logging.getLogger(__name__)
EPS = 1e-6


def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """Eq. (1): sum over output units of 1 - cos(A_i, B_i) for one parameter tensor.

    Conv weights are reshaped to [out, in*h*w], layer-norm weights to [C, h*w];
    one-dimensional tensors (biases, norm affine parameters) contribute 0.
    """
    if gwr.dim() == 1:
        return gwr.new_zeros(())
    a = gwr.reshape(gwr.shape[0], -1)
    b = gws.reshape(gws.shape[0], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)
    return (1 - cos).sum()


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _ours(gw_syn, gw_real):
    return sum((distance_wb(r, s) for r, s in zip(gw_real, gw_syn)), gw_real[0].new_zeros(()))


def _mse(gw_syn, gw_real):
    return ((_flat(gw_syn) - _flat(gw_real)) ** 2).sum()


def _cos(gw_syn, gw_real):
    r, s = _flat(gw_real), _flat(gw_syn)
    return 1 - (r * s).sum() / (r.norm() * s.norm() + EPS)


DIS_METRICS = {"ours": _ours, "mse": _mse, "cos": _cos}


def match_loss(gw_syn, gw_real, args) -> torch.Tensor:
    """Distance between synthetic and real gradients (lists of per-parameter tensors).

    ``args`` is the metric name or any object with a ``dis_metric`` attribute
    (the seed's listings pass their argparse namespace).
    """
    metric = args if isinstance(args, str) else args.dis_metric
    if metric not in DIS_METRICS:
        raise ValueError(f"unknown dis_metric {metric!r}; choose one of: {', '.join(DIS_METRICS)}")
    return DIS_METRICS[metric](gw_syn, gw_real)


def _ours_batched(gw_syn, gw_real):
    total = gw_real[0].new_zeros(())
    for r, s in zip(gw_real, gw_syn):
        if r.dim() == 2:        # one-dimensional per class: contributes 0, as in distance_wb
            continue
        a = r.reshape(r.shape[0], r.shape[1], -1)
        b = s.reshape(s.shape[0], s.shape[1], -1)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)
        total = total + (1 - cos).sum()
    return total


def _mse_batched(gw_syn, gw_real):
    return sum(((s - r) ** 2).sum() for r, s in zip(gw_real, gw_syn))


def _cos_batched(gw_syn, gw_real):
    r = torch.cat([g.reshape(g.shape[0], -1) for g in gw_real], 1)
    s = torch.cat([g.reshape(g.shape[0], -1) for g in gw_syn], 1)
    return (1 - (r * s).sum(1) / (r.norm(dim=1) * s.norm(dim=1) + EPS)).sum()


DIS_METRICS_BATCHED = {"ours": _ours_batched, "mse": _mse_batched, "cos": _cos_batched}


def match_loss_batched(gw_syn, gw_real, metric: str) -> torch.Tensor:
    """``match_loss`` summed over classes, for gradients stacked per class: every tensor is
    [classes, *parameter shape]. Equal to the sum of ``match_loss`` over the classes."""
    if metric not in DIS_METRICS_BATCHED:
        raise ValueError(f"unknown dis_metric {metric!r}; choose one of: {', '.join(DIS_METRICS_BATCHED)}")
    return DIS_METRICS_BATCHED[metric](gw_syn, gw_real)


_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def get_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for ``ipc`` as in DC; ipc > 50 uses (50, 10) (the authors'
    advice), other values the schedule of the nearest listed ipc below."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if ipc in _LOOPS:
        return _LOOPS[ipc]
    if ipc > 50:
        log.info("ipc %d > 50: using outer_loop 50, inner_loop 10 (the DC authors' advice)", ipc)
        return 50, 10
    below = max(k for k in _LOOPS if k <= ipc)
    log.info("ipc %d not in DC's schedule: using the schedule of ipc %d %s", ipc, below, _LOOPS[below])
    return _LOOPS[below]
