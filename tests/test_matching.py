import math

import numpy as np
import pytest
import torch

from dcbs.matching import distance_wb, get_loops, match_loss


def hand_ours(gw_syn, gw_real):
    """The paper's eq. (1) computed with plain Python loops over output units."""
    total = 0.0
    for s, r in zip(gw_syn, gw_real):
        if s.dim() == 1:
            continue
        s2 = s.reshape(s.shape[0], -1).double().numpy()
        r2 = r.reshape(r.shape[0], -1).double().numpy()
        for i in range(s2.shape[0]):
            a, b = r2[i], s2[i]
            total += 1 - float(np.dot(a, b)) / (math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b))) + 1e-6)
    return total


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (4, 2, 5), (10, 32), (10,)]
    return [torch.randn(s, generator=g) for s in shapes]


def test_ours_matches_hand_computation():
    gs, gr = grads(0), grads(1)
    assert match_loss(gs, gr, "ours").item() == pytest.approx(hand_ours(gs, gr), rel=1e-5)


def test_ours_reads_metric_from_args_object():
    class A:
        dis_metric = "ours"
    gs, gr = grads(2), grads(3)
    assert match_loss(gs, gr, A()).item() == pytest.approx(hand_ours(gs, gr), rel=1e-5)


def test_one_dimensional_tensors_contribute_zero():
    a, b = torch.randn(16), torch.randn(16)
    assert distance_wb(a, b).item() == 0.0
    gs, gr = grads(0), grads(1)
    gs2 = [g if g.dim() > 1 else torch.randn_like(g) * 100 for g in gs]
    assert match_loss(gs2, gr, "ours").item() == pytest.approx(match_loss(gs, gr, "ours").item(), rel=1e-6)


def test_ours_is_zero_for_parallel_and_2_per_unit_for_opposite():
    w = torch.randn(6, 4, 3, 3)
    assert distance_wb(w, 3 * w).item() == pytest.approx(0.0, abs=1e-5)
    assert distance_wb(w, -w).item() == pytest.approx(2.0 * 6, abs=1e-4)


def test_mse_and_cos():
    gs, gr = grads(4), grads(5)
    fs = torch.cat([g.flatten() for g in gs]).double()
    fr = torch.cat([g.flatten() for g in gr]).double()
    assert match_loss(gs, gr, "mse").item() == pytest.approx(float(((fs - fr) ** 2).sum()), rel=1e-5)
    cos = float((fs * fr).sum() / (fs.norm() * fr.norm() + 1e-6))
    assert match_loss(gs, gr, "cos").item() == pytest.approx(1 - cos, rel=1e-5)


def test_match_loss_keeps_graph_for_synthetic_gradients():
    x = torch.randn(5, 3, requires_grad=True)
    loss = match_loss([x * 2], [torch.randn(5, 3)], "ours")
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="dis_metric"):
        match_loss(grads(0), grads(1), "l1")


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)),
                                       (40, (40, 15)), (50, (50, 10)), (100, (50, 10)), (500, (50, 10))])
def test_loop_schedule(ipc, loops):
    assert get_loops(ipc) == loops


def test_loop_schedule_refuses_zero():
    with pytest.raises(ValueError):
        get_loops(0)
