"""The gradient-matching distance (the paper's eq. 1) and the outer/inner loop schedule."""
from __future__ import annotations

import logging

import torch

__all__ = ["distance_wb", "match_loss", "match_loss_batched", "get_loops", "DIS_METRICS"]

log = logging.getLogger(__name__)
EPS = 1e-6


def _distance_rows(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """Eq. (1) for parameter gradients stacked per class, [classes, *shape]: summed over
    classes and output units, 1 - cos(A_i, B_i). Conv weights are compared as
    [out, in*h*w], layer-norm weights as [C, h*w]; one-dimensional parameters (biases,
    norm affine parameters) contribute 0."""
    if gwr.dim() == 2:
        return gwr.new_zeros(())
    a = gwr.reshape(gwr.shape[0], gwr.shape[1], -1)
    b = gws.reshape(gws.shape[0], gws.shape[1], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)
    return (1 - cos).sum()


def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """Eq. (1): sum over output units of 1 - cos(A_i, B_i) for one parameter tensor."""
    return _distance_rows(gwr[None], gws[None])


def _ours(gw_syn, gw_real):
    return sum((_distance_rows(r, s) for r, s in zip(gw_real, gw_syn)), gw_real[0].new_zeros(()))


def _mse(gw_syn, gw_real):
    return sum(((s - r) ** 2).sum() for r, s in zip(gw_real, gw_syn))


def _cos(gw_syn, gw_real):
    r = torch.cat([g.reshape(g.shape[0], -1) for g in gw_real], 1)
    s = torch.cat([g.reshape(g.shape[0], -1) for g in gw_syn], 1)
    return (1 - (r * s).sum(1) / (r.norm(dim=1) * s.norm(dim=1) + EPS)).sum()


DIS_METRICS = {"ours": _ours, "mse": _mse, "cos": _cos}


def match_loss_batched(gw_syn, gw_real, metric: str) -> torch.Tensor:
    """The matching distance summed over classes, for gradients stacked per class: every
    tensor is [classes, *parameter shape]. ``match_loss`` is its one-class case."""
    if metric not in DIS_METRICS:
        raise ValueError(f"unknown dis_metric {metric!r}; choose one of: {', '.join(DIS_METRICS)}")
    return DIS_METRICS[metric](gw_syn, gw_real)


def match_loss(gw_syn, gw_real, args) -> torch.Tensor:
    """Distance between synthetic and real gradients (lists of per-parameter tensors).

    ``args`` is the metric name or any object with a ``dis_metric`` attribute
    (the paper's listings pass their argparse namespace).
    """
    metric = args if isinstance(args, str) else args.dis_metric
    return match_loss_batched([g[None] for g in gw_syn], [g[None] for g in gw_real], metric)


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
